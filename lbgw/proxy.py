"""The forwarding path: one ``grpc.GenericRpcHandler`` that passes raw bytes through.

For each method, ``Proxy`` builds a handler once (up front for the methods
whose kind is known, on first use for the others) and keeps it:

* the route gives the cluster (``routing.Router``); no route: the call gets
  ``UNIMPLEMENTED`` naming the method;
* the method's kind (from config or server reflection) gives the handler
  form. Unary methods take gRPC's ``unary_unary`` fast path; a method of
  unknown kind is forwarded as ``stream_stream``, which is correct for every
  kind (1.6x the CPU of the fast path for a unary call);
* no request deserializer and no response serializer: bytes in, bytes out.

A forwarded call picks an endpoint (``Balancer.pick``), calls it over the
endpoint's channel with the client's metadata (minus hop-by-hop and reserved
keys; ``-bin`` values stay bytes) and remaining deadline, and relays what
comes back: initial metadata, messages, trailing metadata, status code and
details. A client's cancel cancels the backend call. ``Balancer.done`` runs in
a ``finally``, so in-flight counts never leak. Streams keep gRPC's flow
control: each message is read from one side only after the previous one was
written to the other, so a slow reader slows the sender instead of growing
a buffer in lbgw.

Every attempt's outcome goes to ``ClusterHealth`` (passive ejection). An
attempt that fails with one of the route's ``retry_on`` codes (default
``UNAVAILABLE``, which is also what a connect failure or a refused stream
gives) is retried on a different endpoint when all of these hold:

* nothing of the response has reached the client;
* for a client stream or bidi, lbgw has not read from the client's stream
  (so nothing can have been sent; a unary or server-streaming request is
  held by lbgw and can be sent again);
* the call has attempts left (``max_attempts``, 2 by default, in all);
* the cluster's retry budget allows it (Envoy's: retries in flight at most
  ``budget_percent`` of the cluster's calls in flight, or
  ``min_retry_concurrency``); and the client's deadline has time left.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from grpc import aio
from grpc._cython import cygrpc  # type: ignore[attr-defined]  # see _send
from opentelemetry.trace import Span

from lbgw.affinity import Affinity
from lbgw.backends import Backend
from lbgw.balancer import Balancer
from lbgw.config import MethodKind, RetryConfig, TracingConfig
from lbgw.endpoints import ClusterHealth
from lbgw.exceptions import (
    EndpointUnreachableError,
    GatewayError,
    NoEligibleEndpointError,
    NoRouteError,
)
from lbgw.logs import fields
from lbgw.routing import Router
from lbgw.telemetry import (
    Telemetry,
    decision_attributes,
    end_span,
    record_decision,
    with_span,
)

__all__ = ["Cluster", "Proxy", "Target", "forwarded_metadata"]

log = logging.getLogger("lbgw.proxy")

#: Request metadata that belongs to one hop (HTTP/1 connection headers, which
#: HTTP/2 forbids anyway, and transport headers that gRPC sets itself).
#: ``user-agent`` is here because gRPC replaces it with its own on every call.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-type",
        "content-length",
        "accept-encoding",
        "user-agent",
    }
)
#: Prefixes reserved to gRPC and HTTP/2: gRPC sets these per hop itself.
RESERVED_PREFIXES: Final = ("grpc-", ":")

# How many handlers of methods outside the known kinds are kept (an LRU).
_MAX_CACHED_HANDLERS: Final = 4096

_Metadata: TypeAlias = Iterable[tuple[str, str | bytes]]
_Forwarded: TypeAlias = tuple[tuple[str, str | bytes], ...] | None
if TYPE_CHECKING:
    _Context: TypeAlias = aio.ServicerContext[Any, Any]
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


def forwarded_metadata(metadata: _Metadata | None) -> _Forwarded:
    """The client's metadata as sent on to the backend, or None if nothing is left."""
    if not metadata:
        return None
    kept = tuple(
        m for m in metadata if m[0] not in HOP_BY_HOP and not m[0].startswith(RESERVED_PREFIXES)
    )
    return kept or None


