"""The gateway's configuration: read once from TOML, validated into frozen dataclasses.

Only this module and ``cli.py`` read files and the environment. Every check
happens here, at load time; a bad value raises ``ConfigError`` naming the file, the dotted key and
what was expected, so the rest of lbgw can trust what it is given. See the
README for a complete commented example.

Layout::

    [server]      grace_period, drain_delay, workers
    [[listeners]] address
    [limits]      max_receive_message_bytes, max_send_message_bytes, max_concurrent_streams
    [log]         level, format
    [clusters.NAME]  endpoints, strategy, params, channel_options, methods, reflection,
                     panic_threshold
    [clusters.NAME.health_check]       mode, service, rpc, interval, timeout, thresholds, ...
    [clusters.NAME.outlier_detection]  consecutive_failures, failure_codes, ejection times, ...
    [clusters.NAME.slow_start]         window, aggression, min_weight_percent
    [clusters.NAME.retries]            max_attempts, budget_percent, min_retry_concurrency
    [clusters.NAME.sticky]             enabled, key, secret
    [[routes]]    one of method / service / package / default, cluster, retry_on
    [tracing]     service_name, exporter, endpoint, protocol, sampler, sampler_arg,
                  bsp_schedule_delay_ms, bsp_max_queue_size, bsp_max_export_batch_size,
                  bsp_export_timeout_ms, health_checks

``tracing_from_env`` lays the standard OpenTelemetry variables over the
``[tracing]`` table (see ``TracingConfig``).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from lbgw.exceptions import ConfigError
from lbgw.kernels import MAX_ACTIVE_REQUEST_BIAS, MAX_BACKENDS, MAX_WEIGHT

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "STRATEGIES",
    "ClusterConfig",
    "Config",
    "EndpointConfig",
    "HealthCheckConfig",
    "Limits",
    "ListenerConfig",
    "LogConfig",
    "MethodKind",
    "OutlierConfig",
    "RetryConfig",
    "RouteConfig",
    "SlowStartConfig",
    "StickyConfig",
    "StrategyParams",
    "TracingConfig",
    "config_from_mapping",
    "is_metadata_key",
    "is_method_name",
    "load_config",
    "parse_address",
    "sticky_from_env",
    "tracing_from_env",
]

#: gRPC's own default for received messages, used both ways.
DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: The largest message size gRPC can carry (a signed 32-bit length).
MAX_MESSAGE_BYTES: Final = 2**31 - 1
STRATEGIES: Final = (
    "swrr",
    "ewma",
    "round_robin",
    "random",
    "least_request",
    "ring_hash",
    "maglev",
)
#: The consistent-hashing strategies: they pick by a key of the call.
HASH_STRATEGIES: Final = ("ring_hash", "maglev")
#: What the hashing strategies can hash: a metadata value, the client's IP, the method.
HASH_ON: Final = ("metadata", "peer", "method")
#: Envoy's bounds: ring sizes up to 8M points; Maglev tables up to 5,000,011 slots.
MAX_RING_SIZE: Final = 8 * 1024 * 1024
MAX_MAGLEV_TABLE: Final = 5_000_011
DEFAULT_STICKY_KEY: Final = "lbgw-sticky"
#: The environment variable that gives the sticky-token secret when the file does not.
STICKY_SECRET_ENV: Final = "LBGW_STICKY_SECRET"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "text")
HEALTH_MODES: Final = ("grpc", "tcp", "none")
#: Strategies whose picks follow weights, so that slow start can ramp them.
WEIGHTED_STRATEGIES: Final = ("swrr", "ewma", "random", "least_request")
#: Status codes by their names in config, e.g. "UNAVAILABLE".
STATUS_CODES: Final = {
    code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK
}
TRACES_EXPORTERS: Final = ("otlp", "console", "none")
OTLP_PROTOCOLS: Final = ("grpc",)
TRACES_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: OTLP/gRPC's well-known port on this host: OpenTelemetry's default endpoint.
DEFAULT_OTLP_ENDPOINT: Final = "http://localhost:4317"
_MAX_BSP_MS: Final = 3_600_000  # an hour
_MAX_BSP_QUEUE: Final = 1_000_000


class MethodKind(enum.Enum):
    """A method's cardinality; it chooses the handler form lbgw forwards with."""

    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    CLIENT_STREAMING = "client_streaming"
    BIDI_STREAMING = "bidi_streaming"

    @classmethod
    def of(cls, client_streaming: bool, server_streaming: bool) -> MethodKind:
        if client_streaming:
            return cls.BIDI_STREAMING if server_streaming else cls.CLIENT_STREAMING
        return cls.SERVER_STREAMING if server_streaming else cls.UNARY


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    address: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class StrategyParams:
    """Strategy parameters; each applies to the strategies named beside it."""

    decay: float = 10.0  # ewma: the EWMA time constant, seconds
    default_rtt: float = 0.03  # ewma: a new endpoint's estimate, seconds
    choice: str = "p2c"  # ewma: "p2c" (two random candidates) or "best" (all)
    active_request_bias: float = 1.0  # least_request
    seed: int | None = None  # random, least_request, ewma: a fixed seed for reproducible picks
    hash_on: str = "metadata"  # ring_hash, maglev: "metadata", "peer" (client IP) or "method"
    hash_key: str = ""  # ring_hash, maglev: the metadata key hashed, with hash_on = "metadata"
    fallback: str = "swrr"  # ring_hash, maglev: the strategy for calls without the key
    min_ring_size: int = 1024  # ring_hash (Envoy's default)
    max_ring_size: int = MAX_RING_SIZE  # ring_hash (Envoy's default)
    table_size: int = 65537  # maglev: a prime (Envoy's default)


