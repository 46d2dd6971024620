"""The configuration's model: frozen dataclasses whose fields carry their default and limits.

Each field is written once: its type, its default, and (in its ``Spec``,
see ``fields.py``) the range, choices or rule a file's value must meet. The
reader walks these classes; the README's example is checked against their
defaults. Layout of the TOML file::

    [server]      grace_period, drain_delay, workers, event_loop  (fields of Config)
    [[listeners]] address
    [limits]      max_receive_message_bytes, max_send_message_bytes, max_concurrent_streams,
                  max_connection_idle, max_connection_age, max_connection_age_grace,
                  max_calls_in_flight, request_header_timeout
    [log]         level, format
    [clusters.NAME]  endpoints, strategy, params, channel_options, methods, descriptor_sets,
                     reflection, panic_threshold, and the tables health_check, outlier_detection,
                     slow_start, retries, sticky, circuit_breakers, tls, dns (instead of endpoints)
    [[routes]]    one of method / service / package / default, cluster, retry_on
    [tracing]     service_name, exporter, endpoint, ... (see TracingConfig)
    [admin]       address, allow_remote, per_endpoint_metrics
"""

from __future__ import annotations

import enum
import ipaddress
import urllib.parse
from dataclasses import dataclass, field
from typing import Final

import grpc

from lbgw.config.fields import (
    Invalid,
    endpoint_address,
    is_metadata_key,
    is_method_name,
    listener_address,
    parse_address,
    spec,
)
from lbgw.config.grpc_args import GRPC_VERSION, KNOWN_ARGUMENTS
from lbgw.kernels import (
    MAX_ACTIVE_REQUEST_BIAS,
    MAX_RING_SIZE,
    MAX_TABLE_SIZE,
    MAX_WEIGHT,
    is_prime,
)


def _non_empty_path(text: str) -> None:
    if not text:
        raise Invalid("the path of a PEM file", text)