class Cluster:
    """A cluster at run time: balancer, health, backends, known method kinds, retry state."""

    __slots__ = (
        "active",
        "affinity",
        "backends",
        "balancer",
        "health",
        "kinds",
        "name",
        "retries",
        "retry_stats",
        "retrying",
    )

    def __init__(
        self,
        balancer: Balancer,
        health: ClusterHealth,
        backends: Sequence[Backend],
        kinds: dict[str, MethodKind],
        retries: RetryConfig,
        *,
        affinity: Affinity | None = None,
    ) -> None:
        self.name = balancer.name
        self.affinity = affinity
        self.balancer = balancer
        self.health = health
        self.backends = tuple(backends)
        self.kinds = kinds
        self.retries = retries
        self.active = 0  # client calls in flight
        self.retrying = 0  # retries in flight
        #: Counts since start: retries sent, and retries the budget refused.
        self.retry_stats = {"sent": 0, "over_budget": 0}

    def __repr__(self) -> str:
        return (
            f"<Cluster {self.name} {self.balancer!r} methods={len(self.kinds)} "
            f"active={self.active} retrying={self.retrying}>"
        )

    def choose(self, context: _Context, method: str, exclude: int = -1) -> int:
        """Pick for a call (never ``exclude``), through its session affinity if any."""
        affinity = self.affinity
        if affinity is None:
            balancer = self.balancer
            return balancer.pick() if exclude < 0 else balancer.pick_other(exclude)
        return affinity.pick(context.invocation_metadata(), context.peer(), method, exclude)

    def may_retry(self) -> bool:
        """Whether the retry budget has room for one more retry now."""
        retries = self.retries
        allowed = max(retries.min_retry_concurrency, self.active * retries.budget_percent / 100)
        if self.retrying < allowed:
            return True
        self.retry_stats["over_budget"] += 1
        return False


class Target:
    """What a route leads to: a cluster, and the codes retried on its calls.

    ``route`` names the route for traces: ``method /p.S/M``, ``service
    p.S``, ``package p`` or ``default``.
    """

    __slots__ = ("cluster", "retry_on", "route")

    def __init__(
        self, cluster: Cluster, retry_on: Iterable[grpc.StatusCode], route: str = "default"
    ) -> None:
        self.cluster = cluster
        self.retry_on = frozenset(retry_on)
        self.route = route

    def __repr__(self) -> str:
        codes = ",".join(sorted(c.name for c in self.retry_on)) or "-"
        return f"<Target {self.cluster.name} route={self.route!r} retry_on={codes}>"


class Proxy(grpc.GenericRpcHandler):
    """Routes every method to a cluster and forwards it as raw bytes.

    Handlers for the methods whose kind is known are built up front and
    kept. Others are built on first use and kept in a bounded LRU cache, so
    a client that invents method names cannot evict the known ones or grow
    lbgw's memory; calls with no route get a reject handler, never cached.
    """

    def __init__(
        self,
        router: Router[Target],
        clusters: Iterable[Cluster],
        telemetry: Telemetry | None = None,
    ) -> None:
        self._router = router
        self._telemetry = telemetry or Telemetry(TracingConfig(exporter="none"))
        self._known: dict[str, _Handler] = {}
        self._recent: collections.OrderedDict[str, _Handler] = collections.OrderedDict()
        for cluster in clusters:
            for method in cluster.kinds:
                target = router.match(method)
                if target is not None and target.cluster is cluster:
                    self._known[method] = self._build(target, method)

    def __repr__(self) -> str:
        return f"<Proxy known={len(self._known)} recent={len(self._recent)}>"

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method: str = handler_call_details.method
        handler = self._known.get(method)
        if handler is not None:
            return handler
        recent = self._recent
        handler = recent.get(method)
        if handler is not None:
            recent.move_to_end(method)
            return handler
        return self.handler(method)

    def handler(self, method: str) -> _Handler:
        """The handler for ``method``: its route, its kind, its multicallables."""
        target = self._router.match(method)
        if target is None:
            return grpc.stream_stream_rpc_method_handler(
                _reject(NoRouteError(method), self._telemetry, method)
            )
        handler = self._build(target, method)
        self._recent[method] = handler
        if len(self._recent) > _MAX_CACHED_HANDLERS:
            self._recent.popitem(last=False)
        return handler

    def _build(self, target: Target, method: str) -> _Handler:
        kind = target.cluster.kinds.get(method)
        channels = [b.channel for b in target.cluster.backends]
        tel = self._telemetry
        if kind is MethodKind.UNARY:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(
                    target,
                    [c.unary_unary(method) for c in channels],
                    streaming_request=False,
                    telemetry=tel,
                    method=method,
                )
            )
        if kind is MethodKind.CLIENT_STREAMING:
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(
                    target,
                    [c.stream_unary(method) for c in channels],
                    streaming_request=True,
                    telemetry=tel,
                    method=method,
                )
            )
        if kind is MethodKind.SERVER_STREAMING:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(
                    target,
                    [c.unary_stream(method) for c in channels],
                    streaming_request=False,
                    telemetry=tel,
                    method=method,
                )
            )
        # Bidi, or a kind lbgw does not know: stream_stream forwards any kind.
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(
                target,
                [c.stream_stream(method) for c in channels],
                streaming_request=True,
                telemetry=tel,
                method=method,
            )
        )


