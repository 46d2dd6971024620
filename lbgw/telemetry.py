"""Tracing: OpenTelemetry spans for every hop, with the routing decision, over OTLP/gRPC.

This module owns lbgw's tracer provider (built from ``TracingConfig``), W3C
context propagation over gRPC metadata, the few span helpers the health
checker calls, and ``TracedCall``, through which the proxy picks for a
traced call: it explains the pick (``Cluster.decide(..., explain=True)``)
and opens each attempt's span with the ``Decision``'s attributes
(``decision_of``). It never touches OpenTelemetry's global provider or
propagator: a ``Telemetry`` carries its own, so tests and several gateways
in one process do not see each other's spans.

A forwarded call makes one SERVER span for the client's call and one CLIENT
span per attempt at a backend, its child. ``TracedCall`` does this; by hand::

    parent = telemetry.extract(context.invocation_metadata())  # the client's traceparent
    call_span = telemetry.server_span(method, context.peer(), parent)
    decision = decision_attributes(cluster, strategy, address, candidates=..., pick_ns=...)
    attempt = telemetry.attempt_span(call_span, method, address, 1, None, decision=decision)
    metadata = telemetry.inject(metadata, with_span(attempt, parent))  # to the backend
    ...
    end_span(attempt, backend_code, details)
    end_span(call_span, code_to_client, details)

Spans are passed by hand, never made "current" (no context attach), so
nothing leaks between the calls that share an event loop. With tracing off
(``exporter = "none"``), ``telemetry.enabled`` is False: the proxy checks it
once per call and skips all of the above, and ``inject`` and ``extract``
pass the metadata through untouched, so the client's trace context reaches
the backend as any other metadata does. A call the sampler drops gets a
non-recording span: its helpers return at once and compute nothing.

Span names follow the RPC semantic conventions: the full method without its
leading slash, ``lbgw.echo.v1.Echo/Unary``, for both kinds. Attributes:

==========================  ======  ========  =================================================
attribute                   span    type      meaning
==========================  ======  ========  =================================================
rpc.system                  both    string    ``grpc``
rpc.service                 both    string    ``lbgw.echo.v1.Echo``
rpc.method                  both    string    ``Unary``
rpc.grpc.status_code        both    int       the call's status code (``end_span``)
network.peer.address        server  string    the client's address (``::1`` without brackets,
                                              or a unix socket path)
network.peer.port           server  int       the client's port, for TCP peers
server.address              client  string    the backend endpoint's host
server.port                 client  int       the backend endpoint's port
lb.attempt                  client  int       1 for the first try at a backend, 2 for the
                                              first retry, ...
lb.retry_reason             client  string    why the previous attempt failed (a status
                                              name such as ``UNAVAILABLE``); absent on the
                                              first attempt
lb.cluster                  client  string    the cluster the route chose
lb.route                    client  string    the route that matched: ``method /p.S/M``,
                                              ``service p.S``, ``package p`` or ``default``
lb.strategy                 client  string    the cluster's picking strategy, e.g. ``ewma``
lb.endpoint                 client  string    the endpoint picked, ``host:port``; absent when
                                              none was eligible
lb.candidate_scores         client  string    JSON object: each endpoint the picker compared
                                              (two for a power-of-two-choices pick) -> its
                                              figures, ``{"10.0.0.1:50051": {"cost": 3.1,
                                              "in_flight": 2}, ...}``
lb.skipped                  client  string[]  endpoints left out of this pick
lb.skipped_reasons          client  string[]  why, index by index with ``lb.skipped``:
                                              ``ejected``, ``not_serving``, ``draining``,
                                              ``tried`` (by an earlier attempt), ...
lb.pick_duration_ns         client  int       the pick's own time, nanoseconds
lb.hash_key                 client  string    the key a hashing or affinity pick used
lb.ring_position            client  int       where the key fell on a hash ring
lb.fallback                 client  string    why the usual choice was not taken (e.g. the
                                              pinned endpoint was ejected); absent otherwise
==========================  ======  ========  =================================================

``lb.candidate_scores`` is one JSON string, not parallel arrays: Jaeger shows
a tag whose value is a JSON object as an expandable, formatted object,
while an array attribute reaches it as a flat JSON list, which would split
each address from its figures. There is no separate array of the
candidates' addresses: at 100% sampling, each array attribute costs about
10 us a call to validate and encode, and the JSON object names them.

Statuses follow the gRPC conventions: a SERVER span is an error only for
``UNKNOWN``, ``DEADLINE_EXCEEDED``, ``UNIMPLEMENTED``, ``INTERNAL``,
``UNAVAILABLE`` and ``DATA_LOSS`` (the others are the client's doing); a
CLIENT span is an error for every code but ``OK``.

Health-check probes are traced only with ``health_checks = true``: each is a
root CLIENT span ``grpc.health.v1.Health/Check`` (``health_check_span``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, TypeAlias

import grpc
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.version import __version__ as _sdk_version
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from lbgw import __version__
from lbgw.config import TracingConfig, parse_address
from lbgw.decision import Decision
from lbgw.exceptions import NoEligibleEndpointError

if TYPE_CHECKING:
    from grpc import aio

    from lbgw.cluster import Target
    from lbgw.endpoints import Endpoint

    _Context: TypeAlias = aio.ServicerContext[Any, Any]

__all__ = [
    "HEALTH_CHECK_SPAN",
    "LB_ATTEMPT",
    "LB_CANDIDATE_SCORES",
    "LB_CLUSTER",
    "LB_ENDPOINT",
    "LB_FALLBACK",
    "LB_HASH_KEY",
    "LB_PICK_DURATION_NS",
    "LB_RETRY_REASON",
    "LB_RING_POSITION",
    "LB_ROUTE",
    "LB_SKIPPED",
    "LB_SKIPPED_REASONS",
    "LB_STRATEGY",
    "PROPAGATED_KEYS",
    "Candidates",
    "Telemetry",
    "TracedCall",
    "decision_attributes",
    "decision_of",
    "end_span",
    "parse_peer",
    "record_decision",
    "with_span",
]

LB_CLUSTER: Final = "lb.cluster"
LB_ROUTE: Final = "lb.route"
LB_STRATEGY: Final = "lb.strategy"
LB_ENDPOINT: Final = "lb.endpoint"
LB_CANDIDATE_SCORES: Final = "lb.candidate_scores"
LB_SKIPPED: Final = "lb.skipped"
LB_SKIPPED_REASONS: Final = "lb.skipped_reasons"
LB_PICK_DURATION_NS: Final = "lb.pick_duration_ns"
LB_HASH_KEY: Final = "lb.hash_key"
LB_RING_POSITION: Final = "lb.ring_position"
LB_FALLBACK: Final = "lb.fallback"
LB_ATTEMPT: Final = "lb.attempt"
LB_RETRY_REASON: Final = "lb.retry_reason"

RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
HEALTH_CHECK_METHOD: Final = "/grpc.health.v1.Health/Check"
HEALTH_CHECK_SPAN: Final = "grpc.health.v1.Health/Check"

#: The metadata keys that W3C propagation owns: ``inject`` replaces the client's.
PROPAGATED_KEYS: Final = frozenset({"traceparent", "tracestate", "baggage"})

#: Codes that make a SERVER span an error (the gRPC semantic conventions).
_SERVER_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]
#: (address, its figures such as ``{"ewma_ms": 3.1, "in_flight": 2}``) per candidate.
Candidates: TypeAlias = Sequence[tuple[str, Mapping[str, float | int]]]
Skipped: TypeAlias = Sequence[tuple[str, str]]

_P = ParamSpec("_P")
log = logging.getLogger("lbgw.telemetry")

_ROOT: Final = Context()
# Bounds the per-method and per-address caches: a client that invents
# method names cannot grow lbgw's memory through them.
_CACHE_SIZE: Final = 4096


class _MetadataGetter(Getter[Metadata]):
    """Reads gRPC metadata tuples; ``-bin`` (bytes) values are never trace context."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


