"""Config hygiene: unknown gRPC arguments are refused by name; long values are cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbgw.config import load_config
from lbgw.config.grpc_args import GRPC_VERSION, KNOWN_ARGUMENTS
from lbgw.exceptions import SHOWN_CHARACTERS, ConfigError

BASE = """
[[listeners]]
address = "127.0.0.1:0"

[clusters.api]
endpoints = [{ address = "127.0.0.1:5000" }]
"""


def _error(tmp_path: Path, extra: str) -> ConfigError:
    path = tmp_path / "lbgw.toml"
    path.write_text(BASE + extra, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_the_known_list_is_grpcs_own() -> None:
    assert GRPC_VERSION == "1.85.1"
    assert len(KNOWN_ARGUMENTS) == 102
    for name in (
        "grpc.keepalive_time_ms",
        "grpc.max_send_message_length",
        "grpc.use_local_subchannel_pool",
        "grpc.http2.bdp_probe",
        "grpc.so_reuseport",
    ):
        assert name in KNOWN_ARGUMENTS
    assert all(name.startswith("grpc.") for name in KNOWN_ARGUMENTS)


def test_a_misspelt_channel_option_is_refused_by_name(tmp_path: Path) -> None:
    error = _error(tmp_path, 'channel_options = { "grpc.keepalive_time_msX" = 1000 }\n')
    assert error.key == "clusters.api.channel_options.'grpc.keepalive_time_msX'"
    assert f"a channel argument grpc {GRPC_VERSION} knows" in str(error)
    assert "\n" not in str(error)


def test_a_known_channel_option_loads(tmp_path: Path) -> None:
    path = tmp_path / "lbgw.toml"
    path.write_text(BASE + 'channel_options = { "grpc.keepalive_time_ms" = 60000 }\n', "utf-8")
    assert load_config(path).clusters[0].channel_options == (("grpc.keepalive_time_ms", 60000),)


def test_a_long_value_is_cut_to_80_characters(tmp_path: Path) -> None:
    error = _error(tmp_path, f'strategy = "{"x" * 5000}"\n')
    message = str(error)
    got = message.split(", got ", 1)[1]
    assert got.startswith("'xxx")
    assert got.endswith("... (5002 characters)")
    assert len(got) == SHOWN_CHARACTERS + len(" (5002 characters)")
    assert len(message) < 400


def test_a_short_value_is_shown_whole(tmp_path: Path) -> None:
    error = _error(tmp_path, 'strategy = "fastest"\n')
    assert str(error).endswith(", got 'fastest'")


def test_a_key_with_a_newline_is_shown_on_one_line(tmp_path: Path) -> None:
    error = _error(tmp_path, '\n[clusters."a\\nb"]\nendpoints = [{ address = "127.0.0.1:5001" }]\n')
    assert "\n" not in str(error)
    assert "clusters.a\\nb" in str(error) or "'a\\nb'" in str(error)