def _reject(
    error: GatewayError, telemetry: Telemetry, method: str
) -> Callable[[Any, _Context], Awaitable[None]]:
    code, message = error.code, str(error)
    traced = telemetry.enabled

    async def reject(request: Any, context: _Context) -> None:
        if traced:  # a call rejected before any attempt still has its server span
            parent = telemetry.extract(context.invocation_metadata())
            end_span(telemetry.server_span(method, context.peer(), parent), code, message)
        await context.abort(code, message)

    return reject


async def _relay_error(
    context: _Context,
    error: aio.AioRpcError,
    cluster: Cluster,
    backend: Backend,
    *,
    initial_sent: bool,
) -> str | None:
    """End the client's call with the backend's status, details and metadata; the details."""
    code = error.code()
    details = error.details()
    initial = error.initial_metadata()
    if code is grpc.StatusCode.UNAVAILABLE and not initial and backend.unreachable():
        # No response ever came: lbgw could not reach the endpoint, so lbgw says which.
        details = str(
            EndpointUnreachableError(cluster.name, backend.address, details or "no details")
        )
    if initial and not initial_sent:
        await context.send_initial_metadata(initial)
    trailing = error.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(trailing)
    context.set_code(code)
    if details:
        context.set_details(details)
    return details


def _observed(error: aio.AioRpcError, backend: Backend) -> bool:
    """Whether a failed call's duration says something about the backend's speed."""
    code = error.code()
    if code is grpc.StatusCode.CANCELLED:
        return False
    return code is not grpc.StatusCode.UNAVAILABLE or not backend.unreachable()


async def _send(call: Any, message: bytes) -> bool:
    """Send one request message to the backend; False once the call has ended.

    Not ``call.write()``: when a send fails because the backend has already
    ended the call (an early status, such as UNIMPLEMENTED or an
    interceptor's refusal), grpc.aio's ``_write`` replaces the status the
    backend sent with INTERNAL "Internal error from Core" (grpc/grpc#36066).
    Sending through the call's core object and letting the failure go keeps
    the backend's own status, which the response side then relays. The core
    object is grpc.aio's private ``_cython_call``: the integration tests of
    request streams (every one of them) fail if a grpcio release changes it.
    """
    try:
        await call._cython_call.send_serialized_message(message)
    except cygrpc.InternalError:
        return False
    return True


async def _feed(
    call: Any, requests: AsyncIterator[bytes], handler: asyncio.Task[Any], reading: list[bool]
) -> None:
    """Copy the client's request stream to the backend call, one message at a time.

    Each message is read from the client only after the previous one was
    sent on, so gRPC's flow control holds a fast client back. At the end of
    the client's stream the backend call is half-closed, unless the client
    cancelled: grpc.aio's server ends the request stream the same way for
    both, and the cancel reaches the handler's task a moment later, so the
    feeder yields once and looks before half-closing. (A cancel that comes
    later still cancels the backend call, from the handler's ``finally``; it
    comes later only when gRPC's poller thread is starved of CPU, and the
    backend then sees the end of the stream just before the cancel.)
    ``reading[0]`` turns True once the client's stream is being read; until
    then, the call can be retried.
    """
    try:
        await call.wait_for_connection()
        reading[0] = True  # from here on, a retry could lose what was read
        async for message in requests:
            if call.done() or not await _send(call, message):
                return
        await asyncio.sleep(0)
        if not handler.cancelling() and not call.done():
            await call.done_writing()
    except aio.AioRpcError:
        return  # the call has ended; its status says why, on the response side
    except asyncio.CancelledError:
        raise
    except Exception:  # reading the client failed: the backend must not see a clean end
        log.debug("request stream failed", exc_info=True)
        call.cancel()