_PARAMS_FOR: Final[Mapping[str, frozenset[str]]] = {
    "swrr": frozenset(),
    "round_robin": frozenset(),
    "random": frozenset({"seed"}),
    "least_request": frozenset({"active_request_bias", "seed"}),
    "ewma": frozenset({"decay", "default_rtt", "choice", "seed"}),
    "ring_hash": frozenset(
        {"hash_on", "hash_key", "fallback", "min_ring_size", "max_ring_size", "seed"}
    ),
    "maglev": frozenset({"hash_on", "hash_key", "fallback", "table_size", "seed"}),
}


@dataclass(frozen=True, slots=True)
class StickyConfig:
    """Sticky sessions: a signed token in the response pins a client to its endpoint.

    The token is an HMAC-SHA256 of the cluster and endpoint under ``secret``
    (or the ``LBGW_STICKY_SECRET`` variable), so lbgw replicas that share the
    secret honour each other's tokens and a client cannot forge one.
    """

    enabled: bool = False
    key: str = DEFAULT_STICKY_KEY  # the metadata key of the token, both ways
    secret: str = ""  # LBGW_STICKY_SECRET wins; neither: a random secret of this process


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health checking of each endpoint, off the request path.

    The defaults follow HAProxy's ``inter 2s fall 3 rise 2`` in spirit with
    Envoy-like names: a check every 5 s (plus up to 10% jitter), 1 s to
    answer, 3 failed checks to take an endpoint out, 2 passed checks to put it
    back. An explicit ``NOT_SERVING`` answer takes it out at once, and the
    first result after start-up decides at once, as in Envoy.
    """

    mode: str = "grpc"  # grpc (grpc.health.v1), tcp (connect and close) or none
    service: str = ""  # grpc: the service to ask about; "" is the whole server
    rpc: str = "watch"  # grpc: "watch" (a stream of changes) or "check" (polled)
    interval: float = 5.0  # seconds between checks (watch: between re-opened streams)
    timeout: float = 1.0  # seconds a check may take
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    jitter: float = 0.1  # up to this fraction of interval is added to each wait
    unimplemented: str = "healthy"  # grpc: a backend without the health service counts as ...


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive ejection: consecutive failed calls take an endpoint out for a while.

    Envoy's defaults: 5 consecutive failures; ejected for 30 s x the number of
    times it was ejected, at most 300 s; at most 10% of the cluster ejected at
    once, but always at least one endpoint (Envoy and gRPC do the same).
    """

    consecutive_failures: int = 5  # 0 turns passive ejection off
    failure_codes: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class SlowStartConfig:
    """Envoy's slow start: weight x max(min_weight_percent, (t / window) ** (1 / aggression))."""

    window: float = 0.0  # seconds; 0 turns slow start off (Envoy's and NGINX's default)
    aggression: float = 1.0
    min_weight_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Safe retries: at most ``max_attempts`` attempts per call, on different endpoints.

    The retry budget is Envoy's: retries in flight stay within
    ``budget_percent`` of the cluster's active calls, or
    ``min_retry_concurrency``, whichever is larger.
    """

    max_attempts: int = 2  # attempts in all, the first one included; 1 turns retries off
    budget_percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    endpoints: tuple[EndpointConfig, ...]
    strategy: str = "swrr"
    params: StrategyParams = field(default_factory=StrategyParams)
    channel_options: tuple[tuple[str, int | str], ...] = ()
    #: Full method name -> kind, for the handler form (unknown: stream_stream).
    methods: tuple[tuple[str, MethodKind], ...] = ()
    #: Ask the endpoints' server reflection service for method kinds at start-up.
    reflection: bool = False
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierConfig = field(default_factory=OutlierConfig)
    slow_start: SlowStartConfig = field(default_factory=SlowStartConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    sticky: StickyConfig = field(default_factory=StickyConfig)
    #: Envoy's panic threshold, in percent: below this share of healthy
    #: endpoints, route to all of them. 0 (the default) turns it off.
    panic_threshold: float = 0.0


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Sends methods to a cluster.

    ``match`` is ``method``, ``service``, ``package`` or ``default``.
    """

    match: str
    value: str
    cluster: str
    #: Status codes retried on another endpoint (only before any response).
    retry_on: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True, slots=True)
