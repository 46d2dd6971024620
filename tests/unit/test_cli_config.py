"""The ``lbgw`` command's config errors: exit status 2 and a message naming where and what.

Nothing here starts a gateway: every ``serve`` must fail while its config is
read, and a fixture makes any attempt to run one fail the test instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbgw import cli
from lbgw.config import (
    Config,
    EndpointConfig,
    ListenerConfig,
    LogConfig,
    MethodKind,
    RouteConfig,
)
from lbgw.exceptions import ConfigError

GOOD = """
[[listeners]]
address = "127.0.0.1:0"

[clusters.api]
endpoints = ["127.0.0.1:50061", { address = "127.0.0.1:50062", weight = 2 }]
strategy = "round_robin"

[server]
workers = 2
grace_period = 5
"""

# An endpoint weight of 0: fails at clusters.api.endpoints[0].weight.
BAD = """
[[listeners]]
address = "127.0.0.1:0"

[clusters.api]
endpoints = [{ address = "127.0.0.1:50061", weight = 0 }]
"""
BAD_KEY = "clusters.api.endpoints[0].weight"
BAD_EXPECTED = "expected an integer from 1 to"


@pytest.fixture(autouse=True)
def no_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``serve`` that got past its config would start a gateway: fail instead."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("this test must not start a gateway")

    monkeypatch.setattr(cli, "_run_gateway", refuse)
    monkeypatch.setattr(cli, "_supervise", refuse)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD, encoding="utf-8")
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD, encoding="utf-8")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``lbgw ARGV`` in this process: (exit status, stdout, stderr), argparse exits included."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        assert isinstance(exc.code, int)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def serve_config(argv: list[str]) -> Config:
    """The config ``lbgw serve ARGV`` would run with (argparse, then ``_serve_config``)."""
    return cli._serve_config(cli._parser().parse_args(["serve", *argv]))


# -- check-config ---------------------------------------------------------------------------


def test_check_config_ok(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check-config", str(good)], capsys) == (
        0,
        f"{good}: ok: 1 listener(s), clusters: api (round_robin, 2 endpoints); 1 route(s)\n",
        "",
    )


def test_check_config_bad_file(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check-config", str(bad)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"lbgw: config error: {bad}: {BAD_KEY}: {BAD_EXPECTED} ")
    assert err.endswith(", got 0\n")
    assert "Traceback" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    code, _, err = run(["check-config", str(path)], capsys)
    assert code == 2
    assert err == (
        f"lbgw: config error: {path}: (file): "
        "expected a readable TOML file (No such file or directory)\n"
    )


def test_check_config_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[clusters.api\n", encoding="utf-8")
    code, _, err = run(["check-config", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"lbgw: config error: {path}: (file): expected valid TOML (")


@pytest.mark.parametrize(
    ("text", "status", "stdout", "stderr"),
    [
        (GOOD, 0, ": ok: 1 listener(s)", ""),
        (BAD, 2, "", f": {BAD_KEY}: {BAD_EXPECTED} "),
    ],
    ids=["good", "bad"],
)
def test_check_config_exit_status_of_the_real_command(
    tmp_path: Path, text: str, status: int, stdout: str, stderr: str
) -> None:
    path = tmp_path / "lbgw.toml"
    path.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "lbgw", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == status
    if stdout:
        assert done.stdout.startswith(f"{path}{stdout}")
    if stderr:
        assert done.stderr.startswith(f"lbgw: config error: {path}{stderr}")
    assert "Traceback" not in done.stderr


# -- serve: config errors -------------------------------------------------------------------


def test_serve_config_and_quick_form_together(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["serve", "--config", str(good), "--backend", "127.0.0.1:1"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "lbgw: config error: command line: --config: "
        "expected either --config or the quick form flags, not both\n"
    )


@pytest.mark.parametrize(
    "quick",
    [["--listen", "127.0.0.1:0"], ["--strategy", "ewma"], ["--method", "/a.B/C=unary"]],
    ids=["listen", "strategy", "method"],
)
def test_serve_config_with_any_quick_flag(
    good: Path, quick: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["serve", "--config", str(good), *quick], capsys)
    assert code == 2
    assert "command line: --config: expected either --config or the quick form flags" in err


def test_serve_with_neither_backend_nor_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve"], capsys) == (
        2,
        "",
        "lbgw: config error: command line: --backend: expected at least one --backend HOST:PORT\n",
    )


def test_serve_with_a_bad_config_file(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["serve", "--config", str(bad)], capsys)
    assert code == 2
    assert err.startswith(f"lbgw: config error: {bad}: {BAD_KEY}: {BAD_EXPECTED} ")


def test_serve_with_a_missing_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.toml"
    code, _, err = run(["serve", "--config", str(path)], capsys)
    assert code == 2
    assert err.startswith(f"lbgw: config error: {path}: (file): expected a readable TOML file")


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        (
            "--backend",
            "127.0.0.1:x",
            "expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1",
        ),
        (
            "--backend",
            "127.0.0.1:1=0",
            "expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1",
        ),
        (
            "--backend",
            "127.0.0.1:1=",
            "expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1",
        ),
        (
            "--backend",
            "127.0.0.1:1=-2",
            "expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1",
        ),
        (
            "--backend",
            "localhost",
            "expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1",
        ),
        ("--backend", "127.0.0.1:70000", "expected host:port or host:port=WEIGHT"),
        (
            "--method",
            "/a.B/C=weird",
            "expected /package.Service/Method=KIND, KIND one of unary, server_streaming, "
            "client_streaming, bidi_streaming",
        ),
        ("--method", "/a.B/C", "expected /package.Service/Method=KIND"),
        ("--strategy", "wrr", "invalid choice: 'wrr'"),
        ("--health-check", "http", "invalid choice: 'http'"),
        ("--health-interval", "soon", "invalid float value: 'soon'"),
    ],
)
def test_serve_quick_form_flag_errors_are_argparse_errors(
    flag: str, value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", flag, value]
    if flag != "--backend":
        argv += ["--backend", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lbgw serve")
    assert f"lbgw serve: error: argument {flag}: " in err
    assert value in err
    assert expected in err


@pytest.mark.parametrize(
    ("argv", "flag", "expected"),
    [
        (["--workers", "0"], "--workers", "expected an integer from 1 to 256, got 0"),
        (["--workers", "257"], "--workers", "expected an integer from 1 to 256, got 257"),
        (["--grace", "-1"], "--grace", "expected a number of seconds >= 0, got -1.0"),
        (["--grace", "nan"], "--grace", "expected a number of seconds >= 0, got nan"),
        (
            ["--health-interval", "0"],
            "--health-interval",
            "expected a positive number of seconds, up to 3600, got 0.0",
        ),
        (
            ["--health-interval", "inf"],
            "--health-interval",
            "expected a positive number of seconds, up to 3600, got inf",
        ),
    ],
)
def test_serve_bad_overrides(
    argv: list[str], flag: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["serve", "--backend", "127.0.0.1:1", *argv], capsys)
    assert code == 2
    assert err == f"lbgw: config error: command line: {flag}: {expected}\n"


def test_serve_grace_inf_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        serve_config(["--backend", "127.0.0.1:1", "--grace", "inf"])
    assert info.value.key == "--grace"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--backend", "127.0.0.1:0"], "--backend"),
        (["--backend", "127.0.0.1:1", "--backend", "127.0.0.1:1"], "--backend"),
        (["--backend", "127.0.0.1:1", "--listen", "nope"], "--listen"),
        (["--backend", "127.0.0.1:1", "--method", "nomethod=unary"], "--method"),
    ],
    ids=["backend port 0", "backend twice", "listen", "method name"],
)
def test_serve_quick_form_errors_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["serve", *argv], capsys)
    assert code == 2
    assert flag in err.strip().splitlines()[-1]  # the error line, not argparse's usage


# -- serve: the config it would run ---------------------------------------------------------


def test_quick_form_builds_a_one_cluster_config() -> None:
    config = serve_config(
        [
            "--backend",
            "127.0.0.1:50061",
            "--backend",
            "[::1]:50062=3",
            "--strategy",
            "ewma",
            "--method",
            "/a.B/C=unary",
            "--method",
            "/a.B/Watch=server_streaming",
            "--reflection",
        ]
    )
    assert config.source == "command line"
    assert config.listeners == (ListenerConfig("127.0.0.1:50051"),)
    (cluster,) = config.clusters
    assert cluster.name == "default"
    assert cluster.endpoints == (
        EndpointConfig("127.0.0.1:50061", 1),
        EndpointConfig("[::1]:50062", 3),
    )
    assert cluster.strategy == "ewma"
    assert cluster.methods == (
        ("/a.B/C", MethodKind.UNARY),
        ("/a.B/Watch", MethodKind.SERVER_STREAMING),
    )
    assert cluster.reflection is True
    assert config.routes == (RouteConfig("default", "", "default"),)
    assert (config.workers, config.grace_period) == (1, 10.0)


def test_quick_form_defaults_and_listen() -> None:
    config = serve_config(
        ["--backend", "127.0.0.1:1", "--listen", "0.0.0.0:0", "--listen", "[::1]:50051"]
    )
    assert config.listeners == (ListenerConfig("0.0.0.0:0"), ListenerConfig("[::1]:50051"))
    assert config.clusters[0].strategy == "swrr"
    assert config.clusters[0].reflection is True  # best effort, on by default


def test_quick_form_no_reflection_turns_it_off() -> None:
    config = serve_config(["--backend", "127.0.0.1:1", "--no-reflection"])
    assert config.clusters[0].reflection is False


def test_overrides_apply_to_a_config_file(good: Path) -> None:
    config = serve_config(
        [
            "--config",
            str(good),
            "--workers",
            "3",
            "--grace",
            "0",
            "--log-level",
            "debug",
            "--log-format",
            "text",
        ]
    )
    assert config.source == str(good)
    assert (config.workers, config.grace_period) == (3, 0.0)
    assert config.log == LogConfig("debug", "text")
    assert config.clusters[0].strategy == "round_robin"


def test_a_config_file_alone_keeps_its_values(good: Path) -> None:
    config = serve_config(["--config", str(good)])
    assert (config.workers, config.grace_period) == (2, 5.0)
    assert config.log == LogConfig("info", "json")


def test_quick_form_health_flags() -> None:
    config = serve_config(
        ["--backend", "127.0.0.1:1", "--health-check", "tcp", "--health-interval", "0.5"]
    )
    check = config.clusters[0].health_check
    assert (check.mode, check.interval) == ("tcp", 0.5)
    default = serve_config(["--backend", "127.0.0.1:1"]).clusters[0].health_check
    assert (default.mode, default.interval) == ("grpc", 5.0)


def test_health_flags_are_quick_form_flags(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["serve", "--config", str(good), "--health-check", "none"], capsys)
    assert code == 2
    assert "either --config or the quick form flags, not both" in err


# -- tracing: the OTEL_* variables over the file ----------------------------------------------


def test_serve_lays_the_otel_variables_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "traced.toml"
    path.write_text(GOOD + '[tracing]\nservice_name = "file"\nexporter = "none"\n', "utf-8")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-1")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    tracing = serve_config(["--config", str(path)]).tracing
    assert (tracing.service_name, tracing.effective_exporter, tracing.endpoint_url) == (
        "edge-1",
        "otlp",
        "http://127.0.0.1:4317",
    )


def test_serve_with_a_bad_otel_variable(
    good: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "sometimes")
    code, _, err = run(["serve", "--config", str(good)], capsys)
    assert code == 2
    assert err.startswith(
        "lbgw: config error: environment: OTEL_TRACES_SAMPLER: expected one of 'always_on', "
    )
    assert err.endswith(", got 'sometimes'\n")


def test_quick_form_hashing() -> None:
    config = serve_config(
        ["--backend", "127.0.0.1:1", "--strategy", "ring_hash", "--hash-key", "x-session-id"]
    )
    cluster = config.clusters[0]
    assert (cluster.strategy, cluster.params.hash_on, cluster.params.hash_key) == (
        "ring_hash",
        "metadata",
        "x-session-id",
    )
    assert cluster.params.fallback == "swrr"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--strategy", "maglev"], "a metadata key such as x-session-id with --strategy maglev"),
        (["--hash-key", "x-s"], "--strategy ring_hash or maglev as well"),
        (["--strategy", "maglev", "--hash-key", "X-S"], "a metadata key of lower-case letters"),
    ],
)
def test_quick_form_hashing_errors_name_the_flag(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["serve", "--backend", "127.0.0.1:1", *argv], capsys)
    assert code == 2
    assert err.startswith(f"lbgw: config error: command line: --hash-key: expected {expected}")


def test_event_loop_flag_overrides_either_form() -> None:
    assert serve_config(["--backend", "127.0.0.1:1"]).event_loop == "auto"
    config = serve_config(["--backend", "127.0.0.1:1", "--event-loop", "asyncio"])
    assert config.event_loop == "asyncio"