def _start(
    multicallable: Any,
    request: Any,
    metadata: _Forwarded,
    context: _Context,
    streaming_request: bool,
) -> tuple[Any, asyncio.Task[None] | None, Sequence[bool]]:
    """Start one attempt, and for a request stream the task that feeds it."""
    timeout = context.time_remaining()
    if not streaming_request:
        return multicallable(request, metadata=metadata, timeout=timeout), None, _UNREAD
    call = multicallable(metadata=metadata, timeout=timeout)
    handler = asyncio.current_task()
    assert handler is not None  # grpc.aio runs every handler in a task
    reading = [False]
    return call, asyncio.ensure_future(_feed(call, request, handler, reading)), reading


def _end(call: Any, feeder: asyncio.Task[None] | None) -> None:
    if feeder is not None and not feeder.done():
        feeder.cancel()
    if call is not None and not call.done():
        call.cancel()


class _Traced:
    """One traced call: its SERVER span, and the CLIENT span of the attempt under way.

    Each pick goes through ``pick`` here, which records the decision on the
    attempt's span: the candidates and their scores as the picker saw them,
    the endpoints out of rotation and why, and the pick's duration. The
    figures are gathered only when the call is sampled. An unsampled call
    gets no attempt spans: the backend is sent the server span's context,
    whose flags say "not sampled", so its spans are dropped alike.
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

    def __init__(self, telemetry: Telemetry, target: Target, method: str, context: _Context):
        self.telemetry = telemetry
        self.target = target
        self.method = method
        self.context = context
        self.parent = telemetry.extract(context.invocation_metadata())
        self.call = telemetry.server_span(method, context.peer(), self.parent)
        self.recording = self.call.is_recording()
        self.attempt: Span | None = None

    def pick(self, attempt: int, exclude: int, reason: str | None) -> int:
        """Pick for ``attempt`` (never ``exclude``, for a retry) and open its span."""
        cluster = self.target.cluster
        balancer = cluster.balancer
        context = self.context
        if not self.recording:
            i = cluster.choose(context, self.method, exclude)
            self.attempt = self.call
            return i
        how: dict[str, str | int] = {}
        affinity = cluster.affinity
        if affinity is not None:
            how = affinity.explain(
                context.invocation_metadata(), context.peer(), self.method, exclude
            )
        # The key or the token decides, not the scores; else what the pick compares.
        decided = "ring_position" in how or "pinned" in how
        candidates = [] if decided else balancer.candidates(exclude=exclude)
        skipped = cluster.health.skipped(exclude)
        started = time.perf_counter_ns()
        try:
            i = cluster.choose(context, self.method, exclude)
        except NoEligibleEndpointError:
            if exclude < 0:  # the call is rejected: its server span says why
                record_decision(
                    self.call,
                    cluster.name,
                    balancer.strategy,
                    None,
                    skipped=skipped,
                    route=self.target.route,
                )
            raise
        took = time.perf_counter_ns() - started
        try:
            self._open_attempt(
                i, attempt, reason, took=took, candidates=candidates, skipped=skipped, how=how
            )
        except Exception:  # a fault of tracing's own must not fail the call, nor leak the pick
            log.exception("tracing failed; the call goes on untraced")
            self.attempt = self.call
        return i

    def _open_attempt(
        self,
        i: int,
        attempt: int,
        reason: str | None,
        *,
        took: int,
        candidates: list[tuple[str, dict[str, float]]],
        skipped: list[tuple[str, str]],
        how: dict[str, str | int],
    ) -> None:
        cluster = self.target.cluster
        address = cluster.backends[i].address
        decision = decision_attributes(
            cluster.name,
            cluster.balancer.strategy,
            address,
            candidates=candidates,
            skipped=skipped,
            pick_ns=took,
            route=self.target.route,
            hash_key=_str(how.get("hash_key")),
            ring_position=_int(how.get("ring_position")),
            fallback=_str(how.get("fallback")) or None,
        )
        self.attempt = self.telemetry.attempt_span(
            self.call, self.method, address, attempt, reason, decision=decision
        )

    def metadata(self, metadata: _Forwarded) -> _Forwarded:
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


def _str(value: str | int | None) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: str | int | None) -> int | None:
    return value if isinstance(value, int) else None


def _retry_to(
    target: Target,
    i: int,
    code: grpc.StatusCode,
    attempt: int,
    context: _Context,
    *,
    traced: _Traced | None,
    method: str,
) -> int:
    """The endpoint for the next attempt after ``i`` failed with ``code``, or -1: no retry.

    A retry takes its place in the cluster's retry budget here; ``_ended``
    gives it back when the call is over.
    """
    cluster = target.cluster
    if code not in target.retry_on or attempt >= cluster.retries.max_attempts:
        return -1
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return -1
    if not cluster.may_retry():
        return -1
    try:
        if traced is None:
            j = cluster.choose(context, method, i)
        else:
            j = traced.pick(attempt + 1, i, code.name)
    except NoEligibleEndpointError:
        return -1
    if attempt == 1:
        cluster.retrying += 1
    cluster.retry_stats["sent"] += 1
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "retry",
            extra=fields(
                cluster=cluster.name,
                failed=cluster.backends[i].address,
                code=code.name,
                next=cluster.backends[j].address,
                attempt=attempt + 1,
            ),
        )
    return j


def _first(cluster: Cluster, traced: _Traced | None, context: _Context, method: str) -> int:
    """The first attempt's endpoint; raises ``NoEligibleEndpointError``."""
    if traced is not None:
        return traced.pick(1, -1, None)
    return cluster.choose(context, method)