class Limits:
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_streams: int | None = None  # per client connection; None: gRPC's default


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``[tracing]``: OpenTelemetry spans, exported over OTLP/gRPC (to Jaeger, a collector).

    Each key mirrors a standard OpenTelemetry variable, and that variable,
    when set and not empty, wins over the file (``tracing_from_env``), so an
    operator can override a deployed file for one process:

    ==========================  ==================================================
    key                         variable
    ==========================  ==================================================
    service_name                OTEL_SERVICE_NAME
    exporter                    OTEL_TRACES_EXPORTER (OTEL_SDK_DISABLED=true: none)
    endpoint                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then
                                OTEL_EXPORTER_OTLP_ENDPOINT
    protocol                    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, then
                                OTEL_EXPORTER_OTLP_PROTOCOL
    sampler, sampler_arg        OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG
    bsp_schedule_delay_ms       OTEL_BSP_SCHEDULE_DELAY
    bsp_max_queue_size          OTEL_BSP_MAX_QUEUE_SIZE
    bsp_max_export_batch_size   OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    bsp_export_timeout_ms       OTEL_BSP_EXPORT_TIMEOUT
    health_checks               (none: file only)
    ==========================  ==================================================

    Tracing is off unless asked for, unlike OpenTelemetry's SDK, whose
    default exporter is ``otlp``: a gateway deployed without a collector
    would otherwise log export failures for ever. ``exporter`` unset
    (``None``) means ``"otlp"`` when an endpoint is set, in the file or the
    environment, and ``"none"`` otherwise; ``effective_exporter`` says which.
    An explicit ``exporter`` always wins over that, so a file that says
    ``"none"`` stays off when only an endpoint variable is set.

    ``endpoint`` is a URL, ``http://host:port`` (plaintext) or
    ``https://host:port`` (TLS), as the OTLP variables take it; unset, it is
    ``http://localhost:4317``. Only OTLP over gRPC is supported: lbgw ships
    no OTLP/HTTP exporter, so ``http/protobuf`` and ``http/json`` are
    refused at load time rather than silently sent over gRPC.

    The OTLP exporter itself still reads the variables lbgw does not model:
    ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``, ``..._CERTIFICATE``,
    ``..._COMPRESSION`` and ``..._TIMEOUT``.
    """

    service_name: str = "lbgw"
    exporter: str | None = None  # "otlp", "console", "none"; None: see above
    endpoint: str | None = None  # None: DEFAULT_OTLP_ENDPOINT
    protocol: str = "grpc"
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0  # the ratio of the *traceidratio samplers, 0 to 1
    bsp_schedule_delay_ms: int = 5000  # the batch span processor's, as OpenTelemetry's defaults
    bsp_max_queue_size: int = 2048
    bsp_max_export_batch_size: int = 512
    bsp_export_timeout_ms: int = 30000
    health_checks: bool = False  # trace the health checker's probes too

    @property
    def effective_exporter(self) -> str:
        """The exporter in use: ``exporter``, or ``otlp`` if an endpoint is set, else ``none``."""
        if self.exporter is not None:
            return self.exporter
        return "none" if self.endpoint is None else "otlp"

    @property
    def endpoint_url(self) -> str:
        return DEFAULT_OTLP_ENDPOINT if self.endpoint is None else self.endpoint


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    routes: tuple[RouteConfig, ...]
    limits: Limits = field(default_factory=Limits)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    grace_period: float = 10.0  # seconds that in-flight calls get on SIGTERM
    #: Seconds between lbgw's health turning NOT_SERVING and its listeners
    #: closing, within the grace period: time for polling health checkers
    #: to see it. 0 closes them at once (as NGINX and HAProxy stop listening).
    drain_delay: float = 0.0
    workers: int = 1
    source: str = "<config>"

    def cluster(self, name: str) -> ClusterConfig:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(source, "(file)", f"a readable TOML file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "(file)", f"UTF-8 text, as TOML requires ({exc})") from exc
    return config_from_mapping(data, source)


def config_from_mapping(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a mapping shaped like the TOML file (as ``tomllib`` returns it)."""
    return _Reader(source).config(data)


#: (variable, TracingConfig field); of two variables for one field, the first set wins.
_TRACING_ENV: Final = (
    ("OTEL_SERVICE_NAME", "service_name"),
    ("OTEL_TRACES_EXPORTER", "exporter"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "endpoint"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "protocol"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "protocol"),
    ("OTEL_TRACES_SAMPLER", "sampler"),
    ("OTEL_TRACES_SAMPLER_ARG", "sampler_arg"),
    ("OTEL_BSP_SCHEDULE_DELAY", "bsp_schedule_delay_ms"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "bsp_max_queue_size"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "bsp_max_export_batch_size"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "bsp_export_timeout_ms"),
)
_TRACING_INTEGERS: Final = frozenset(
    {
        "bsp_schedule_delay_ms",
        "bsp_max_queue_size",
        "bsp_max_export_batch_size",
        "bsp_export_timeout_ms",
    }
)