class _MetadataSetter(Setter[list[tuple[str, str | bytes]]]):
    def set(self, carrier: list[tuple[str, str | bytes]], key: str, value: str) -> None:
        carrier.append((key, value))


_GETTER: Final = _MetadataGetter()
_SETTER: Final = _MetadataSetter()
_PROPAGATOR: Final = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _rpc(method: str) -> tuple[str, Mapping[str, str]]:
    """``/pkg.Svc/M`` -> the span name ``pkg.Svc/M`` and its ``rpc.*`` attributes."""
    name = method[1:] if method.startswith("/") else method
    service, sep, short = name.partition("/")
    attributes = {"rpc.system": "grpc"}
    if sep and service and short:
        attributes["rpc.service"] = service
        attributes["rpc.method"] = short
    return name or "unknown", MappingProxyType(attributes)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _server(address: str) -> Mapping[str, str | int]:
    """An endpoint ``host:port`` -> ``server.address`` (no IPv6 brackets) and ``server.port``."""
    try:
        host, port = parse_address(address)
    except ValueError:
        return MappingProxyType({"server.address": address})
    host = host[1:-1] if host.startswith("[") else host
    return MappingProxyType({"server.address": host, "server.port": port})


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _peer(peer: str) -> Mapping[str, str | int]:
    """A gRPC peer string -> ``network.peer.address`` and ``network.peer.port``."""
    address, port = parse_peer(peer)
    if port is None:
        return MappingProxyType({"network.peer.address": address})
    return MappingProxyType({"network.peer.address": address, "network.peer.port": port})


