"""Config loading: a good file becomes frozen dataclasses; a bad one names file, key, expected.

Every bad case goes through ``load_config`` on a real file under ``tmp_path``,
so the assertion covers the whole message a user reads:
``<path>: <dotted key>: expected <what>``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

import lbgw
from lbgw.config import (
    ClusterConfig,
    Config,
    EndpointConfig,
    HealthCheckConfig,
    Limits,
    ListenerConfig,
    LogConfig,
    MethodKind,
    OutlierConfig,
    RetryConfig,
    RouteConfig,
    SlowStartConfig,
    StickyConfig,
    StrategyParams,
    config_from_mapping,
    load_config,
    parse_address,
    sticky_from_env,
)
from lbgw.exceptions import ConfigError, LbgwError

LISTENER = '[[listeners]]\naddress = "127.0.0.1:0"\n'
API = '[clusters.api]\nendpoints = ["127.0.0.1:50061"]\n'
WEB = '[clusters.web]\nendpoints = ["127.0.0.1:50062"]\n'
MINIMAL = LISTENER + API

FULL = """
[server]
grace_period = 2.5
workers = 4

[[listeners]]
address = "127.0.0.1:50051"

[[listeners]]
address = "[::1]:0"

[limits]
max_receive_message_bytes = 1048576
max_send_message_bytes = 2097152
max_concurrent_streams = 100

[log]
level = "debug"
format = "text"

[clusters.users]
endpoints = ["10.0.0.1:50051", { address = "10.0.0.2:50051", weight = 3 }, "[::1]:50052"]
strategy = "ewma"
reflection = true

[clusters.users.params]
decay = 5.0
default_rtt = 0.01
choice = "best"
seed = 7

[clusters.users.channel_options]
"grpc.keepalive_time_ms" = 10000
"grpc.primary_user_agent" = "lbgw-test"

[clusters.users.methods]
"/users.v1.Users/Get" = "unary"
"/users.v1.Users/Watch" = "server_streaming"

[clusters.fallback]
endpoints = [{ address = "backend.local:9000" }]
strategy = "least_request"
params = { active_request_bias = 0.5 }

[[routes]]
method = "/users.v1.Users/Get"
cluster = "users"

[[routes]]
service = "users.v1.Admin"
cluster = "fallback"

[[routes]]
package = "users"
cluster = "users"