async def _refuse(context: _Context, traced: _Traced | None, error: GatewayError) -> None:
    """End a call that no endpoint can take: its trace, then the client's call."""
    if traced is not None:
        traced.end(error.code, str(error))
    await context.abort(error.code, str(error))


def _failed(
    target: Target,
    i: int,
    error: aio.AioRpcError,
    *,
    attempt: int,
    retryable: bool,
    context: _Context,
    traced: _Traced | None,
    method: str,
) -> int:
    """Attempt ``attempt`` on ``i`` failed: tell passive ejection, end its span, and
    return the endpoint to retry on (-1: none). ``retryable``: nothing of the call
    has gone past the point where it could be sent again."""
    code = error.code()
    target.cluster.health.failed(i, code)
    if traced is not None:
        traced.end_attempt(code, error.details())
    if not retryable:
        return -1
    return _retry_to(target, i, code, attempt, context, traced=traced, method=method)


def _ended(
    cluster: Cluster,
    attempts: int,
    traced: _Traced | None,
    code: grpc.StatusCode,
    details: str | None,
) -> None:
    """The call is over: release its places in the retry budget, end its spans."""
    cluster.active -= 1
    if attempts > 1:
        cluster.retrying -= 1
    if traced is not None:
        traced.end(code, details)


#: ``reading`` of an attempt whose request is not a stream: never read, so retryable.
_UNREAD: Final[Sequence[bool]] = (False,)
_CANCELLED: Final = grpc.StatusCode.CANCELLED
_OK: Final = grpc.StatusCode.OK
_GONE: Final = "cancelled by the client, or its deadline passed"


def _unary_response(
    target: Target,
    calls: Sequence[Any],
    *,
    streaming_request: bool,
    telemetry: Telemetry,
    method: str,
) -> Callable[[Any, _Context], Awaitable[bytes | None]]:
    """The forwarder for unary and client-streaming methods (one response)."""
    cluster = target.cluster
    balancer, health = cluster.balancer, cluster.health
    done, succeeded = balancer.done, health.succeeded
    backends = cluster.backends
    clock = time.monotonic_ns
    traced = telemetry.enabled
    sticky = cluster.affinity.sticky if cluster.affinity is not None else None

    async def forward(request: Any, context: _Context) -> bytes | None:
        tr = _Traced(telemetry, target, method, context) if traced else None
        try:
            i = _first(cluster, tr, context, method)
        except NoEligibleEndpointError as exc:
            await _refuse(context, tr, exc)
        metadata = forwarded_metadata(context.invocation_metadata())
        attempt = 1
        # What the trace says if the handler is cancelled:
        code: grpc.StatusCode = _CANCELLED
        details: str | None = _GONE
        cluster.active += 1
        try:
            while True:
                start = clock()
                latency: int | None = None
                call = feeder = None
                reading = _UNREAD
                code, details = _CANCELLED, _GONE  # this attempt's, until it ends
                try:
                    sent = metadata if tr is None else tr.metadata(metadata)
                    if streaming_request:
                        call, feeder, reading = _start(calls[i], request, sent, context, True)
                    else:  # the fast path, inline
                        call = calls[i](request, metadata=sent, timeout=context.time_remaining())
                    response: bytes = await call
                    latency = clock() - start
                    succeeded(i)
                    initial = await call.initial_metadata()
                    if sticky is not None:
                        initial = (*(initial or ()), sticky.token(i))
                    if initial:
                        await context.send_initial_metadata(initial)
                    trailing = await call.trailing_metadata()
                    if trailing:
                        context.set_trailing_metadata(trailing)
                    code, details = _OK, None
                    return response
                except aio.AioRpcError as error:
                    code = error.code()
                    if _observed(error, backends[i]):
                        latency = clock() - start
                    retry_to = _failed(
                        target,
                        i,
                        error,
                        attempt=attempt,
                        retryable=not reading[0],
                        context=context,
                        traced=tr,
                        method=method,
                    )
                    if retry_to < 0:
                        details = await _relay_error(
                            context, error, cluster, backends[i], initial_sent=False
                        )
                        return None
                finally:
                    _end(call, feeder)
                    done(i, start, latency)
                attempt += 1
                i = retry_to
        finally:
            _ended(cluster, attempt, tr, code, details)

    return forward