def parse_peer(peer: str) -> tuple[str, int | None]:
    """A gRPC peer string -> (address, port or None).

    ``ipv4:127.0.0.1:5555`` -> ``("127.0.0.1", 5555)``; ``ipv6:[::1]:5555``,
    which grpcio percent-encodes as ``ipv6:%5B::1%5D:5555``, -> ``("::1",
    5555)``; ``unix:/run/lbgw.sock`` -> ``("/run/lbgw.sock", None)``.
    """
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return peer, None
    rest = urllib.parse.unquote(rest)
    if scheme in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isascii() and port.isdigit():
            return host.removeprefix("[").removesuffix("]"), int(port)
    return rest, None


def with_span(span: Span, parent: Context) -> Context:
    """``parent`` (the client's context and baggage) with ``span`` as its span, for ``inject``."""
    return trace.set_span_in_context(span, parent)


class Telemetry:
    """A tracer provider from a ``TracingConfig``, and the span helpers over it.

    ``Telemetry(config)`` with exporter ``none`` builds nothing and is
    disabled (``enabled`` False). Otherwise it builds a ``TracerProvider``
    with resource ``service.name``, the configured sampler and a
    ``BatchSpanProcessor`` feeding the OTLP/gRPC exporter (or the console
    exporter). ``processor`` replaces that processor, e.g. for tests; see
    ``for_testing``. The owner calls ``shutdown()`` once, to flush.
    """

    __slots__ = ("_provider", "_tracer", "config", "enabled", "exporter", "health_checks")

    def __init__(self, config: TracingConfig, *, processor: SpanProcessor | None = None) -> None:
        self.config = config
        self.exporter = config.effective_exporter if processor is None else "custom"
        self.enabled = self.exporter != "none"
        self.health_checks = self.enabled and config.health_checks
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if not self.enabled:
            return
        if processor is None:
            processor = _batch_processor(config)
        # shutdown_on_exit=False: no atexit hook per instance; the owner shuts it down.
        provider = TracerProvider(
            sampler=_sampler(config), resource=_resource(config), shutdown_on_exit=False
        )
        provider.add_span_processor(processor)
        self._provider = provider
        self._tracer = provider.get_tracer("lbgw", __version__)

    @classmethod
    def for_testing(cls, exporter: SpanExporter, config: TracingConfig | None = None) -> Telemetry:
        """Spans go to ``exporter`` (an ``InMemorySpanExporter``, say) as each one ends.

        ``config`` gives the sampler and the rest; its exporter is ignored.
        """
        config = config or TracingConfig(service_name="lbgw-test")
        return cls(config, processor=SimpleSpanProcessor(exporter))

    def __repr__(self) -> str:
        if not self.enabled:
            return "<Telemetry off>"
        config = self.config
        where = f" {config.endpoint_url}" if self.exporter == "otlp" else ""
        return f"<Telemetry {self.exporter}{where} {config.sampler} service={config.service_name}>"

    # -- propagation ------------------------------------------------------------------------

    def extract(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
        """The client's trace context and baggage from its metadata (W3C headers)."""
        if not self.enabled or not metadata:
            return _ROOT
        if not isinstance(metadata, Sequence):
            metadata = tuple(metadata)
        if not any(key in PROPAGATED_KEYS for key, _ in metadata):
            return _ROOT  # most calls: no trace context, so no propagator to run
        return _PROPAGATOR.extract(metadata, _ROOT, _GETTER)

    def inject(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, context: Context
    ) -> tuple[tuple[str, str | bytes], ...]:
        """``metadata`` for the backend: the client's W3C keys replaced by ``context``'s.

        ``context`` is usually ``with_span(attempt_span, parent)``. Other keys,
        ``-bin`` ones included, keep their values and order. Disabled: the
        metadata as it is, client's trace context included.
        """
        if not self.enabled:
            return tuple(metadata or ())
        carrier = [m for m in metadata or () if m[0] not in PROPAGATED_KEYS]
        _PROPAGATOR.inject(carrier, context, _SETTER)
        return tuple(carrier)

    # -- spans --------------------------------------------------------------------------

    def server_span(self, method: str, peer: str | None, parent: Context) -> Span:
        """The SERVER span of a client's call to ``method``, a child of ``parent``."""
        tracer = self._tracer
        if tracer is None:
            return INVALID_SPAN
        name, rpc = _rpc(method)
        attributes: Mapping[str, AttributeValue] = rpc
        if peer:  # one set of attributes for start_span: no per-attribute locking later
            attributes = {**rpc, **_peer(peer)}
        return tracer.start_span(name, parent, SpanKind.SERVER, attributes)

    def attempt_span(  # noqa: PLR0913 - each goes into the span's attributes, set at its start
        self,
        server_span: Span,
        method: str,
        address: str,
        attempt: int = 1,
        previous_failure: str | None = None,
        *,
        decision: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        """The CLIENT span of one attempt at the backend ``address``, a child of ``server_span``.

        ``attempt`` counts from 1; ``previous_failure`` says why the one
        before failed (``lb.retry_reason``), for a retry. ``decision`` is the
        pick's ``lb.*`` attributes (``decision_attributes``): all of them go
        to ``start_span`` at once, which costs far less than setting them one
        by one on the started span.
        """
        tracer = self._tracer
        if tracer is None:
            return INVALID_SPAN
        name, rpc = _rpc(method)
        attributes: dict[str, AttributeValue] = {**rpc, **_server(address), LB_ATTEMPT: attempt}
        if previous_failure is not None:
            attributes[LB_RETRY_REASON] = previous_failure
        if decision:
            attributes.update(decision)
        parent = trace.set_span_in_context(server_span, _ROOT)
        return tracer.start_span(name, parent, SpanKind.CLIENT, attributes)

    def health_check_span(self, address: str) -> Span:
        """A root CLIENT span for one health probe of ``address``, if probes are traced."""
        tracer = self._tracer
        if tracer is None or not self.health_checks:
            return INVALID_SPAN
        name, attributes = _rpc(HEALTH_CHECK_METHOD)
        span = tracer.start_span(name, _ROOT, SpanKind.CLIENT, attributes)
        if span.is_recording():
            span.set_attributes(_server(address))
        return span

    # -- lifecycle --------------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export what is queued now; False if it did not finish in time.

        It blocks the calling thread until the exporter is done: from an
        event loop, run it in a thread (``asyncio.to_thread``), above all when
        the receiver is served by the same loop.
        """
        if self._provider is None:
            return True
        return self._provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush, then stop the processor and the exporter; later spans are dropped.

        Blocking, like ``force_flush``; idempotent.
        """
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.shutdown()


def decision_attributes(  # noqa: PLR0913 - one keyword per lb.* attribute
    cluster: str,
    strategy: str,
    endpoint: str | None,
    *,
    candidates: Candidates | Callable[[], Candidates] = (),
    skipped: Skipped | Callable[[], Skipped] = (),
    pick_ns: int | None = None,
    route: str | None = None,
    hash_key: str | None = None,
    ring_position: int | None = None,
    fallback: str | None = None,
) -> dict[str, AttributeValue]:
    """The ``lb.*`` attributes of a pick. ``endpoint`` None: no endpoint was eligible.

    ``candidates`` and ``skipped`` may be callables, called here: pass them
    only for a recording span, so a sampled-out call pays for neither.
    """
    attributes: dict[str, AttributeValue] = {LB_CLUSTER: cluster, LB_STRATEGY: strategy}
    if endpoint is not None:
        attributes[LB_ENDPOINT] = endpoint
    if route is not None:
        attributes[LB_ROUTE] = route
    if pick_ns is not None:
        attributes[LB_PICK_DURATION_NS] = pick_ns
    if hash_key is not None:
        attributes[LB_HASH_KEY] = hash_key
    if ring_position is not None:
        attributes[LB_RING_POSITION] = ring_position
    if fallback is not None:
        attributes[LB_FALLBACK] = fallback
    compared = candidates() if callable(candidates) else candidates
    if compared:
        attributes[LB_CANDIDATE_SCORES] = json.dumps(
            {address: _finite(scores) for address, scores in compared}, separators=(",", ":")
        )
    left_out = skipped() if callable(skipped) else skipped
    if left_out:
        attributes[LB_SKIPPED] = [address for address, _ in left_out]
        attributes[LB_SKIPPED_REASONS] = [reason for _, reason in left_out]
    return attributes


def _on_span(
    attributes: Callable[_P, dict[str, AttributeValue]],
) -> Callable[Concatenate[Span, _P], None]:
    """``attributes``, set on a started span instead of returned (if the span records)."""

    def record(span: Span, /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        if span.is_recording():
            span.set_attributes(attributes(*args, **kwargs))

    record.__doc__ = f"``{attributes.__name__}``, set on a started ``span`` if it records."
    return record


#: ``decision_attributes``, set on a started span if it records. For an attempt
#: span, ``Telemetry.attempt_span(..., decision=...)`` is cheaper; this serves
#: spans that exist before the pick, such as the SERVER span of a call that no
#: endpoint could take.
record_decision: Final = _on_span(decision_attributes)


def decision_of(decision: Decision, cluster: str, route: str | None) -> dict[str, AttributeValue]:
    """The ``lb.*`` attributes of an explained pick (``Cluster.decide``)."""
    return decision_attributes(
        cluster,
        decision.strategy,
        decision.address,
        candidates=decision.candidates,
        skipped=decision.skipped,
        pick_ns=decision.pick_ns,
        route=route,
        hash_key=decision.hash_key,
        ring_position=decision.ring_position,
        fallback=decision.fallback,
    )


class TracedCall:
    """One traced call: its SERVER span, and the CLIENT span of the attempt under way.

    Each pick goes through ``pick`` here. For a sampled call, the pick is
    explained (``Cluster.decide(..., explain=True)``) and the attempt's span
    opens with the decision's attributes: the candidates and their figures
    as the picker saw them, the endpoints out of rotation and why, how a key
    or token decided, and the pick's duration. An unsampled call gets no
    attempt spans and builds none of this: the backend is sent the server
    span's context, whose flags say "not sampled", so its spans are dropped
    alike.
    """

    __slots__ = (
        "attempt",
        "call",
        "context",
        "method",
        "parent",
        "recording",
        "target",
        "telemetry",
    )

    def __init__(
        self, telemetry: Telemetry, target: Target, method: str, context: _Context
    ) -> None:
        self.telemetry = telemetry
        self.target = target
        self.method = method
        self.context = context
        self.parent = telemetry.extract(context.invocation_metadata())
        self.call = telemetry.server_span(method, context.peer(), self.parent)
        self.recording = self.call.is_recording()
        self.attempt: Span | None = None

    def pick(self, attempt: int, exclude: Endpoint | None, reason: str | None) -> Endpoint:
        """Pick for ``attempt`` (never ``exclude``, for a retry) and open its span."""
        cluster = self.target.cluster
        context = self.context
        if not self.recording:
            self.attempt = self.call
            return cluster.pick(context, self.method, exclude).endpoint
        try:
            decision = cluster.decide(
                context.invocation_metadata(), context.peer(), self.method, exclude, explain=True
            )
        except NoEligibleEndpointError as exc:
            if exclude is None:  # the call is rejected: its server span says why
                record_decision(
                    self.call,
                    cluster.name,
                    cluster.strategy,
                    None,
                    skipped=exc.skipped,
                    route=self.target.route,
                )
            raise
        try:
            self.attempt = self.telemetry.attempt_span(
                self.call,
                self.method,
                decision.address,
                attempt,
                reason,
                decision=decision_of(decision, cluster.name, self.target.route),
            )
        except Exception:  # a fault of tracing's own must not fail the call, nor leak the pick
            log.exception("tracing failed; the call goes on untraced")
            self.attempt = self.call
        return decision.endpoint

    def metadata(self, metadata: Metadata | None) -> Metadata | None:
        """The metadata for the attempt: W3C trace context from the attempt's span."""
        span = self.attempt if self.attempt is not None else self.call
        return self.telemetry.inject(metadata, with_span(span, self.parent)) or None

    def end_attempt(self, code: grpc.StatusCode, details: str | None) -> None:
        span, self.attempt = self.attempt, None
        if span is not None and span is not self.call:
            end_span(span, code, details)

    def end(self, code: grpc.StatusCode, details: str | None) -> None:
        self.end_attempt(code, details)
        end_span(self.call, code, details)


def _finite(scores: Mapping[str, float | int]) -> dict[str, float | int | str]:
    """JSON has no inf or NaN: those figures go as strings, so the object stays valid JSON."""
    return {k: v if math.isfinite(v) else str(v) for k, v in scores.items()}


def end_span(span: Span, code: grpc.StatusCode, details: str | None = None) -> None:
    """Set ``rpc.grpc.status_code`` and the span's status from ``code``, then end it.

    A SERVER span is an error only for the codes that are the server's fault;
    a CLIENT span for every code but OK. ``details`` describes the error.
    """
    if span.is_recording():
        span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
        if code is not grpc.StatusCode.OK:
            server = isinstance(span, ReadableSpan) and span.kind is SpanKind.SERVER
            if not server or code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, details or code.name))
    span.end()


def _sampler(config: TracingConfig) -> sampling.Sampler:
    name = config.sampler
    root: sampling.Sampler
    base = name.removeprefix("parentbased_")
    if base == "always_on":
        root = sampling.ALWAYS_ON
    elif base == "always_off":
        root = sampling.ALWAYS_OFF
    else:  # traceidratio: config.py admits only these
        root = sampling.TraceIdRatioBased(config.sampler_arg)
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


class _Resource(Resource):
    """A ``Resource`` that hashes once: the OTLP encoder hashes the resource of every span
    it groups, and ``Resource.__hash__`` serializes all its attributes to JSON each time
    (6.6 us a span). lbgw's resource never changes once made."""

    @functools.cached_property
    def _hash(self) -> int:
        return super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _resource(config: TracingConfig) -> Resource:
    """Built here, not by ``Resource.create``, which would read OTEL_* variables itself."""
    return _Resource(
        {
            "service.name": config.service_name,
            "service.version": __version__,
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.version": _sdk_version,
        }
    )


def _batch_processor(config: TracingConfig) -> SpanProcessor:
    exporter: SpanExporter
    if config.effective_exporter == "console":
        exporter = ConsoleSpanExporter(service_name=config.service_name)
    else:
        url = urllib.parse.urlsplit(config.endpoint_url)
        exporter = OTLPSpanExporter(endpoint=url.netloc, insecure=url.scheme == "http")
    return BatchSpanProcessor(
        exporter,
        max_queue_size=config.bsp_max_queue_size,
        schedule_delay_millis=config.bsp_schedule_delay_ms,
        max_export_batch_size=config.bsp_max_export_batch_size,
        export_timeout_millis=config.bsp_export_timeout_ms,
    )