[[routes]]
default = true
cluster = "fallback"
"""


def write(tmp_path: Path, text: str, name: str = "lbgw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def assert_names(error: ConfigError, path: Path, key: str, expected: str) -> None:
    """The message a user reads names the file, the dotted key and what was expected."""
    assert error.source == str(path)
    assert error.key == key
    assert f"{path}: {key}: expected {expected}" in str(error)


# -- good configs ---------------------------------------------------------------------------


def test_full_config_round_trips_into_dataclasses(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert load_config(path) == Config(
        listeners=(ListenerConfig("127.0.0.1:50051"), ListenerConfig("[::1]:0")),
        clusters=(
            ClusterConfig(
                name="users",
                endpoints=(
                    EndpointConfig("10.0.0.1:50051", 1),
                    EndpointConfig("10.0.0.2:50051", 3),
                    EndpointConfig("[::1]:50052", 1),
                ),
                strategy="ewma",
                params=StrategyParams(decay=5.0, default_rtt=0.01, choice="best", seed=7),
                channel_options=(
                    ("grpc.keepalive_time_ms", 10000),
                    ("grpc.primary_user_agent", "lbgw-test"),
                ),
                methods=(
                    ("/users.v1.Users/Get", MethodKind.UNARY),
                    ("/users.v1.Users/Watch", MethodKind.SERVER_STREAMING),
                ),
                reflection=True,
            ),
            ClusterConfig(
                name="fallback",
                endpoints=(EndpointConfig("backend.local:9000", 1),),
                strategy="least_request",
                params=StrategyParams(active_request_bias=0.5),
            ),
        ),
        routes=(
            RouteConfig("method", "/users.v1.Users/Get", "users"),
            RouteConfig("service", "users.v1.Admin", "fallback"),
            RouteConfig("package", "users", "users"),
            RouteConfig("default", "", "fallback"),
        ),
        limits=Limits(
            max_receive_message_bytes=1048576,
            max_send_message_bytes=2097152,
            max_concurrent_streams=100,
        ),
        log=LogConfig(level="debug", format="text"),
        grace_period=2.5,
        workers=4,
        source=str(path),
    )


def test_minimal_config_takes_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.grace_period == 10.0
    assert config.workers == 1
    assert config.limits == Limits(4 * 1024 * 1024, 4 * 1024 * 1024, 1000)
    assert config.log == LogConfig("info", "json")
    (cluster,) = config.clusters
    assert cluster == ClusterConfig("api", (EndpointConfig("127.0.0.1:50061", 1),))
    assert cluster.strategy == "swrr"
    assert cluster.params == StrategyParams(
        decay=10.0, default_rtt=0.03, choice="p2c", active_request_bias=1.0, seed=None
    )
    assert (cluster.channel_options, cluster.methods, cluster.reflection) == ((), (), True)
    assert cluster.descriptor_sets == ()
    assert cluster.retries.retry_buffer_bytes == 1024 * 1024  # Envoy's per-request limit


def test_a_single_cluster_without_routes_gets_one_default_route(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.routes == (RouteConfig("default", "", "api"),)


def test_config_from_mapping_takes_what_tomllib_returns() -> None:
    config = config_from_mapping(
        {
            "listeners": [{"address": "[::1]:50051"}],
            "clusters": {"api": {"endpoints": ["[::1]:50061", {"address": "h:1", "weight": 5}]}},
        }
    )
    assert config.source == "<config>"
    assert config.listeners == (ListenerConfig("[::1]:50051"),)
    assert config.cluster("api").endpoints == (
        EndpointConfig("[::1]:50061", 1),
        EndpointConfig("h:1", 5),
    )
    with pytest.raises(KeyError):
        config.cluster("nope")


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("random", "seed = 3"),
        ("least_request", "active_request_bias = 0.0\nseed = 1"),
        ("least_request", f"active_request_bias = {lbgw.MAX_ACTIVE_REQUEST_BIAS}"),
        ("round_robin", ""),
    ],
)
def test_each_strategy_accepts_its_own_params(tmp_path: Path, strategy: str, params: str) -> None:
    text = MINIMAL + f'strategy = "{strategy}"\n[clusters.api.params]\n{params}\n'
    assert load_config(write(tmp_path, text)).cluster("api").strategy == strategy


def test_weight_bounds_are_inclusive(tmp_path: Path) -> None:
    text = LISTENER + (
        "[clusters.api]\nendpoints = ["
        f'{{ address = "h:1", weight = 1 }}, {{ address = "h:2", weight = {lbgw.MAX_WEIGHT} }}]\n'
    )
    weights = [e.weight for e in load_config(write(tmp_path, text)).cluster("api").endpoints]
    assert weights == [1, lbgw.MAX_WEIGHT]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:50051") == ("[::1]", 50051)
    assert parse_address("localhost:0") == ("localhost", 0)
    for bad in ("localhost", ":1", "::1:50051", "[::1]", "[zz]:1", "h:65536", "h:-1", "a b:1"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clusters[0].endpoints[0].weight = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clusters[0].params.decay = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_receive_message_bytes = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].cluster = "other"  # type: ignore[misc]
    assert isinstance(config.clusters, tuple)
    assert isinstance(config.clusters[0].channel_options, tuple)


# -- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    error = load_error(path)
    assert_names(error, path, "(file)", "a readable TOML file (No such file or directory)")
    assert isinstance(error, LbgwError)
    assert isinstance(error, ValueError)


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, LISTENER + "[clusters.api\nendpoints = 1\n")
    assert_names(load_error(path), path, "(file)", "valid TOML (")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    error = load_error(path)
    assert error.source == str(path)
    assert error.key == "(file)"


# (id, file text, dotted key, start of what was expected)
BAD: list[tuple[str, str, str, str]] = [
    (
        "unknown top-level key",
        MINIMAL + "[sever]\nworkers = 2\n",
        "sever",
        "one of the keys admin, clusters, limits, listeners, log, routes, server, tracing",
    ),
    (
        "unknown server key",
        MINIMAL + "[server]\ngrace = 1\n",
        "server.grace",
        "one of the keys drain_delay, event_loop, grace_period, workers",
    ),
    (
        "unknown cluster key",
        LISTENER + '[clusters.api]\nendpoint = ["h:1"]\n',
        "clusters.api.endpoint",
        "one of the keys channel_options, circuit_breakers, descriptor_sets, dns, endpoints, "
        "health_check, methods, "
        "outlier_detection, panic_threshold, params, reflection, retries, slow_start, sticky, "
        "strategy",
    ),
    (
        "bad cluster name",
        LISTENER + '[clusters."my api"]\nendpoints = ["h:1"]\n',
        "clusters.my api",
        "a cluster name of letters, digits",
    ),
    ("no clusters", LISTENER, "clusters", "at least one table [clusters.NAME]"),
    ("listeners missing", API, "listeners", "a non-empty array of tables [[listeners]]"),
    (
        "listeners empty",
        "listeners = []\n" + API,
        "listeners",
        "a non-empty array of tables [[listeners]]",
    ),
    (
        "listener without address",
        "[[listeners]]\n" + API,
        "listeners[0].address",
        "an address host:port",
    ),
    (
        "listener address without port",
        '[[listeners]]\naddress = "localhost"\n' + API,
        "listeners[0].address",
        "an address host:port (IPv6 as [addr]:port), got 'localhost'",
    ),
    (
        "listener bare IPv6",
        '[[listeners]]\naddress = "::1:50051"\n' + API,
        "listeners[0].address",
        "an address host:port (IPv6 as [addr]:port)",
    ),
    (
        "listener port out of range",
        '[[listeners]]\naddress = "127.0.0.1:65536"\n' + API,
        "listeners[0].address",
        "an address host:port (IPv6 as [addr]:port), got '127.0.0.1:65536'",
    ),
    (
        "listener address not a string",
        "[[listeners]]\naddress = 50051\n" + API,
        "listeners[0].address",
        "a string, got 50051",
    ),
    (
        "endpoints empty",
        LISTENER + "[clusters.api]\nendpoints = []\n",
        "clusters.api.endpoints",
        "a non-empty array of endpoints",
    ),
    (
        "endpoint port 0",
        LISTENER + '[clusters.api]\nendpoints = ["127.0.0.1:0"]\n',
        "clusters.api.endpoints[0]",
        "a port from 1 to 65535, got '127.0.0.1:0'",
    ),
    (
        "endpoint table port 0",
        LISTENER + '[clusters.api]\nendpoints = [{ address = "h:0", weight = 2 }]\n',
        "clusters.api.endpoints[0].address",
        "a port from 1 to 65535",
    ),
    (
        "endpoint table without address",
        LISTENER + "[clusters.api]\nendpoints = [{ weight = 2 }]\n",
        "clusters.api.endpoints[0].address",
        "an address host:port",
    ),
    (
        "duplicate endpoint",
        LISTENER + '[clusters.api]\nendpoints = ["h:1", { address = "h:1", weight = 2 }]\n',
        "clusters.api.endpoints[1]",
        "each address once in a cluster, got 'h:1'",
    ),
    *[
        (
            f"weight {weight}",
            LISTENER + f'[clusters.api]\nendpoints = [{{ address = "h:1", weight = {weight} }}]\n',
            "clusters.api.endpoints[0].weight",
            f"an integer from 1 to {lbgw.MAX_WEIGHT}, got {got}",
        )
        for weight, got in [
            ("0", "0"),
            ("-1", "-1"),
            ("true", "True"),
            ("1.5", "1.5"),
            ('"2"', "'2'"),
            (str(lbgw.MAX_WEIGHT + 1), str(lbgw.MAX_WEIGHT + 1)),
        ]
    ],
    (
        "unknown strategy",
        MINIMAL + 'strategy = "wrr"\n',
        "clusters.api.strategy",
        "one of 'swrr', 'ewma', 'round_robin', 'random', 'least_request', 'ring_hash', 'maglev', "
        "got 'wrr'",
    ),
    (
        "decay on swrr",
        MINIMAL + "[clusters.api.params]\ndecay = 5.0\n",
        "clusters.api.params.decay",
        "a parameter of 'swrr' (no parameters)",
    ),
    (
        "active_request_bias on ewma",
        MINIMAL + 'strategy = "ewma"\nparams = { active_request_bias = 1.0 }\n',
        "clusters.api.params.active_request_bias",
        "a parameter of 'ewma' (choice, decay, default_rtt, seed)",
    ),
    (
        "decay on least_request",
        MINIMAL + 'strategy = "least_request"\nparams = { decay = 1.0 }\n',
        "clusters.api.params.decay",
        "a parameter of 'least_request' (active_request_bias, seed)",
    ),
    (
        "params not a table",
        MINIMAL + 'strategy = "ewma"\nparams = 3\n',
        "clusters.api.params",
        "a table, got 3",
    ),
    (
        "ewma choice",
        MINIMAL + 'strategy = "ewma"\nparams = { choice = "all" }\n',
        "clusters.api.params.choice",
        "one of 'p2c', 'best', got 'all'",
    ),
    (
        "ewma decay 0",
        MINIMAL + 'strategy = "ewma"\nparams = { decay = 0 }\n',
        "clusters.api.params.decay",
        "a positive number, got 0",
    ),
    (
        "ewma default_rtt negative",
        MINIMAL + 'strategy = "ewma"\nparams = { default_rtt = -0.1 }\n',
        "clusters.api.params.default_rtt",
        "a positive number, got -0.1",
    ),
    *[
        (
            f"active_request_bias {bias}",
            MINIMAL + f'strategy = "least_request"\nparams = {{ active_request_bias = {bias} }}\n',
            "clusters.api.params.active_request_bias",
            f"a number >= 0 up to {lbgw.MAX_ACTIVE_REQUEST_BIAS}, got {bias}",
        )
        for bias in ("-0.5", "10.5", "inf")
    ],
    (
        "seed negative",
        MINIMAL + 'strategy = "random"\nparams = { seed = -1 }\n',
        "clusters.api.params.seed",
        "an integer from 0 to",
    ),
    *[
        (
            f"limits.{limit} = {value}",
            MINIMAL + f"[limits]\n{limit} = {value}\n",
            f"limits.{limit}",
            f"an integer from 1 to {2**31 - 1}",
        )
        for limit in (
            "max_receive_message_bytes",
            "max_send_message_bytes",
            "max_concurrent_streams",
        )
        for value in ("0", "-1", '"4MiB"', "1.5", "true", str(2**31))
    ],
    (
        "unknown limit",
        MINIMAL + "[limits]\nmax_message_bytes = 1\n",
        "limits.max_message_bytes",
        "one of the keys max_calls_in_flight, max_concurrent_streams, max_connection_age, "
        "max_connection_age_grace, max_connection_idle, max_receive_message_bytes",
    ),
    (
        "log level",
        MINIMAL + '[log]\nlevel = "verbose"\n',
        "log.level",
        "one of 'debug', 'info', 'warning', 'error', got 'verbose'",
    ),
    (
        "log level upper case",
        MINIMAL + '[log]\nlevel = "INFO"\n',
        "log.level",
        "one of 'debug', 'info', 'warning', 'error', got 'INFO'",
    ),
    (
        "log format",
        MINIMAL + '[log]\nformat = "xml"\n',
        "log.format",
        "one of 'json', 'text', got 'xml'",
    ),
    (
        "workers 0",
        MINIMAL + "[server]\nworkers = 0\n",
        "server.workers",
        "an integer from 1 to 256, got 0",
    ),
    (
        "grace negative",
        MINIMAL + "[server]\ngrace_period = -1\n",
        "server.grace_period",
        "a number >= 0, got -1",
    ),
    (
        "grace inf",
        MINIMAL + "[server]\ngrace_period = inf\n",
        "server.grace_period",
        "a number >= 0, got inf",
    ),
    (
        "channel option without grpc. prefix",
        MINIMAL + "[clusters.api.channel_options]\nkeepalive_time_ms = 1000\n",
        "clusters.api.channel_options.'keepalive_time_ms'",
        "a gRPC channel argument name, such as grpc.keepalive_time_ms",
    ),
    *[
        (
            f"channel option value {value}",
            MINIMAL + f'[clusters.api.channel_options]\n"grpc.keepalive_time_ms" = {value}\n',
            "clusters.api.channel_options.'grpc.keepalive_time_ms'",
            f"an integer or a string, got {got}",
        )
        for value, got in [("1.5", "1.5"), ("true", "True"), ("[1]", "[1]")]
    ],
    (
        "channel_options not a table",
        MINIMAL + 'channel_options = ["grpc.x"]\n',
        "clusters.api.channel_options",
        "a table of gRPC channel arguments",
    ),
    *[
        (
            f"method name {name!r}",
            MINIMAL + f'[clusters.api.methods]\n"{name}" = "unary"\n',
            f"clusters.api.methods.{name!r}",
            "a full method name /package.Service/Method",
        )
        for name in ("Get", "/a.B", "a.B/Get", "/a.B/Get/x", "/a..B/Get", "/a.B/")
    ],
    (
        "method kind",
        MINIMAL + '[clusters.api.methods]\n"/a.B/Get" = "stream"\n',
        "clusters.api.methods.'/a.B/Get'",
        "one of 'unary', 'server_streaming', 'client_streaming', 'bidi_streaming', got 'stream'",
    ),
    (
        "reflection not a boolean",
        MINIMAL + 'reflection = "yes"\n',
        "clusters.api.reflection",
        "true or false, got 'yes'",
    ),
    (
        "route with two match keys",
        MINIMAL + '[[routes]]\nservice = "a.B"\npackage = "a"\ncluster = "api"\n',
        "routes[0]",
        "exactly one of method, service, package or default = true",
    ),
    (
        "route with no match key",
        MINIMAL + '[[routes]]\ncluster = "api"\n',
        "routes[0]",
        "exactly one of method, service, package or default = true",
    ),
    (
        "route to an unknown cluster",
        MINIMAL + WEB + '[[routes]]\npackage = "a"\ncluster = "apj"\n',
        "routes[0].cluster",
        "one of the clusters api, web, got 'apj'",
    ),
    (
        "route without cluster",
        MINIMAL + '[[routes]]\npackage = "a"\n',
        "routes[0].cluster",
        "the name of a cluster",
    ),
    (
        "duplicate route",
        MINIMAL
        + WEB
        + '[[routes]]\nservice = "a.B"\ncluster = "api"\n'
        + '[[routes]]\nservice = "a.B"\ncluster = "web"\n',
        "routes[1]",
        "each service routed once, got 'a.B'",
    ),
    (
        "duplicate default route",
        MINIMAL
        + WEB
        + '[[routes]]\ndefault = true\ncluster = "api"\n'
        + '[[routes]]\ndefault = true\ncluster = "web"\n',
        "routes[1]",
        "each default routed once",
    ),
    (
        "route with a bad method name",
        MINIMAL + '[[routes]]\nmethod = "a.B.Get"\ncluster = "api"\n',
        "routes[0].method",
        "a full method name /package.Service/Method",
    ),
    (
        "route with a bad service name",
        MINIMAL + '[[routes]]\nservice = "a..B"\ncluster = "api"\n',
        "routes[0].service",
        "a dotted name such as pkg.v1.Service, got 'a..B'",
    ),
    (
        "route with a bad package name",
        MINIMAL + '[[routes]]\npackage = "a/b"\ncluster = "api"\n',
        "routes[0].package",
        "a dotted name such as pkg.v1.Service, got 'a/b'",
    ),
    (
        "default = false",
        MINIMAL + '[[routes]]\ndefault = false\ncluster = "api"\n',
        "routes[0].default",
        "true, got False",
    ),
    (
        "unknown route key",
        MINIMAL + '[[routes]]\nprefix = "a"\ncluster = "api"\n',
        "routes[0].prefix",
        "one of the keys cluster, default, method, package, retry_on, service",
    ),
    (
        "unknown health check mode",
        MINIMAL + '[clusters.api.health_check]\nmode = "http"\n',
        "clusters.api.health_check.mode",
        "one of 'grpc', 'tcp', 'none', got 'http'",
    ),
    (
        "health check interval 0",
        MINIMAL + "[clusters.api.health_check]\ninterval = 0\n",
        "clusters.api.health_check.interval",
        "a positive number up to 3600, got 0",
    ),
    (
        "health check rpc",
        MINIMAL + '[clusters.api.health_check]\nrpc = "poll"\n',
        "clusters.api.health_check.rpc",
        "one of 'watch', 'check', got 'poll'",
    ),
    (
        "unhealthy threshold 0",
        MINIMAL + "[clusters.api.health_check]\nunhealthy_threshold = 0\n",
        "clusters.api.health_check.unhealthy_threshold",
        "an integer from 1 to 1000, got 0",
    ),
    (
        "jitter above 1",
        MINIMAL + "[clusters.api.health_check]\njitter = 1.5\n",
        "clusters.api.health_check.jitter",
        "a number >= 0 up to 1, got 1.5",
    ),
    (
        "unimplemented",
        MINIMAL + '[clusters.api.health_check]\nunimplemented = "ok"\n',
        "clusters.api.health_check.unimplemented",
        "one of 'healthy', 'unhealthy', got 'ok'",
    ),
    (
        "unknown health check key",
        MINIMAL + "[clusters.api.health_check]\nperiod = 1\n",
        "clusters.api.health_check.period",
        "one of the keys healthy_threshold, interval, jitter, mode, rpc, service, timeout, "
        "unhealthy_threshold, unimplemented",
    ),
    (
        "failure code not a code",
        MINIMAL + '[clusters.api.outlier_detection]\nfailure_codes = ["UNAVAILABLE", "503"]\n',
        "clusters.api.outlier_detection.failure_codes[1]",
        "one of 'CANCELLED'",
    ),
    (
        "failure codes not an array",
        MINIMAL + '[clusters.api.outlier_detection]\nfailure_codes = "UNAVAILABLE"\n',
        "clusters.api.outlier_detection.failure_codes",
        "an array of status code names such as \"UNAVAILABLE\", got 'UNAVAILABLE'",
    ),
    (
        "max ejection time below base",
        MINIMAL + "[clusters.api.outlier_detection]\nbase_ejection_time = 60\n"
        "max_ejection_time = 30\n",
        "clusters.api.outlier_detection.max_ejection_time",
        "at least base_ejection_time (60.0), got 30.0",
    ),
    (
        "max ejection percent above 100",
        MINIMAL + "[clusters.api.outlier_detection]\nmax_ejection_percent = 101\n",
        "clusters.api.outlier_detection.max_ejection_percent",
        "a number >= 0 up to 100, got 101",
    ),
    (
        "slow start with round robin",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "round_robin"\n'
        + "[clusters.api.slow_start]\nwindow = 30\n",
        "clusters.api.slow_start.window",
        "0 for strategy 'round_robin', which does not pick by weight",
    ),
    (
        "slow start aggression 0",
        MINIMAL + "[clusters.api.slow_start]\nwindow = 30\naggression = 0\n",
        "clusters.api.slow_start.aggression",
        "a positive number, got 0",
    ),
    (
        "retries max attempts 0",
        MINIMAL + "[clusters.api.retries]\nmax_attempts = 0\n",
        "clusters.api.retries.max_attempts",
        "an integer from 1 to 5, got 0",
    ),
    (
        "panic threshold above 100",
        MINIMAL.replace('"]\n', '"]\npanic_threshold = 150\n'),
        "clusters.api.panic_threshold",
        "a number >= 0 up to 100, got 150",
    ),
    (
        "route retry_on unknown code",
        MINIMAL + '[[routes]]\ndefault = true\ncluster = "api"\nretry_on = ["UNAVAILBLE"]\n',
        "routes[0].retry_on[0]",
        "one of 'CANCELLED'",
    ),
    (
        "route retry_on OK",
        MINIMAL + '[[routes]]\ndefault = true\ncluster = "api"\nretry_on = ["OK"]\n',
        "routes[0].retry_on[0]",
        "one of 'CANCELLED'",
    ),
    (
        "maglev without hash_key",
        LISTENER + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "maglev"\n',
        "clusters.api.params.hash_key",
        'a metadata key such as "x-session-id" (hash_on = "metadata")',
    ),
    (
        "hash_key in upper case",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_key = "X-Session" }\n',
        "clusters.api.params.hash_key",
        'a metadata key such as "x-session-id" (hash_on = "metadata"), got \'X-Session\'',
    ),
    (
        "hash_key with hash_on peer",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_on = "peer", hash_key = "x" }\n',
        "clusters.api.params.hash_key",
        'no hash_key with hash_on = "peer"',
    ),
    (
        "maglev table not prime",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "maglev"\n'
        + 'params = { hash_key = "k", table_size = 65536 }\n',
        "clusters.api.params.table_size",
        "a prime number, such as 65537, got 65536",
    ),
    (
        "maglev table too large",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "maglev"\n'
        + 'params = { hash_key = "k", table_size = 5000101 }\n',
        "clusters.api.params.table_size",
        "an integer from 2 to 5000011, got 5000101",
    ),
    (
        "ring sizes the wrong way round",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_key = "k", min_ring_size = 4096, max_ring_size = 1024 }\n',
        "clusters.api.params.max_ring_size",
        "an integer from 4096 to 8388608, got 1024",
    ),
    (
        "hash fallback to a hash",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_key = "k", fallback = "maglev" }\n',
        "clusters.api.params.fallback",
        "one of 'swrr', 'ewma', 'round_robin', 'random', 'least_request', got 'maglev'",
    ),
    (
        "table_size for ring_hash",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_key = "k", table_size = 7 }\n',
        "clusters.api.params.table_size",
        "a parameter of 'ring_hash'",
    ),
    (
        "maglev table smaller than the cluster",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1", "h:2", "h:3", "h:4", "h:5"]\n'
        + 'strategy = "maglev"\nparams = { hash_key = "k", table_size = 3 }\n',
        "clusters.api.params.table_size",
        "an integer from 5 to 5000011, got 3",
    ),
    (
        "ring smaller than the cluster",
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1", "h:2", "h:3"]\nstrategy = "ring_hash"\n'
        + 'params = { hash_key = "k", min_ring_size = 1, max_ring_size = 2 }\n',
        "clusters.api.params.max_ring_size",
        "at least the number of endpoints (3), one point each, got 2",
    ),
    (
        "health check timeout of a year",
        MINIMAL + "[clusters.api.health_check]\ntimeout = 31536000\n",
        "clusters.api.health_check.timeout",
        "a positive number up to 3600, got 31536000",
    ),
    (
        "sticky not a boolean",
        MINIMAL + '[clusters.api.sticky]\nenabled = "yes"\n',
        "clusters.api.sticky.enabled",
        "true or false, got 'yes'",
    ),
    (
        "sticky key ending in -bin",
        MINIMAL + '[clusters.api.sticky]\nenabled = true\nkey = "pin-bin"\n',
        "clusters.api.sticky.key",
        "a metadata key of lower-case letters",
    ),
    (
        "two clusters and no routes",
        MINIMAL + WEB,
        "routes",
        "an array of tables [[routes]] when there are two or more clusters",
    ),
]


@pytest.mark.parametrize(("text", "key", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_file_key_and_expected(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    assert_names(load_error(path), path, key, expected)


@pytest.mark.parametrize("address", ["127.0.0.1:\u0665\u0660\u0660\u0665\u0661", "h:\uff11"])
def test_non_ascii_port_digits_are_rejected(tmp_path: Path, address: str) -> None:
    path = write(tmp_path, f'[[listeners]]\naddress = "{address}"\n' + API)
    assert_names(load_error(path), path, "listeners[0].address", "an address host:port")


@pytest.mark.parametrize("clusters", [API, API + WEB], ids=["one cluster", "two clusters"])
def test_an_empty_routes_array_is_rejected(tmp_path: Path, clusters: str) -> None:
    path = write(tmp_path, "routes = []\n" + LISTENER + clusters)
    assert_names(load_error(path), path, "routes", "")


HEALTH = (
    MINIMAL
    + """panic_threshold = 30