def tracing_from_env(config: TracingConfig, environ: Mapping[str, str]) -> TracingConfig:
    """``config`` with the standard OpenTelemetry variables of ``environ`` laid over it.

    A variable that is set and not empty wins over the file (see
    ``TracingConfig`` for the table). A bad value raises ``ConfigError``
    with source ``environment`` and the variable's name as the key.
    ``OTEL_SDK_DISABLED=true`` turns tracing off whatever else is set.
    """
    reader = _Reader("environment")
    data: dict[str, object] = {}
    keys: dict[str, str] = {}  # field -> the variable it came from, for errors
    for name, key in _TRACING_ENV:
        text = environ.get(name, "").strip()
        if not text or key in data:
            continue
        value: object = text
        if key in _TRACING_INTEGERS:
            value = _env_number(reader, name, text, integer=True)
        elif key == "sampler_arg":
            value = _env_number(reader, name, text, integer=False)
        elif key in ("exporter", "sampler", "protocol"):
            value = text.lower()
        data[key] = value
        keys[key] = name
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in ("", "true", "false"):
        raise reader.fail("OTEL_SDK_DISABLED", "true or false", disabled)
    if disabled == "true":
        data["exporter"] = "none"
        keys["exporter"] = "OTEL_SDK_DISABLED"
    if not data:
        return config
    merged = {name: getattr(config, name) for name in TracingConfig.__dataclass_fields__}
    merged.update(data)
    return reader.tracing_values(merged, lambda key: keys.get(key, f"tracing.{key}"))


def _env_number(reader: _Reader, name: str, text: str, *, integer: bool) -> object:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise reader.fail(name, "an integer" if integer else "a number", text) from None


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(text)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(text)
        ipaddress.IPv6Address(host[1:-1])
    elif ":" in host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(text)
    return host, port