#: gRPC's own default for received messages, used both ways.
DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: Per call, the request bytes kept for a retry (Envoy's per-request buffer limit: 1 MiB).
DEFAULT_RETRY_BUFFER_BYTES: Final = 1024 * 1024
#: The event loops lbgw runs on; "auto": uvloop when it can be imported.
EVENT_LOOPS: Final = ("auto", "asyncio", "uvloop")
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
#: Envoy's default Maglev table size, a prime.
DEFAULT_TABLE_SIZE: Final = 65537
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
#: What a route matches on; a [[routes]] table names exactly one of them.
ROUTE_MATCHES: Final = ("method", "service", "package", "default")
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
MAX_WORKERS: Final = 256
_MAX_BSP_MS: Final = 3_600_000  # an hour
_MAX_BSP_QUEUE: Final = 1_000_000
#: An hour at most: gRPC turns a deadline years away into DEADLINE_EXCEEDED at once.
_MAX_HEALTH_SECONDS: Final = 3600
#: A day at most for the connection and stream limits (gRPC takes milliseconds as a C int).
_MAX_LIMIT_SECONDS: Final = 86_400
_EWMA: Final = ("ewma",)
_SEEDED: Final = ("random", "least_request", "ewma", *HASH_STRATEGIES)
#: Read as an array of status code names; a code named twice counts once.
_CODES: Final = spec(
    choices=tuple(STATUS_CODES), expected='an array of status code names such as "UNAVAILABLE"'
)


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


# -- TLS (issue 14): a listener's and a cluster's certificates ---------------------------------

_PEM_FILE: Final = "the path of a PEM file"


def _san(text: str) -> None:
    if not text or any(c.isspace() for c in text):
        raise Invalid('a subject alternative name such as "client.example.com"', text)


@dataclass(frozen=True, slots=True)
class ListenerTlsConfig:
    """``[[listeners]] tls = {...}``: TLS on a listener, mTLS with ``client_ca_file``.

    The files are read at start (an unreadable file, a key that does not
    match, an expired certificate stop lbgw) and again whenever they change,
    for new connections (``lbgw.tls``). grpcio can only require a client
    certificate or not ask for one, so ``client_ca_file`` and
    ``require_client_cert = true`` go together.
    """

    cert_file: str = field(metadata=spec(check=_non_empty_path, expected=_PEM_FILE))
    key_file: str = field(metadata=spec(check=_non_empty_path, expected=_PEM_FILE))
    #: The CA that client certificates must chain to (mTLS).
    client_ca_file: str = ""
    require_client_cert: bool = False
    #: Client certificates whose SANs include none of these get UNAUTHENTICATED.
    allowed_client_sans: tuple[str, ...] = field(
        default=(), metadata=spec(check=_san, expected="an array of names")
    )
    #: Send the verified client's subject and SANs to backends as x-forwarded-client-cert.
    forward_client_cert: bool = False


@dataclass(frozen=True, slots=True)
class ClusterTlsConfig:
    """``[clusters.NAME.tls]``: TLS to the cluster's endpoints, always verified.

    ``ca_file`` empty: gRPC's bundled roots. ``cert_file`` and ``key_file``
    (both or neither): the client certificate lbgw presents (mTLS).
    ``server_name``: the name verified in the backend's certificate, and sent
    as SNI and ``:authority`` (default: the endpoint's host).
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = field(metadata=spec(check=listener_address, expected="an address host:port"))
    tls: ListenerTlsConfig | None = None


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    address: str = field(metadata=spec(check=endpoint_address, expected="an address host:port"))
    weight: int = field(default=1, metadata=spec(low=1, high=MAX_WEIGHT))


def _prime(size: int) -> None:
    if not is_prime(size):
        raise Invalid(f"a prime number, such as {DEFAULT_TABLE_SIZE}", size)


@dataclass(frozen=True, slots=True)
class StrategyParams:
    """Strategy parameters; each is accepted only for the strategies in its ``variants``."""

    #: The EWMA time constant, seconds.
    decay: float = field(default=10.0, metadata=spec(positive=True, variants=_EWMA))
    #: A new endpoint's estimate, seconds.
    default_rtt: float = field(default=0.03, metadata=spec(positive=True, variants=_EWMA))
    #: "p2c" (two random candidates) or "best" (all).
    choice: str = field(default="p2c", metadata=spec(choices=("p2c", "best"), variants=_EWMA))
    active_request_bias: float = field(
        default=1.0, metadata=spec(high=MAX_ACTIVE_REQUEST_BIAS, variants=("least_request",))
    )
    #: A fixed seed for reproducible picks.
    seed: int | None = field(default=None, metadata=spec(low=0, high=2**64 - 1, variants=_SEEDED))
    #: "metadata", "peer" (client IP) or "method".
    hash_on: str = field(
        default="metadata", metadata=spec(choices=HASH_ON, variants=HASH_STRATEGIES)
    )
    #: The metadata key hashed, with hash_on = "metadata" (then required).
    hash_key: str = field(default="", metadata=spec(variants=HASH_STRATEGIES))
    #: The strategy for calls without the key.
    fallback: str = field(
        default="swrr",
        metadata=spec(
            choices=tuple(s for s in STRATEGIES if s not in HASH_STRATEGIES),
            variants=HASH_STRATEGIES,
        ),
    )
    #: Ring size bounds (Envoy's defaults); the ring has a point per endpoint at least.
    min_ring_size: int = field(
        default=1024, metadata=spec(low=1, high=MAX_RING_SIZE, variants=("ring_hash",))
    )
    max_ring_size: int = field(
        default=MAX_RING_SIZE,
        metadata=spec(floor="min_ring_size", high=MAX_RING_SIZE, variants=("ring_hash",)),
    )
    #: A prime, at least the number of endpoints.
    table_size: int = field(
        default=DEFAULT_TABLE_SIZE,
        metadata=spec(low=2, high=MAX_TABLE_SIZE, check=_prime, variants=("maglev",)),
    )


def _sticky_key(key: str) -> None:
    if not is_metadata_key(key) or key.endswith("-bin"):
        raise Invalid(
            "a metadata key of lower-case letters, digits, '-', '_' and '.', not ending "
            "in -bin nor starting with grpc-",
            key,
        )


@dataclass(frozen=True, slots=True)
class StickyConfig:
    """Sticky sessions: a signed token in the response pins a client to its endpoint.

    The token is an HMAC-SHA256 of the cluster and endpoint under ``secret``
    (or the ``LBGW_STICKY_SECRET`` variable), so lbgw replicas that share the
    secret honour each other's tokens and a client cannot forge one.
    """

    enabled: bool = False
    #: The metadata key of the token, both ways.
    key: str = field(default=DEFAULT_STICKY_KEY, metadata=spec(check=_sticky_key))
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

    #: grpc (grpc.health.v1), tcp (connect and close) or none.
    mode: str = field(default="grpc", metadata=spec(choices=HEALTH_MODES))
    service: str = ""  # grpc: the service to ask about; "" is the whole server
    #: grpc: "watch" (a stream of changes) or "check" (polled).
    rpc: str = field(default="watch", metadata=spec(choices=("watch", "check")))
    #: Seconds between checks (watch: between re-opened streams).
    interval: float = field(default=5.0, metadata=spec(positive=True, high=_MAX_HEALTH_SECONDS))
    #: Seconds a check may take.
    timeout: float = field(default=1.0, metadata=spec(positive=True, high=_MAX_HEALTH_SECONDS))
    unhealthy_threshold: int = field(default=3, metadata=spec(low=1, high=1000))
    healthy_threshold: int = field(default=2, metadata=spec(low=1, high=1000))
    #: Up to this fraction of interval is added to each wait.
    jitter: float = field(default=0.1, metadata=spec(high=1))
    #: grpc: a backend without the health service counts as this.
    unimplemented: str = field(default="healthy", metadata=spec(choices=("healthy", "unhealthy")))


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Passive ejection: consecutive failed calls take an endpoint out for a while.

    Envoy's defaults: 5 consecutive failures; ejected for 30 s x the number of
    times it was ejected, at most 300 s; at most 10% of the cluster ejected at
    once, but always at least one endpoint (Envoy and gRPC do the same).
    """

    #: 0 turns passive ejection off.
    consecutive_failures: int = field(default=5, metadata=spec(low=0, high=1_000_000))
    failure_codes: tuple[grpc.StatusCode, ...] = field(
        default=(grpc.StatusCode.UNAVAILABLE,), metadata=_CODES
    )
    base_ejection_time: float = field(default=30.0, metadata=spec(positive=True))
    #: At least base_ejection_time, and raised to it when unset.
    max_ejection_time: float = field(
        default=300.0, metadata=spec(positive=True, floor="base_ejection_time")
    )
    max_ejection_percent: float = field(default=10.0, metadata=spec(high=100))


@dataclass(frozen=True, slots=True)
class SlowStartConfig:
    """Envoy's slow start: weight x max(min_weight_percent, (t / window) ** (1 / aggression))."""

    window: float = 0.0  # seconds; 0 turns slow start off (Envoy's and NGINX's default)
    aggression: float = field(default=1.0, metadata=spec(positive=True))
    min_weight_percent: float = field(default=10.0, metadata=spec(positive=True, high=100))


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Safe retries: at most ``max_attempts`` attempts per call, on different endpoints.

    The retry budget is Envoy's: retries in flight stay within
    ``budget_percent`` of the cluster's active calls, or
    ``min_retry_concurrency``, whichever is larger.
    """

    #: Attempts in all, the first one included; 1 turns retries off.
    max_attempts: int = field(default=2, metadata=spec(low=1, high=5))
    budget_percent: float = field(default=20.0, metadata=spec(high=100))
    min_retry_concurrency: int = field(default=3, metadata=spec(low=0, high=1_000_000))
    #: The bytes of a streamed request (unknown kind, client streaming, bidi)
    #: kept per call so that a retry can replay them, until the backend's
    #: response headers come. Envoy's default per-request buffer limit is
    #: 1 MiB (``per_request_buffer_limit_bytes``); lbgw's is the same.
    #: 0: a streamed request is retried only before lbgw has read from it.
    retry_buffer_bytes: int = field(
        default=DEFAULT_RETRY_BUFFER_BYTES, metadata=spec(high=2**31 - 1)
    )


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Envoy's circuit breakers for a cluster, with Envoy's defaults.

    Past a limit, a call fails at once with ``UNAVAILABLE`` naming the
    cluster and the limit, and is not retried (Envoy: "circuit breaking",
    ``envoy.config.cluster.v3.CircuitBreakers.Thresholds``):

    * ``max_requests``: calls in flight to the cluster (1024);
    * ``max_pending_requests``: calls waiting for a connection, started while
      the endpoint's channel was not ready (1024);
    * ``max_retries``: retries in flight to the cluster (3), beside the retry
      budget, which bounds them as a share of the calls in flight.
    """

    max_requests: int = field(default=1024, metadata=spec(low=1, high=2**31 - 1))
    max_pending_requests: int = field(default=1024, metadata=spec(low=1, high=2**31 - 1))
    max_retries: int = field(default=3, metadata=spec(low=0, high=2**31 - 1))


def _stray_param(strategy: str, takes: list[str]) -> str:
    return f"a parameter of {strategy!r} ({', '.join(takes) or 'no parameters'})"


def _cluster_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise Invalid("a cluster name of letters, digits, '-', '_' and '.'")


def _channel_option(name: str) -> None:
    if not name.startswith("grpc."):
        raise Invalid("a gRPC channel argument name, such as grpc.keepalive_time_ms")
    # gRPC ignores a name it does not know: a misspelt one would do nothing.
    if name not in KNOWN_ARGUMENTS:
        raise Invalid(
            f"a channel argument grpc {GRPC_VERSION} knows (include/grpc/impl/"
            "channel_arg_names.h), such as grpc.keepalive_time_ms; this one is unknown"
        )


def _method_name(name: str) -> None:
    if not is_method_name(name):
        raise Invalid("a full method name /package.Service/Method")


#: DNS discovery: "a" resolves A and AAAA records (every address an endpoint of
#: weight 1, as Envoy's STRICT_DNS); "srv" takes the targets, ports and weights
#: of SRV records.
DNS_TYPES: Final = ("a", "srv")
#: Envoy's dns_refresh_rate default.
DEFAULT_DNS_REFRESH: Final = 5.0


def _dns_name(name: str) -> None:
    labels = name.rstrip(".").split(".")
    if (
        not name
        or len(name) > 253
        or not all(
            0 < len(label) <= 63 and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
            for label in labels
        )
    ):
        raise Invalid("a DNS name such as backends.prod.svc.cluster.local", name)


def _nameserver(text: str) -> None:
    try:
        host, port = parse_address(text)
        ipaddress.ip_address(host.strip("[]"))
        if port == 0:
            raise ValueError(text)
    except ValueError:
        expected = "an IP address and port, such as 10.0.0.10:53 or [fd00::a]:53"
        raise Invalid(expected, text) from None


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``[clusters.NAME.dns]``: the endpoints are what a DNS name resolves to, re-resolved.

    Envoy's ``STRICT_DNS`` in spirit: every ``refresh_interval`` seconds (or
    at the records' TTL, with ``respect_ttl``) the name is resolved again and
    the cluster follows the answer. A failed or empty answer keeps the last
    good set. ``nameservers`` unset: the system's (``/etc/resolv.conf``).
    """

    name: str = field(metadata=spec(check=_dns_name, expected="a DNS name"))
    #: The endpoints' port, for type "a" (then required); SRV records carry their own.
    port: int = field(default=0, metadata=spec(low=0, high=65535))
    #: "a" (A and AAAA records, weight 1 each) or "srv" (SRV: targets, ports, weights).
    type: str = field(default="a", metadata=spec(choices=DNS_TYPES))
    refresh_interval: float = field(
        default=DEFAULT_DNS_REFRESH, metadata=spec(positive=True, high=_MAX_HEALTH_SECONDS)
    )
    #: Re-resolve when the shortest TTL of the answer runs out (at least 1 s, at most
    #: refresh_interval), rather than every refresh_interval.
    respect_ttl: bool = False
    #: "IP:PORT" each; empty: the nameservers of /etc/resolv.conf.
    nameservers: tuple[str, ...] = field(
        default=(), metadata=spec(check=_nameserver, expected="an array of IP:PORT strings")
    )


def _descriptor_set(path: str) -> None:
    """A file protoc wrote with --descriptor_set_out, read now so a bad one stops the load."""
    from lbgw.descriptors import (  # noqa: PLC0415 - it imports this module
        DescriptorSetError,
        kinds_from_descriptor_set,
    )

    try:
        kinds_from_descriptor_set(path)
    except DescriptorSetError as exc:
        raise Invalid(str(exc)) from None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str = field(metadata=spec(check=_cluster_name))
    #: Required, unless the cluster has a [clusters.NAME.dns] table instead.
    endpoints: tuple[EndpointConfig, ...] = field(
        default=(),
        metadata=spec(
            nonempty=True, shorthand="address", expected="a non-empty array of endpoints"
        ),
    )
    strategy: str = field(default="swrr", metadata=spec(choices=STRATEGIES))
    params: StrategyParams = field(
        default_factory=StrategyParams,
        metadata=spec(variant="strategy", stray=_stray_param),
    )
    channel_options: tuple[tuple[str, int | str], ...] = field(
        default=(),
        metadata=spec(check=_channel_option, expected="a table of gRPC channel arguments"),
    )
    #: Full method name -> kind, for the handler form (unknown: stream_stream).
    methods: tuple[tuple[str, MethodKind], ...] = field(
        default=(), metadata=spec(check=_method_name, expected="a table of full method name = kind")
    )
    #: Files written by ``protoc --include_imports --descriptor_set_out``: more
    #: method kinds, after ``methods`` and before reflection's.
    descriptor_sets: tuple[str, ...] = field(
        default=(),
        metadata=spec(check=_descriptor_set, expected="an array of descriptor set file paths"),
    )
    #: Ask the endpoints' server reflection service for method kinds (best
    #: effort: at start-up, then in the background for an endpoint that could
    #: not be asked, and for each endpoint that joins).
    reflection: bool = True
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierConfig = field(default_factory=OutlierConfig)
    slow_start: SlowStartConfig = field(default_factory=SlowStartConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    sticky: StickyConfig = field(default_factory=StickyConfig)
    circuit_breakers: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    #: Envoy's panic threshold, in percent: below this share of healthy
    #: endpoints, route to all of them. 0 (the default) turns it off.
    panic_threshold: float = field(default=0.0, metadata=spec(high=100))
    #: TLS to the endpoints (issue 14); None: plaintext.
    tls: ClusterTlsConfig | None = None
    #: DNS discovery instead of a fixed list of endpoints: a table [clusters.NAME.dns],
    #: or an array [[clusters.NAME.dns]] of names whose answers are merged.
    dns: tuple[DnsConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Sends methods to a cluster.

    ``match`` is ``method``, ``service``, ``package`` or ``default``: in the
    file, the key a ``[[routes]]`` table names, with ``value`` its value.
    """

    match: str = field(metadata=spec(choices=ROUTE_MATCHES))
    value: str
    cluster: str = field(metadata=spec(expected="the name of a cluster"))
    #: Status codes retried on another endpoint (only before any response).
    retry_on: tuple[grpc.StatusCode, ...] = field(
        default=(grpc.StatusCode.UNAVAILABLE,), metadata=_CODES
    )


@dataclass(frozen=True, slots=True)
class Limits:
    max_receive_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata=spec(low=1, high=MAX_MESSAGE_BYTES)
    )
    max_send_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata=spec(low=1, high=MAX_MESSAGE_BYTES)
    )
    #: Per client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); a C int, as gRPC's
    #: channel argument. With gRPC's overload protection, a stream counts until lbgw has
    #: let go of it, so reset streams count too (rapid reset). Not NGINX's 128: a gRPC
    #: client opens a burst before it learns the limit, and past it streams are refused
    #: (docs/limits.md has the measurements).
    max_concurrent_streams: int = field(default=1000, metadata=spec(low=1, high=2**31 - 1))
    # -- connections and calls: lbgw's own limits, per listener connection (docs/limits.md)
    #: Seconds a client connection may stay without a call before lbgw sends GOAWAY
    #: (gRPC's MAX_CONNECTION_IDLE); NGINX's keepalive_timeout, 75. 0: no limit.
    max_connection_idle: float = field(default=75.0, metadata=spec(high=_MAX_LIMIT_SECONDS))
    #: Seconds a client connection may live before lbgw sends GOAWAY, +-10% jitter, so
    #: that long-lived clients rebalance across replicas (gRPC's MAX_CONNECTION_AGE);
    #: NGINX's keepalive_time, 3600. 0: no limit.
    max_connection_age: float = field(default=3600.0, metadata=spec(high=_MAX_LIMIT_SECONDS))
    #: Seconds the calls on a connection past its age get before it is closed
    #: (MAX_CONNECTION_AGE_GRACE); unset: gRPC's default, no limit.
    max_connection_age_grace: float | None = field(
        default=None, metadata=spec(high=_MAX_LIMIT_SECONDS)
    )
    #: Calls in flight in the whole gateway (each worker); past it, RESOURCE_EXHAUSTED.
    max_calls_in_flight: int = field(default=10_000, metadata=spec(low=1, high=2**31 - 1))
    #: Seconds a stream lbgw reads (client stream, bidi, a method of unknown kind) may
    #: stay after its HEADERS with no request message, no end of stream and no response
    #: headers from the backend; then it ends with DEADLINE_EXCEEDED. NGINX's
    #: client_header_timeout and client_body_timeout, 60. 0: no limit.
    request_header_timeout: float = field(default=60.0, metadata=spec(high=_MAX_LIMIT_SECONDS))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = field(default="info", metadata=spec(choices=LOG_LEVELS))
    format: str = field(default="json", metadata=spec(choices=LOG_FORMATS))