[clusters.api.health_check]
mode = "grpc"
service = "api.v1.Api"
rpc = "check"
interval = 2.5
timeout = 0.5
unhealthy_threshold = 2
healthy_threshold = 1
jitter = 0.2
unimplemented = "unhealthy"

[clusters.api.outlier_detection]
consecutive_failures = 3
failure_codes = ["UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAVAILABLE"]
base_ejection_time = 10
max_ejection_time = 60
max_ejection_percent = 50

[clusters.api.slow_start]
window = 30
aggression = 2
min_weight_percent = 5

[clusters.api.retries]
max_attempts = 3
budget_percent = 25
min_retry_concurrency = 5

[[routes]]
default = true
cluster = "api"
retry_on = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
"""
)


def test_health_outlier_slow_start_retries_and_retry_on(tmp_path: Path) -> None:
    cluster = load_config(write(tmp_path, HEALTH)).cluster("api")
    assert cluster.health_check == HealthCheckConfig(
        mode="grpc",
        service="api.v1.Api",
        rpc="check",
        interval=2.5,
        timeout=0.5,
        unhealthy_threshold=2,
        healthy_threshold=1,
        jitter=0.2,
        unimplemented="unhealthy",
    )
    assert cluster.outlier_detection == OutlierConfig(
        consecutive_failures=3,
        failure_codes=(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
        base_ejection_time=10.0,
        max_ejection_time=60.0,
        max_ejection_percent=50.0,
    )
    assert cluster.slow_start == SlowStartConfig(window=30.0, aggression=2.0, min_weight_percent=5)
    assert cluster.retries == RetryConfig(
        max_attempts=3, budget_percent=25, min_retry_concurrency=5
    )
    assert cluster.panic_threshold == 30
    config = load_config(write(tmp_path, HEALTH))
    assert config.routes[0].retry_on == (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def test_health_defaults_are_envoy_like(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    cluster = config.cluster("api")
    assert cluster.health_check == HealthCheckConfig(
        mode="grpc",
        service="",
        rpc="watch",
        interval=5.0,
        timeout=1.0,
        unhealthy_threshold=3,
        healthy_threshold=2,
        jitter=0.1,
        unimplemented="healthy",
    )
    assert cluster.outlier_detection == OutlierConfig(
        consecutive_failures=5,
        failure_codes=(grpc.StatusCode.UNAVAILABLE,),
        base_ejection_time=30.0,
        max_ejection_time=300.0,
        max_ejection_percent=10.0,
    )
    assert cluster.slow_start.window == 0
    assert cluster.retries == RetryConfig(
        max_attempts=2, budget_percent=20, min_retry_concurrency=3, retry_buffer_bytes=1048576
    )
    assert cluster.panic_threshold == 0
    assert config.routes[0].retry_on == (grpc.StatusCode.UNAVAILABLE,)


def test_max_ejection_time_defaults_to_at_least_the_base(tmp_path: Path) -> None:
    text = MINIMAL + "[clusters.api.outlier_detection]\nbase_ejection_time = 600\n"
    cluster = load_config(write(tmp_path, text)).cluster("api")
    assert cluster.outlier_detection.max_ejection_time == 600


def test_an_empty_retry_on_turns_retries_off_for_the_route(tmp_path: Path) -> None:
    text = MINIMAL + '[[routes]]\ndefault = true\ncluster = "api"\nretry_on = []\n'
    assert load_config(write(tmp_path, text)).routes[0].retry_on == ()


def test_hashing_and_sticky(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        LISTENER
        + '[clusters.api]\nendpoints = ["h:1", "h:2"]\nstrategy = "maglev"\n'
        + '[clusters.api.params]\nhash_key = "x-session-id"\nfallback = "least_request"\n'
        + "table_size = 251\nseed = 3\n"
        + '[clusters.api.sticky]\nenabled = true\nkey = "x-pin"\n'
    )
    config = load_config(write(tmp_path, text))
    cluster = config.cluster("api")
    params = cluster.params
    assert (params.hash_on, params.hash_key, params.fallback, params.table_size) == (
        "metadata",
        "x-session-id",
        "least_request",
        251,
    )
    assert cluster.sticky == StickyConfig(enabled=True, key="x-pin", secret="")
    with_env = sticky_from_env(config, {"LBGW_STICKY_SECRET": "from-env"})
    assert with_env.cluster("api").sticky.secret == "from-env"
    assert sticky_from_env(config, {}) is config
    ring = LISTENER + '[clusters.api]\nendpoints = ["h:1"]\nstrategy = "ring_hash"\n'
    ring += 'params = { hash_on = "peer" }\n'
    params = load_config(write(tmp_path, ring)).cluster("api").params
    assert (params.hash_on, params.min_ring_size, params.max_ring_size) == ("peer", 1024, 8388608)


def test_the_environments_sticky_secret_wins_over_the_file(tmp_path: Path) -> None:
    text = MINIMAL + '[clusters.api.sticky]\nenabled = true\nsecret = "file"\n'
    config = load_config(write(tmp_path, text))
    assert config.cluster("api").sticky.secret == "file"
    env = {"LBGW_STICKY_SECRET": "env"}
    assert sticky_from_env(config, env).cluster("api").sticky.secret == "env"