def _stream_response(
    target: Target,
    calls: Sequence[Any],
    *,
    streaming_request: bool,
    telemetry: Telemetry,
    method: str,
) -> Callable[[Any, _Context], Awaitable[None]]:
    """The forwarder for server-streaming and bidi methods, and unknown kinds.

    The latency the balancer observes is the time to the backend's response
    headers, as Linkerd measures streams: a stream's length says nothing of
    the backend's speed.
    """
    cluster = target.cluster
    balancer, health = cluster.balancer, cluster.health
    done, succeeded = balancer.done, health.succeeded
    backends = cluster.backends
    clock = time.monotonic_ns
    traced = telemetry.enabled
    sticky = cluster.affinity.sticky if cluster.affinity is not None else None

    async def forward(request: Any, context: _Context) -> None:
        tr = _Traced(telemetry, target, method, context) if traced else None
        try:
            i = _first(cluster, tr, context, method)
        except NoEligibleEndpointError as exc:
            await _refuse(context, tr, exc)
        metadata = forwarded_metadata(context.invocation_metadata())
        attempt = 1
        # What the trace says if the handler is cancelled:
        code: grpc.StatusCode = _CANCELLED
        details: str | None = _GONE
        cluster.active += 1
        try:
            while True:
                start = clock()
                headers = 0  # when the backend's response headers came
                latency: int | None = None
                relayed = False  # whether anything of the response reached the client
                call = feeder = None
                reading = _UNREAD
                code, details = _CANCELLED, _GONE  # this attempt's, until it ends
                try:
                    sent = metadata if tr is None else tr.metadata(metadata)
                    call, feeder, reading = _start(
                        calls[i], request, sent, context, streaming_request
                    )
                    initial = await call.initial_metadata()
                    headers = clock()
                    if initial:
                        if sticky is not None:
                            initial = (*initial, sticky.token(i))
                        await context.send_initial_metadata(initial)
                        relayed = True
                    async for response in call:
                        if not relayed and sticky is not None:
                            await context.send_initial_metadata((sticky.token(i),))
                        relayed = True
                        await context.write(response)
                    if not relayed and sticky is not None:
                        await context.send_initial_metadata((sticky.token(i),))
                    trailing = await call.trailing_metadata()
                    if trailing:
                        context.set_trailing_metadata(trailing)
                    latency = headers - start
                    succeeded(i)
                    code, details = _OK, None
                    return
                except aio.AioRpcError as error:
                    code = error.code()
                    if _observed(error, backends[i]):
                        latency = (headers or clock()) - start
                    retry_to = _failed(
                        target,
                        i,
                        error,
                        attempt=attempt,
                        retryable=not relayed and not reading[0],
                        context=context,
                        traced=tr,
                        method=method,
                    )
                    if retry_to < 0:
                        details = await _relay_error(
                            context, error, cluster, backends[i], initial_sent=relayed
                        )
                        return
                finally:
                    _end(call, feeder)
                    done(i, start, latency)
                attempt += 1
                i = retry_to
        finally:
            _ended(cluster, attempt, tr, code, details)

    return forward