def _non_empty(text: str) -> None:
    if not text:
        raise Invalid("a non-empty string", text)


def _otlp_endpoint(text: str) -> None:
    try:
        url = urllib.parse.urlsplit(text)
        if url.scheme not in ("http", "https") or url.path not in ("", "/"):
            raise ValueError(text)
        _, port = parse_address(url.netloc)
        if port == 0 or url.query or url.fragment:
            raise ValueError(text)
    except ValueError:
        raise Invalid("a URL http://host:port or https://host:port", text) from None


def _otlp_protocol(protocol: str) -> None:
    if protocol in ("http/protobuf", "http/json"):
        raise Invalid("'grpc': lbgw exports OTLP over gRPC only", protocol)
    if protocol not in OTLP_PROTOCOLS:
        raise Invalid(f"one of {', '.join(map(repr, OTLP_PROTOCOLS))}", protocol)


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

    service_name: str = field(default="lbgw", metadata=spec(check=_non_empty))
    #: "otlp", "console", "none"; None: see above.
    exporter: str | None = field(default=None, metadata=spec(choices=TRACES_EXPORTERS))
    #: None: DEFAULT_OTLP_ENDPOINT.
    endpoint: str | None = field(default=None, metadata=spec(check=_otlp_endpoint))
    protocol: str = field(default="grpc", metadata=spec(check=_otlp_protocol))
    sampler: str = field(default="parentbased_always_on", metadata=spec(choices=TRACES_SAMPLERS))
    #: The ratio of the *traceidratio samplers, 0 to 1.
    sampler_arg: float = field(default=1.0, metadata=spec(high=1.0))
    #: The batch span processor's, as OpenTelemetry's defaults; the batch at most the queue.
    bsp_schedule_delay_ms: int = field(default=5000, metadata=spec(low=1, high=_MAX_BSP_MS))
    bsp_max_queue_size: int = field(default=2048, metadata=spec(low=1, high=_MAX_BSP_QUEUE))
    bsp_max_export_batch_size: int = field(default=512, metadata=spec(low=1, high=_MAX_BSP_QUEUE))
    bsp_export_timeout_ms: int = field(default=30000, metadata=spec(low=1, high=_MAX_BSP_MS))
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