class _Reader:
    """Walks the mapping with the dotted key of each value at hand, for errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: object = None) -> ConfigError:
        return ConfigError(self.source, key, expected, got)

    def table(self, value: object, key: str, allowed: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table", value)
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else name
                raise self.fail(where, f"one of the keys {', '.join(sorted(allowed))}")
        return value

    def integer(self, value: object, key: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"an integer from {low} to {high}", value)
        return value

    def number(self, value: object, key: str, *, positive: bool, high: float = math.inf) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            number = float(value)  # type: ignore[arg-type]
            ok = (number > 0 if positive else number >= 0) and number <= high
            ok = ok and math.isfinite(number)
        if not ok:
            bound = "a positive number" if positive else "a number >= 0"
            if high != math.inf:
                bound += f" up to {high}"
            raise self.fail(key, bound, value)
        return number

    def string(self, value: object, key: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str) or (choices and value not in choices):
            expected = f"one of {', '.join(map(repr, choices))}" if choices else "a string"
            raise self.fail(key, expected, value)
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def address(self, value: object, key: str, *, allow_port_0: bool) -> str:
        text = self.string(value, key)
        try:
            _, port = parse_address(text)
        except ValueError:
            raise self.fail(key, "an address host:port (IPv6 as [addr]:port)", value) from None
        if port == 0 and not allow_port_0:
            raise self.fail(key, "a port from 1 to 65535", value)
        return text

    def config(self, data: Mapping[str, Any]) -> Config:
        top = self.table(
            data,
            "",
            frozenset({"server", "listeners", "limits", "log", "clusters", "routes", "tracing"}),
        )
        server = self.table(
            top.get("server", {}), "server", frozenset({"grace_period", "drain_delay", "workers"})
        )
        grace = self.number(server.get("grace_period", 10.0), "server.grace_period", positive=False)
        drain_delay = self.number(
            server.get("drain_delay", 0.0), "server.drain_delay", positive=False
        )
        workers = self.integer(server.get("workers", 1), "server.workers", 1, 256)

        listeners_data = top.get("listeners")
        if not isinstance(listeners_data, list) or not listeners_data:
            raise self.fail("listeners", "a non-empty array of tables [[listeners]]")
        listeners = []
        for n, item in enumerate(listeners_data):
            key = f"listeners[{n}]"
            entry = self.table(item, key, frozenset({"address"}))
            if "address" not in entry:
                raise self.fail(f"{key}.address", "an address host:port")
            address = self.address(entry["address"], f"{key}.address", allow_port_0=True)
            listeners.append(ListenerConfig(address))

        limits = self.limits(top.get("limits", {}))
        log = self.table(top.get("log", {}), "log", frozenset({"level", "format"}))
        log_config = LogConfig(
            level=self.string(log.get("level", "info"), "log.level", LOG_LEVELS),
            format=self.string(log.get("format", "json"), "log.format", LOG_FORMATS),
        )

        clusters_data = top.get("clusters")
        if not isinstance(clusters_data, Mapping) or not clusters_data:
            raise self.fail("clusters", "at least one table [clusters.NAME]")
        clusters = tuple(self.cluster(name, value) for name, value in clusters_data.items())
        names = {c.name for c in clusters}

        routes = self.routes(top.get("routes"), names)
        tracing = self.tracing(top.get("tracing", {}))
        return Config(
            listeners=tuple(listeners),
            clusters=clusters,
            routes=routes,
            limits=limits,
            log=log_config,
            tracing=tracing,
            grace_period=grace,
            drain_delay=drain_delay,
            workers=workers,
            source=self.source,
        )

    def limits(self, value: object) -> Limits:
        keys = frozenset(
            {"max_receive_message_bytes", "max_send_message_bytes", "max_concurrent_streams"}
        )
        table = self.table(value, "limits", keys)
        streams = table.get("max_concurrent_streams")
        return Limits(
            max_receive_message_bytes=self.integer(
                table.get("max_receive_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
                "limits.max_receive_message_bytes",
                1,
                MAX_MESSAGE_BYTES,
            ),
            max_send_message_bytes=self.integer(
                table.get("max_send_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
                "limits.max_send_message_bytes",
                1,
                MAX_MESSAGE_BYTES,
            ),
            max_concurrent_streams=None
            if streams is None
            else self.integer(streams, "limits.max_concurrent_streams", 1, 2**31 - 1),
        )

    def tracing(self, value: object) -> TracingConfig:
        fields = TracingConfig.__dataclass_fields__
        table = self.table(value, "tracing", frozenset(fields))
        defaults = TracingConfig()
        values = {name: table.get(name, getattr(defaults, name)) for name in fields}
        return self.tracing_values(values, lambda key: f"tracing.{key}")

    def tracing_values(self, values: Mapping[str, Any], key: Callable[[str], str]) -> TracingConfig:
        """Check every ``TracingConfig`` field; ``key(field)`` names it in errors."""
        service_name = self.string(values["service_name"], key("service_name"))
        if not service_name:
            raise self.fail(key("service_name"), "a non-empty string", service_name)
        exporter = values["exporter"]
        if exporter is not None:
            exporter = self.string(exporter, key("exporter"), TRACES_EXPORTERS)
        endpoint = values["endpoint"]
        if endpoint is not None:
            endpoint = self.otlp_endpoint(endpoint, key("endpoint"))
        protocol = values["protocol"]
        if protocol in ("http/protobuf", "http/json"):
            raise self.fail(key("protocol"), "'grpc': lbgw exports OTLP over gRPC only", protocol)
        protocol = self.string(protocol, key("protocol"), OTLP_PROTOCOLS)
        sampler = self.string(values["sampler"], key("sampler"), TRACES_SAMPLERS)
        ratio = self.number(values["sampler_arg"], key("sampler_arg"), positive=False, high=1.0)
        queue = self.integer(
            values["bsp_max_queue_size"], key("bsp_max_queue_size"), 1, _MAX_BSP_QUEUE
        )
        batch = self.integer(
            values["bsp_max_export_batch_size"], key("bsp_max_export_batch_size"), 1, _MAX_BSP_QUEUE
        )
        if batch > queue:  # BatchSpanProcessor refuses it too
            queue_key, batch_key = key("bsp_max_queue_size"), key("bsp_max_export_batch_size")
            if batch_key.startswith("tracing.") and not queue_key.startswith("tracing."):
                # Only the queue size came from the environment: it is the one to blame.
                raise self.fail(queue_key, f"at least the export batch size, {batch}", queue)
            raise self.fail(batch_key, f"at most the queue size, {queue}", batch)
        return TracingConfig(
            service_name=service_name,
            exporter=exporter,
            endpoint=endpoint,
            protocol=protocol,
            sampler=sampler,
            sampler_arg=ratio,
            bsp_schedule_delay_ms=self.integer(
                values["bsp_schedule_delay_ms"], key("bsp_schedule_delay_ms"), 1, _MAX_BSP_MS
            ),
            bsp_max_queue_size=queue,
            bsp_max_export_batch_size=batch,
            bsp_export_timeout_ms=self.integer(
                values["bsp_export_timeout_ms"], key("bsp_export_timeout_ms"), 1, _MAX_BSP_MS
            ),
            health_checks=self.boolean(values["health_checks"], key("health_checks")),
        )

    def otlp_endpoint(self, value: object, key: str) -> str:
        text = self.string(value, key)
        try:
            url = urllib.parse.urlsplit(text)
            if url.scheme not in ("http", "https") or url.path not in ("", "/"):
                raise ValueError(text)
            _, port = parse_address(url.netloc)
            if port == 0 or url.query or url.fragment:
                raise ValueError(text)
        except ValueError:
            raise self.fail(key, "a URL http://host:port or https://host:port", value) from None
        return text

    def cluster(self, name: str, value: object) -> ClusterConfig:
        key = f"clusters.{name}"
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise self.fail(key, "a cluster name of letters, digits, '-', '_' and '.'")
        keys = frozenset(
            {
                "endpoints",
                "strategy",
                "params",
                "channel_options",
                "methods",
                "reflection",
                "health_check",
                "outlier_detection",
                "slow_start",
                "retries",
                "panic_threshold",
                "sticky",
            }
        )
        table = self.table(value, key, keys)
        strategy = self.string(table.get("strategy", "swrr"), f"{key}.strategy", STRATEGIES)

        endpoints_data = table.get("endpoints")
        if not isinstance(endpoints_data, list) or not endpoints_data:
            raise self.fail(f"{key}.endpoints", "a non-empty array of endpoints", endpoints_data)
        if len(endpoints_data) > MAX_BACKENDS:
            raise self.fail(f"{key}.endpoints", f"at most {MAX_BACKENDS} endpoints")
        endpoints = []
        seen: set[str] = set()
        for n, item in enumerate(endpoints_data):
            ekey = f"{key}.endpoints[{n}]"
            endpoint = self.endpoint(item, ekey)
            if endpoint.address in seen:
                raise self.fail(ekey, "each address once in a cluster", endpoint.address)
            seen.add(endpoint.address)
            endpoints.append(endpoint)

        params = self.params(table.get("params", {}), f"{key}.params", strategy, len(endpoints))

        options_data = table.get("channel_options", {})
        if not isinstance(options_data, Mapping):
            raise self.fail(f"{key}.channel_options", "a table of gRPC channel arguments")
        options: list[tuple[str, int | str]] = []
        for opt, val in options_data.items():
            okey = f"{key}.channel_options.{opt!r}"
            if not opt.startswith("grpc."):
                raise self.fail(
                    okey, "a gRPC channel argument name, such as grpc.keepalive_time_ms"
                )
            if isinstance(val, bool) or not isinstance(val, int | str):
                raise self.fail(okey, "an integer or a string", val)
            options.append((opt, val))

        methods_data = table.get("methods", {})
        if not isinstance(methods_data, Mapping):
            raise self.fail(f"{key}.methods", "a table of full method name = kind")
        kinds = tuple(k.value for k in MethodKind)
        methods = []
        for method, kind in methods_data.items():
            mkey = f"{key}.methods.{method!r}"
            if not is_method_name(method):
                raise self.fail(mkey, "a full method name /package.Service/Method")
            methods.append((method, MethodKind(self.string(kind, mkey, kinds))))

        reflection = self.boolean(table.get("reflection", False), f"{key}.reflection")
        slow_start = self.slow_start(table.get("slow_start", {}), f"{key}.slow_start")
        if slow_start.window > 0 and strategy not in WEIGHTED_STRATEGIES:
            raise self.fail(
                f"{key}.slow_start.window",
                f"0 for strategy {strategy!r}, which does not pick by weight "
                f"(slow start works with {', '.join(WEIGHTED_STRATEGIES)})",
                slow_start.window,
            )
        return ClusterConfig(
            name=name,
            endpoints=tuple(endpoints),
            strategy=strategy,
            params=params,
            channel_options=tuple(options),
            methods=tuple(methods),
            reflection=reflection,
            health_check=self.health_check(table.get("health_check", {}), f"{key}.health_check"),
            outlier_detection=self.outlier(
                table.get("outlier_detection", {}), f"{key}.outlier_detection"
            ),
            slow_start=slow_start,
            retries=self.retries(table.get("retries", {}), f"{key}.retries"),
            sticky=self.sticky(table.get("sticky", {}), f"{key}.sticky"),
            panic_threshold=self.number(
                table.get("panic_threshold", 0.0),
                f"{key}.panic_threshold",
                positive=False,
                high=100,
            ),
        )

    def codes(self, value: object, key: str) -> tuple[grpc.StatusCode, ...]:
        if not isinstance(value, list):
            raise self.fail(key, 'an array of status code names such as "UNAVAILABLE"', value)
        codes = []
        for n, name in enumerate(value):
            codes.append(STATUS_CODES[self.string(name, f"{key}[{n}]", tuple(STATUS_CODES))])
        return tuple(dict.fromkeys(codes))

    def health_check(self, value: object, key: str) -> HealthCheckConfig:
        d = HealthCheckConfig()
        table = self.table(value, key, frozenset(f.name for f in dataclasses.fields(d)))
        # An hour at most: gRPC turns a deadline years away into DEADLINE_EXCEEDED at once.
        interval = self.number(
            table.get("interval", d.interval), f"{key}.interval", positive=True, high=3600
        )
        timeout = self.number(
            table.get("timeout", d.timeout), f"{key}.timeout", positive=True, high=3600
        )
        return HealthCheckConfig(
            mode=self.string(table.get("mode", d.mode), f"{key}.mode", HEALTH_MODES),
            service=self.string(table.get("service", d.service), f"{key}.service"),
            rpc=self.string(table.get("rpc", d.rpc), f"{key}.rpc", ("watch", "check")),
            interval=interval,
            timeout=timeout,
            unhealthy_threshold=self.integer(
                table.get("unhealthy_threshold", d.unhealthy_threshold),
                f"{key}.unhealthy_threshold",
                1,
                1000,
            ),
            healthy_threshold=self.integer(
                table.get("healthy_threshold", d.healthy_threshold),
                f"{key}.healthy_threshold",
                1,
                1000,
            ),
            jitter=self.number(
                table.get("jitter", d.jitter), f"{key}.jitter", positive=False, high=1
            ),
            unimplemented=self.string(
                table.get("unimplemented", d.unimplemented),
                f"{key}.unimplemented",
                ("healthy", "unhealthy"),
            ),
        )

    def outlier(self, value: object, key: str) -> OutlierConfig:
        d = OutlierConfig()
        table = self.table(value, key, frozenset(f.name for f in dataclasses.fields(d)))
        base = self.number(
            table.get("base_ejection_time", d.base_ejection_time),
            f"{key}.base_ejection_time",
            positive=True,
        )
        longest = self.number(
            table.get("max_ejection_time", max(base, d.max_ejection_time)),
            f"{key}.max_ejection_time",
            positive=True,
        )
        if longest < base:
            raise self.fail(
                f"{key}.max_ejection_time", f"at least base_ejection_time ({base})", longest
            )
        return OutlierConfig(
            consecutive_failures=self.integer(
                table.get("consecutive_failures", d.consecutive_failures),
                f"{key}.consecutive_failures",
                0,
                1_000_000,
            ),
            failure_codes=self.codes(
                table.get("failure_codes", [c.name for c in d.failure_codes]),
                f"{key}.failure_codes",
            ),
            base_ejection_time=base,
            max_ejection_time=longest,
            max_ejection_percent=self.number(
                table.get("max_ejection_percent", d.max_ejection_percent),
                f"{key}.max_ejection_percent",
                positive=False,
                high=100,
            ),
        )

    def slow_start(self, value: object, key: str) -> SlowStartConfig:
        d = SlowStartConfig()
        table = self.table(value, key, frozenset(f.name for f in dataclasses.fields(d)))
        return SlowStartConfig(
            window=self.number(table.get("window", d.window), f"{key}.window", positive=False),
            aggression=self.number(
                table.get("aggression", d.aggression), f"{key}.aggression", positive=True
            ),
            min_weight_percent=self.number(
                table.get("min_weight_percent", d.min_weight_percent),
                f"{key}.min_weight_percent",
                positive=True,
                high=100,
            ),
        )

    def sticky(self, value: object, key: str) -> StickyConfig:
        d = StickyConfig()
        table = self.table(value, key, frozenset(f.name for f in dataclasses.fields(d)))
        token_key = self.string(table.get("key", d.key), f"{key}.key")
        if not is_metadata_key(token_key) or token_key.endswith("-bin"):
            raise self.fail(
                f"{key}.key",
                "a metadata key of lower-case letters, digits, '-', '_' and '.', not ending "
                "in -bin nor starting with grpc-",
                token_key,
            )
        return StickyConfig(
            enabled=self.boolean(table.get("enabled", d.enabled), f"{key}.enabled"),
            key=token_key,
            secret=self.string(table.get("secret", d.secret), f"{key}.secret"),
        )

    def retries(self, value: object, key: str) -> RetryConfig:
        d = RetryConfig()
        table = self.table(value, key, frozenset(f.name for f in dataclasses.fields(d)))
        return RetryConfig(
            max_attempts=self.integer(
                table.get("max_attempts", d.max_attempts), f"{key}.max_attempts", 1, 5
            ),
            budget_percent=self.number(
                table.get("budget_percent", d.budget_percent),
                f"{key}.budget_percent",
                positive=False,
                high=100,
            ),
            min_retry_concurrency=self.integer(
                table.get("min_retry_concurrency", d.min_retry_concurrency),
                f"{key}.min_retry_concurrency",
                0,
                1_000_000,
            ),
        )

    def endpoint(self, value: object, key: str) -> EndpointConfig:
        if isinstance(value, str):
            return EndpointConfig(self.address(value, key, allow_port_0=False))
        table = self.table(value, key, frozenset({"address", "weight"}))
        if "address" not in table:
            raise self.fail(f"{key}.address", "an address host:port")
        return EndpointConfig(
            address=self.address(table["address"], f"{key}.address", allow_port_0=False),
            weight=self.integer(table.get("weight", 1), f"{key}.weight", 1, MAX_WEIGHT),
        )

    def params(
        self, value: object, key: str, strategy: str, n_endpoints: int = 1
    ) -> StrategyParams:
        allowed = _PARAMS_FOR[strategy]
        if isinstance(value, Mapping):
            for name in value:
                if name not in allowed:
                    takes = ", ".join(sorted(allowed)) if allowed else "no parameters"
                    raise self.fail(f"{key}.{name}", f"a parameter of {strategy!r} ({takes})")
        table = self.table(value, key, allowed)
        defaults = StrategyParams()
        seed = table.get("seed")
        return StrategyParams(
            decay=self.number(table.get("decay", defaults.decay), f"{key}.decay", positive=True),
            default_rtt=self.number(
                table.get("default_rtt", defaults.default_rtt), f"{key}.default_rtt", positive=True
            ),
            choice=self.string(
                table.get("choice", defaults.choice), f"{key}.choice", ("p2c", "best")
            ),
            active_request_bias=self.number(
                table.get("active_request_bias", defaults.active_request_bias),
                f"{key}.active_request_bias",
                positive=False,
                high=MAX_ACTIVE_REQUEST_BIAS,
            ),
            seed=None if seed is None else self.integer(seed, f"{key}.seed", 0, 2**64 - 1),
            **self.hashing(table, key, strategy, n_endpoints),
        )

    def hashing(
        self, table: Mapping[str, Any], key: str, strategy: str, n_endpoints: int
    ) -> dict[str, Any]:
        """The parameters of ``ring_hash`` and ``maglev``; {} for other strategies."""
        if strategy not in HASH_STRATEGIES:
            return {}
        d = StrategyParams()
        hash_on = self.string(table.get("hash_on", d.hash_on), f"{key}.hash_on", HASH_ON)
        hash_key = table.get("hash_key", "")
        if hash_on == "metadata":
            if not isinstance(hash_key, str) or not is_metadata_key(hash_key):
                raise self.fail(
                    f"{key}.hash_key",
                    'a metadata key such as "x-session-id" (hash_on = "metadata")',
                    hash_key or None,
                )
        elif "hash_key" in table:
            raise self.fail(f"{key}.hash_key", f'no hash_key with hash_on = "{hash_on}"')
        fallback = self.string(
            table.get("fallback", d.fallback),
            f"{key}.fallback",
            tuple(s for s in STRATEGIES if s not in HASH_STRATEGIES),
        )
        out: dict[str, Any] = {"hash_on": hash_on, "hash_key": hash_key, "fallback": fallback}
        if strategy == "ring_hash":
            low = self.integer(
                table.get("min_ring_size", d.min_ring_size),
                f"{key}.min_ring_size",
                1,
                MAX_RING_SIZE,
            )
            high = self.integer(
                table.get("max_ring_size", max(low, d.max_ring_size)),
                f"{key}.max_ring_size",
                low,
                MAX_RING_SIZE,
            )
            if high < n_endpoints:
                raise self.fail(
                    f"{key}.max_ring_size",
                    f"at least the number of endpoints ({n_endpoints}), one point each",
                    high,
                )
            out.update(min_ring_size=low, max_ring_size=high)
        else:
            size = table.get("table_size", d.table_size)
            if not (isinstance(size, int) and not isinstance(size, bool) and _is_prime(size)):
                raise self.fail(f"{key}.table_size", "a prime number, such as 65537", size)
            out["table_size"] = self.integer(
                size, f"{key}.table_size", max(2, n_endpoints), MAX_MAGLEV_TABLE
            )
        return out

    def routes(self, value: object, clusters: set[str]) -> tuple[RouteConfig, ...]:
        if value is None:
            if len(clusters) == 1:  # one cluster and no routes: it takes every call
                return (RouteConfig("default", "", next(iter(clusters))),)
            raise self.fail(
                "routes", "an array of tables [[routes]] when there are two or more clusters"
            )
        if not isinstance(value, list) or not value:
            raise self.fail("routes", "a non-empty array of tables [[routes]]", value)
        routes = []
        seen: set[tuple[str, str]] = set()
        for n, item in enumerate(value):
            key = f"routes[{n}]"
            table = self.table(
                item,
                key,
                frozenset({"method", "service", "package", "default", "cluster", "retry_on"}),
            )
            matches = [m for m in ("method", "service", "package", "default") if m in table]
            if len(matches) != 1:
                raise self.fail(key, "exactly one of method, service, package or default = true")
            match = matches[0]
            if match == "default":
                if table["default"] is not True:
                    raise self.fail(f"{key}.default", "true", table["default"])
                text = ""
            else:
                text = self.string(table[match], f"{key}.{match}")
                if match == "method" and not is_method_name(text):
                    raise self.fail(f"{key}.method", "a full method name /package.Service/Method")
                if match in ("service", "package") and not _is_dotted(text):
                    raise self.fail(f"{key}.{match}", "a dotted name such as pkg.v1.Service", text)
            if "cluster" not in table:
                raise self.fail(f"{key}.cluster", "the name of a cluster")
            cluster = self.string(table["cluster"], f"{key}.cluster")
            if cluster not in clusters:
                raise self.fail(
                    f"{key}.cluster", f"one of the clusters {', '.join(sorted(clusters))}", cluster
                )
            if (match, text) in seen:
                raise self.fail(key, f"each {match} routed once", text or True)
            seen.add((match, text))
            retry_on = self.codes(table.get("retry_on", ["UNAVAILABLE"]), f"{key}.retry_on")
            routes.append(RouteConfig(match, text, cluster, retry_on))
        return tuple(routes)


def _is_dotted(text: str) -> bool:
    return bool(text) and all(part and part.replace("_", "a").isalnum() for part in text.split("."))


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def is_metadata_key(text: str) -> bool:
    """Whether ``text`` is a custom gRPC metadata key: lower case, not ``grpc-`` nor ``:``."""
    return (
        bool(text)
        and all(c.isascii() and (c.islower() or c.isdigit() or c in "-_.") for c in text)
        and not text.startswith("grpc-")
    )


def sticky_from_env(config: Config, environ: Mapping[str, str]) -> Config:
    """``config`` with ``LBGW_STICKY_SECRET``, when set, as every sticky cluster's secret.

    The variable wins over the file, as the ``OTEL_*`` variables do, so a
    secret injected into the environment (a Kubernetes Secret, say) replaces
    a placeholder left in a shared file.
    """
    secret = environ.get(STICKY_SECRET_ENV, "")
    if not secret:
        return config
    clusters = tuple(
        dataclasses.replace(c, sticky=dataclasses.replace(c.sticky, secret=secret))
        if c.sticky.enabled
        else c
        for c in config.clusters
    )
    return dataclasses.replace(config, clusters=clusters)


def is_method_name(text: str) -> bool:
    """Whether ``text`` is a full gRPC method name, ``/package.Service/Method``."""
    if not text.startswith("/") or text.count("/") != 2:
        return False
    service, method = text[1:].split("/")
    return _is_dotted(service) and bool(method) and method.replace("_", "a").isalnum()
