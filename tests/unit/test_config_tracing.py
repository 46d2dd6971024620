"""``[tracing]`` and the OpenTelemetry variables laid over it.

File errors go through ``load_config`` on a real file and name the file, the
dotted key and what was expected; environment errors name the variable as
the key and ``environment`` as the source.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lbgw.config import TracingConfig, load_config, tracing_from_env
from lbgw.exceptions import ConfigError

BASE = '[[listeners]]\naddress = "127.0.0.1:0"\n[clusters.api]\nendpoints = ["127.0.0.1:50061"]\n'

FULL = """
[tracing]
service_name = "edge-gw"
exporter = "console"
endpoint = "https://collector.example:4317"
protocol = "grpc"
sampler = "parentbased_traceidratio"
sampler_arg = 0.25
bsp_schedule_delay_ms = 200
bsp_max_queue_size = 100
bsp_max_export_batch_size = 100
bsp_export_timeout_ms = 1000
health_checks = true
"""


def load(tmp_path: Path, tracing: str) -> TracingConfig:
    path = tmp_path / "lbgw.toml"
    path.write_text(BASE + tracing, encoding="utf-8")
    return load_config(path).tracing


def test_every_key_is_read(tmp_path: Path) -> None:
    assert load(tmp_path, FULL) == TracingConfig(
        service_name="edge-gw",
        exporter="console",
        endpoint="https://collector.example:4317",
        protocol="grpc",
        sampler="parentbased_traceidratio",
        sampler_arg=0.25,
        bsp_schedule_delay_ms=200,
        bsp_max_queue_size=100,
        bsp_max_export_batch_size=100,
        bsp_export_timeout_ms=1000,
        health_checks=True,
    )


def test_no_table_means_tracing_off_with_opentelemetrys_defaults(tmp_path: Path) -> None:
    tracing = load(tmp_path, "")
    assert tracing == TracingConfig()
    assert tracing.effective_exporter == "none"
    assert tracing.endpoint_url == "http://localhost:4317"
    assert (tracing.service_name, tracing.sampler, tracing.sampler_arg) == (
        "lbgw",
        "parentbased_always_on",
        1.0,
    )
    assert (
        tracing.bsp_schedule_delay_ms,
        tracing.bsp_max_queue_size,
        tracing.bsp_max_export_batch_size,
        tracing.bsp_export_timeout_ms,
    ) == (5000, 2048, 512, 30000)
    assert tracing.health_checks is False


def test_an_endpoint_alone_turns_otlp_on(tmp_path: Path) -> None:
    tracing = load(tmp_path, '[tracing]\nendpoint = "http://127.0.0.1:4317"\n')
    assert tracing.exporter is None
    assert tracing.effective_exporter == "otlp"
    assert tracing.endpoint_url == "http://127.0.0.1:4317"


def test_an_explicit_exporter_wins_over_the_endpoint(tmp_path: Path) -> None:
    tracing = load(tmp_path, '[tracing]\nexporter = "none"\nendpoint = "http://[::1]:4317/"\n')
    assert tracing.effective_exporter == "none"
    assert load(tmp_path, '[tracing]\nexporter = "otlp"\n').effective_exporter == "otlp"


# (id, [tracing] body, key, start of what was expected)
BAD: list[tuple[str, str | None, str, str]] = [
    ("unknown key", "sample_rate = 0.5", "tracing.sample_rate", "one of the keys bsp_export"),
    ("not a table", None, "tracing", "a table, got 3"),  # None: tracing = 3
    ("empty service name", 'service_name = ""', "tracing.service_name", "a non-empty string"),
    ("service name type", "service_name = 3", "tracing.service_name", "a string, got 3"),
    (
        "exporter",
        'exporter = "jaeger"',
        "tracing.exporter",
        "one of 'otlp', 'console', 'none', got 'jaeger'",
    ),
    *[
        (
            f"endpoint {endpoint}",
            f'endpoint = "{endpoint}"',
            "tracing.endpoint",
            f"a URL http://host:port or https://host:port, got '{endpoint}'",
        )
        for endpoint in (
            "localhost:4317",
            "127.0.0.1:4317",
            "grpc://localhost:4317",
            "http://localhost",
            "http://localhost:0",
            "http://localhost:4317/v1/traces",
            "http://localhost:4317?x=1",
            "http://::1:4317",
            "http://[::1:4317",
        )
    ],
    (
        "http/protobuf",
        'protocol = "http/protobuf"',
        "tracing.protocol",
        "'grpc': lbgw exports OTLP over gRPC only, got 'http/protobuf'",
    ),
    ("protocol", 'protocol = "udp"', "tracing.protocol", "one of 'grpc', got 'udp'"),
    (
        "sampler",
        'sampler = "jaeger_remote"',
        "tracing.sampler",
        "one of 'always_on', 'always_off', 'traceidratio', 'parentbased_always_on'",
    ),
    ("ratio above 1", "sampler_arg = 1.5", "tracing.sampler_arg", "a number >= 0 up to 1.0"),
    ("ratio below 0", "sampler_arg = -0.1", "tracing.sampler_arg", "a number >= 0 up to 1.0"),
    ("ratio a string", 'sampler_arg = "0.5"', "tracing.sampler_arg", "a number >= 0"),
    (
        "schedule delay 0",
        "bsp_schedule_delay_ms = 0",
        "tracing.bsp_schedule_delay_ms",
        "an integer from 1 to 3600000, got 0",
    ),
    (
        "export timeout a float",
        "bsp_export_timeout_ms = 1.5",
        "tracing.bsp_export_timeout_ms",
        "an integer from 1 to 3600000, got 1.5",
    ),
    (
        "queue 0",
        "bsp_max_queue_size = 0",
        "tracing.bsp_max_queue_size",
        "an integer from 1 to 1000000, got 0",
    ),
    (
        "batch over the default queue",
        "bsp_max_export_batch_size = 4096",
        "tracing.bsp_max_export_batch_size",
        "at most the queue size, 2048, got 4096",
    ),
    (
        "batch over the queue",
        "bsp_max_queue_size = 10\nbsp_max_export_batch_size = 11",
        "tracing.bsp_max_export_batch_size",
        "at most the queue size, 10, got 11",
    ),
    ("health checks", 'health_checks = "yes"', "tracing.health_checks", "true or false"),
]


@pytest.mark.parametrize(("body", "key", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tracing_values_name_file_key_and_expected(
    tmp_path: Path, body: str | None, key: str, expected: str
) -> None:
    path = tmp_path / "lbgw.toml"
    text = "tracing = 3\n" + BASE if body is None else f"{BASE}[tracing]\n{body}\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert (error.source, error.key) == (str(path), key)
    assert f"{path}: {key}: expected {expected}" in str(error)


# -- the environment ------------------------------------------------------------------------

FILE = TracingConfig(
    service_name="from-file",
    exporter="console",
    endpoint="http://file:4317",
    sampler="always_off",
    sampler_arg=0.5,
    bsp_schedule_delay_ms=100,
    bsp_max_queue_size=1000,
    bsp_max_export_batch_size=100,
    bsp_export_timeout_ms=2000,
    health_checks=True,
)


def test_no_variables_keep_the_file() -> None:
    assert tracing_from_env(FILE, {}) is FILE
    assert tracing_from_env(FILE, {"OTEL_SERVICE_NAME": "", "PATH": "/bin"}) is FILE


def test_every_variable_wins_over_the_file() -> None:
    environ = {
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_EXPORTER": "OTLP",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://env:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.125",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_BSP_MAX_QUEUE_SIZE": "64",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "32",
        "OTEL_BSP_EXPORT_TIMEOUT": "750",
    }
    assert tracing_from_env(FILE, environ) == TracingConfig(
        service_name="from-env",
        exporter="otlp",
        endpoint="https://env:4317",
        protocol="grpc",
        sampler="traceidratio",
        sampler_arg=0.125,
        bsp_schedule_delay_ms=50,
        bsp_max_queue_size=64,
        bsp_max_export_batch_size=32,
        bsp_export_timeout_ms=750,
        health_checks=True,  # no variable: the file's
    )


def test_the_traces_specific_variables_win_over_the_generic_ones() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",  # would fail if it were read
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
    }
    tracing = tracing_from_env(TracingConfig(), environ)
    assert (tracing.endpoint, tracing.protocol) == ("http://traces:4317", "grpc")


def test_an_endpoint_variable_turns_otlp_on_unless_an_exporter_was_named() -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracing_from_env(TracingConfig(), environ).effective_exporter == "otlp"
    assert tracing_from_env(TracingConfig(exporter="none"), environ).effective_exporter == "none"
    environ["OTEL_TRACES_EXPORTER"] = "otlp"
    assert tracing_from_env(TracingConfig(exporter="none"), environ).effective_exporter == "otlp"


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_sdk_disabled_turns_tracing_off_whatever_else_is_set(value: str) -> None:
    environ = {"OTEL_SDK_DISABLED": value, "OTEL_TRACES_EXPORTER": "otlp"}
    assert tracing_from_env(FILE, environ).effective_exporter == "none"


def test_sdk_disabled_false_changes_nothing() -> None:
    assert tracing_from_env(FILE, {"OTEL_SDK_DISABLED": "false"}) is FILE


# (variable, value, start of what was expected)
BAD_ENV: list[tuple[str, str, str]] = [
    ("OTEL_TRACES_EXPORTER", "zipkin", "one of 'otlp', 'console', 'none', got 'zipkin'"),
    ("OTEL_TRACES_EXPORTER", "otlp,console", "one of 'otlp', 'console', 'none'"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317", "a URL http://host:port or https://"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/v1/traces", "a URL http://host:port"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", "'grpc': lbgw exports OTLP over gRPC only"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json", "'grpc': lbgw exports OTLP over gRPC"),
    ("OTEL_TRACES_SAMPLER", "xray", "one of 'always_on', 'always_off', 'traceidratio'"),
    ("OTEL_TRACES_SAMPLER_ARG", "half", "a number, got 'half'"),
    ("OTEL_TRACES_SAMPLER_ARG", "2", "a number >= 0 up to 1.0, got 2.0"),
    ("OTEL_TRACES_SAMPLER_ARG", "nan", "a number >= 0 up to 1.0"),
    ("OTEL_BSP_SCHEDULE_DELAY", "5s", "an integer, got '5s'"),
    ("OTEL_BSP_SCHEDULE_DELAY", "0", "an integer from 1 to 3600000, got 0"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "1.5", "an integer, got '1.5'"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "-1", "an integer from 1 to 1000000, got -1"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096", "at most the queue size, 2048, got 4096"),
    ("OTEL_SDK_DISABLED", "1", "true or false, got '1'"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_ENV)
def test_bad_variables_name_the_variable(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        tracing_from_env(TracingConfig(), {name: value})
    error = info.value
    assert (error.source, error.key) == ("environment", name)
    assert f"environment: {name}: expected {expected}" in str(error)


def test_a_queue_variable_below_the_files_batch_size_blames_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        tracing_from_env(TracingConfig(), {"OTEL_BSP_MAX_QUEUE_SIZE": "100"})
    assert str(info.value) == (
        "environment: OTEL_BSP_MAX_QUEUE_SIZE: expected at least the export batch size, 512, "
        "got 100"
    )