def _admin_address(text: str) -> None:
    try:
        parse_address(text)
    except ValueError:
        raise Invalid("host:port, such as 127.0.0.1:9901 (IPv6 as [addr]:port)", text) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as in an address, IPv6 in brackets) is this machine only."""
    bare = host.removeprefix("[").removesuffix("]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin HTTP port (metrics, status page, drain, explain).

    Off unless ``address`` is set (or ``--admin``). A non-loopback address
    needs ``allow_remote = true``: the admin port can drain the gateway.
    """

    #: host:port; None: no admin server.
    address: str | None = field(default=None, metadata=spec(check=_admin_address))
    allow_remote: bool = False
    #: Per-endpoint labels on the upstream metrics (one series per endpoint: mind the cardinality).
    per_endpoint_metrics: bool = False


_SERVER: Final = "server"


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[ListenerConfig, ...] = field(
        metadata=spec(nonempty=True, expected="a non-empty array of tables [[listeners]]")
    )
    clusters: tuple[ClusterConfig, ...] = field(
        metadata=spec(keyed="name", nonempty=True, expected="at least one table [clusters.NAME]")
    )
    #: Read by ``rules.read_routes``: a table names its match by its key. Without
    #: [[routes]], a lone cluster takes every call.
    routes: tuple[RouteConfig, ...]
    limits: Limits = field(default_factory=Limits)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: Seconds that in-flight calls get on SIGTERM.
    grace_period: float = field(default=10.0, metadata=spec(table=_SERVER))
    #: Seconds between lbgw's health turning NOT_SERVING and its listeners
    #: closing, within the grace period: time for polling health checkers
    #: to see it. 0 closes them at once (as NGINX and HAProxy stop listening).
    drain_delay: float = field(default=0.0, metadata=spec(table=_SERVER))
    workers: int = field(default=1, metadata=spec(table=_SERVER, low=1, high=MAX_WORKERS))
    #: "auto": uvloop when it can be imported, else asyncio's own loop.
    event_loop: str = field(default="auto", metadata=spec(table=_SERVER, choices=EVENT_LOOPS))
    #: The file it was read from; the reader sets it, a file cannot.
    source: str = "<config>"

    def cluster(self, name: str) -> ClusterConfig:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)
