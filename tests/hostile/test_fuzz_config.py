"""Property-based fuzzing of the config loader (hypothesis).

The property, from issue 15: any document either loads, or is refused with
one line that names a key; never a traceback. Three ways in:

* documents as data: a full config with random values set at random keys,
  known or not, through ``config_from_mapping`` in-process (many examples);
* documents as text: the same config's TOML with random characters
  inserted, deleted or replaced, through ``load_config`` in-process;
* a small sample of those texts through the real ``lbgw check-config``:
  exit 0, or exit 2 with one stderr line ``lbgw: config error: FILE: KEY:
  expected ...``.

Example counts are bounded so the whole file runs in well under a minute.
"""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbgw.config import Config, config_from_mapping, load_config
from lbgw.exceptions import ConfigError

BASE = """
[server]
grace_period = 2.5

[[listeners]]
address = "127.0.0.1:50051"

[limits]
max_receive_message_bytes = 1048576

[log]
level = "info"

[clusters.users]
endpoints = ["10.0.0.1:50051", { address = "10.0.0.2:50051", weight = 3 }]
strategy = "ewma"

[clusters.users.params]
decay = 5.0

[clusters.users.channel_options]
"grpc.keepalive_time_ms" = 60000

[clusters.users.methods]
"/users.v1.Users/Get" = "unary"

[clusters.users.health_check]
mode = "grpc"
rpc = "check"
interval = 5.0

[clusters.users.outlier_detection]
consecutive_failures = 5
failure_codes = ["UNAVAILABLE"]

[clusters.users.retry]
max_attempts = 2

[[routes]]
service = "users.v1.Users"
cluster = "users"
"""

FUZZ = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.sampled_from(["grpc", "watch", "check", "tcp", "UNAVAILABLE", "127.0.0.1:1", "users"]),
    st.datetimes().map(lambda d: d.replace(tzinfo=datetime.UTC)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in ``node`` (list items by index)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*prefix, i))
    return found


BASE_DATA = tomllib.loads(BASE)
PATHS = _paths(BASE_DATA)


def _set(data: Any, path: tuple[Any, ...], value: Any) -> None:
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _deep_copy(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _deep_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deep_copy(v) for v in node]
    return node


def assert_one_line_naming_a_key(error: ConfigError) -> None:
    message = str(error)
    assert "\n" not in message and "\r" not in message, message
    assert error.key, message
    assert ": expected " in message, message
    if error.key.isprintable() and len(error.key) <= 80:
        assert f": {error.key}: expected " in message, message
    assert "Traceback" not in message
    assert len(message) < 2000, len(message)


edits = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(PATHS),
            # A new key beside a known one: a misspelling, or a key of any text.
            st.tuples(st.sampled_from(PATHS), st.text(max_size=30)).map(
                lambda pk: (*pk[0][:-1], pk[1]) if isinstance(pk[0][-1], str) else pk[0]
            ),
        ),
        values,
    ),
    min_size=1,
    max_size=3,
)


@settings(FUZZ, max_examples=400)
@given(edits)
def test_any_document_loads_or_is_refused_naming_a_key(changes: list[Any]) -> None:
    data = _deep_copy(BASE_DATA)
    for path, value in changes:
        try:
            _set(data, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit replaced the table this path goes through
    try:
        config = config_from_mapping(data, "<fuzz>")
    except ConfigError as error:
        assert_one_line_naming_a_key(error)
    else:
        assert isinstance(config, Config)
        for cluster in config.clusters:
            assert cluster.health_check.interval > 0
            assert not math.isnan(cluster.health_check.interval)


# Text mutations: characters that TOML gives meaning to, and some it does not.
ALPHABET = st.sampled_from(list("[]{}=\".,#\n \t\\'0123456789abcxyz_-+:eE\x00\x7fé"))


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    text = BASE
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        cut = draw(st.integers(min_value=0, max_value=8))
        insert = "".join(draw(st.lists(ALPHABET, max_size=6)))
        text = text[:at] + insert + text[at + cut :]
    return text


@settings(FUZZ, max_examples=300)
@given(mutated_text())
def test_any_text_loads_or_is_refused_naming_a_key(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lbgw.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_config(path)
        except ConfigError as error:
            assert_one_line_naming_a_key(error)
            assert str(error).startswith(f"{path}: ")


@settings(FUZZ, max_examples=8)
@given(mutated_text())
def test_lbgw_check_config_exits_0_or_2_with_one_line(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lbgw.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        done = subprocess.run(
            [sys.executable, "-m", "lbgw", "check-config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        assert done.stdout.startswith(f"{path}: ok: ")
        return
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"lbgw: config error: {path}: "), lines[0]
    assert ": expected " in lines[0]
