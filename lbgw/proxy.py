"""The forwarding path: one ``grpc.GenericRpcHandler`` that passes raw bytes through.

For each method, ``Proxy`` builds a handler once (up front for the methods
whose kind is known, on first use for the others) and keeps it; a method
whose kind becomes known later (reflection of an endpoint that was down, or
joined) gets its fast-path handler then, for the calls that follow:

* the route gives the cluster (``routing.Router``); no route: the call gets
  ``UNIMPLEMENTED`` naming the method;
* the method's kind (from config or server reflection) gives the handler
  form. Unary methods take gRPC's ``unary_unary`` fast path; a method of
  unknown kind is forwarded as ``stream_stream``, which is correct for every
  kind (1.6x the CPU of the fast path for a unary call);
* no request deserializer and no response serializer: bytes in, bytes out.

Every call kind runs the same attempt loop (``_forwarder``): pick an
endpoint (``Cluster.pick``, which returns a ``Decision``), call it over the
endpoint's channel with the client's metadata (minus hop-by-hop and reserved
keys; ``-bin`` values stay bytes) and remaining deadline, and relay what
comes back: initial metadata, the response or the response stream, trailing
metadata, status code and details. The kinds differ only there: a unary
response is awaited whole, a stream is relayed message by message
(``_relay_stream``). A client's cancel cancels the backend call.
``Balancer.done`` runs in a ``finally``, so in-flight counts never leak.
Streams keep gRPC's flow control: each message is read from one side only
after the previous one was written to the other, so a slow reader slows the
sender instead of growing a buffer in lbgw.

Every attempt's outcome goes to ``ClusterHealth`` (passive ejection). An
attempt that fails with one of the route's ``retry_on`` codes (default
``UNAVAILABLE``, which is also what a connect failure or a refused stream
gives) is retried on a different endpoint when all of these hold:

* nothing of the response has reached the client;
* for a streamed request (client stream, bidi, or a method of unknown kind),
  the retry buffer (``replay.ReplayBuffer``, ``retry_buffer_bytes`` per
  call) still holds everything the client has sent: it was not outgrown and
  no response header has come. The retry replays it on the new endpoint,
  then carries on with the live stream. (A unary or server-streaming request
  is held by lbgw whole and can always be sent again);
* the call has attempts left (``max_attempts``, 2 by default, in all);
* the cluster's retry budget allows it (``cluster.RetryBudget``); and the
  client's deadline has time left.

The retry's pick never returns the endpoint that failed, and leaves that
endpoint's place in the kernel's schedule alone (``pick_excluding``).

Before its first attempt, a call passes two limits, decided without I/O
(``forward``): the gateway's cap on calls in flight (``admission.Admission``,
``RESOURCE_EXHAUSTED`` past it) and its cluster's circuit breaker
(``breakers.CircuitBreaker``, ``UNAVAILABLE``, never retried). A stream
lbgw reads that sends nothing after its HEADERS, while the backend sends no
response headers either, is ended after ``request_header_timeout`` with
``DEADLINE_EXCEEDED`` (``_expire``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from grpc import aio

from lbgw._grpc_private import send_message
from lbgw.admission import Admission
from lbgw.cluster import Cluster, Target
from lbgw.config import MethodKind, TracingConfig
from lbgw.endpoints import Endpoint
from lbgw.exceptions import (
    EndpointUnreachableError,
    GatewayError,
    NoEligibleEndpointError,
    NoRouteError,
    RequestHeaderTimeoutError,
)
from lbgw.logs import fields
from lbgw.metrics import Meter
from lbgw.replay import ClientStream
from lbgw.routing import Router
from lbgw.telemetry import Telemetry, TracedCall, end_span

if TYPE_CHECKING:
    from lbgw.tls import ClientIdentity

__all__ = ["Proxy", "forwarded_metadata"]

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
#: Never forwarded as a client sent it: lbgw's own ``x-forwarded-client-cert`` (Envoy's
#: XFCC, with ``forward_client_cert``) is the only one a backend may see, so it cannot
#: be spoofed (issue 14).
_DROPPED: Final = HOP_BY_HOP | {"x-forwarded-client-cert"}
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
        m for m in metadata if m[0] not in _DROPPED and not m[0].startswith(RESERVED_PREFIXES)
    )
    return kept or None


class Proxy(grpc.GenericRpcHandler):
    """Routes every method to a cluster and forwards it as raw bytes.

    Handlers for the methods whose kind is known are built up front and
    kept. Others are built on first use and kept in a bounded LRU cache, so
    a client that invents method names cannot evict the known ones or grow
    lbgw's memory; calls with no route get a reject handler, never cached.
    A method whose kind a cluster learns later moves from the cache to the
    known handlers (``Cluster.on_kinds``); only a backend's reflection adds
    kinds, never a client.
    """

    def __init__(  # noqa: PLR0913 - the router, the clusters, and what each call takes
        self,
        router: Router[Target],
        clusters: Iterable[Cluster],
        telemetry: Telemetry | None = None,
        *,
        identity: ClientIdentity | None = None,
        admission: Admission | None = None,
        header_timeout: float = 0.0,
        meter: Meter | None = None,
    ) -> None:
        """``identity``: add the client certificate's XFCC to forwarded calls (issue 14);
        ``admission``: the gateway's cap on calls (None: no cap); ``header_timeout``:
        ``request_header_timeout`` in seconds (0: none); ``meter``: count calls for the admin
        port's metrics (None: metrics off)."""
        self._router = router
        self._telemetry = telemetry or Telemetry(TracingConfig(exporter="none"))
        self._identity = identity
        self.admission = admission or Admission(2**62)
        self._header_timeout = header_timeout
        self._meter = meter
        self._known: dict[str, _Handler] = {}
        self._recent: collections.OrderedDict[str, _Handler] = collections.OrderedDict()
        self._clusters = list(clusters)
        for cluster in self._clusters:
            for method in cluster.kinds:
                target = router.match(method)
                if target is not None and target.cluster is cluster:
                    self._known[method] = self._build(target, method)
            cluster.on_kinds(self._learned)

    def detach(self) -> None:
        """No longer follow the clusters' new method kinds (a reload replaced this proxy;
        the calls it handed out keep their handlers)."""
        for cluster in self._clusters:
            cluster.off_kinds(self._learned)

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

    def _learned(self, cluster: Cluster, methods: list[str]) -> None:
        """``cluster`` learned these methods' kinds: their calls from now on take that form."""
        for method in methods:
            target = self._router.match(method)
            if target is None or target.cluster is not cluster:
                continue
            self._known[method] = self._build(target, method)
            if self._recent.pop(method, None) is not None:
                unknown = _call_key(method, None)
                for e in cluster.endpoints:  # calls in flight hold theirs
                    e.calls.pop(unknown, None)

    def handler(self, method: str) -> _Handler:
        """The handler for ``method``: its route, its kind, its multicallables."""
        target = self._router.match(method)
        if target is None:
            return grpc.stream_stream_rpc_method_handler(
                _reject(NoRouteError(method), self._telemetry, method, self._meter)
            )
        handler = self._build(target, method)
        self._recent[method] = handler
        if len(self._recent) > _MAX_CACHED_HANDLERS:
            evicted, _ = self._recent.popitem(last=False)
            # Its multicallables go too, so invented method names cannot grow them.
            gone = self._router.match(evicted)
            if gone is not None:
                keys = [_call_key(evicted, kind) for kind in _MULTICALLABLE]
                for e in gone.cluster.endpoints:
                    for key in keys:
                        e.calls.pop(key, None)
        return handler

    def _build(self, target: Target, method: str) -> _Handler:
        kind = target.cluster.kinds.get(method)
        forward = _forwarder(
            target,
            method,
            kind,
            self._telemetry,
            self._identity,
            admission=self.admission,
            header_timeout=self._header_timeout,
            meter=self._meter,
        )
        if kind is MethodKind.UNARY:  # gRPC's fast path
            return grpc.unary_unary_rpc_method_handler(forward)
        if kind is MethodKind.CLIENT_STREAMING:
            return grpc.stream_unary_rpc_method_handler(forward)
        if kind is MethodKind.SERVER_STREAMING:
            return grpc.unary_stream_rpc_method_handler(forward)
        # Bidi, or a kind lbgw does not know: stream_stream forwards any kind.
        return grpc.stream_stream_rpc_method_handler(forward)


def _reject(
    error: GatewayError, telemetry: Telemetry, method: str, meter: Meter | None = None
) -> Callable[[Any, _Context], Awaitable[None]]:

    async def reject(request: Any, context: _Context) -> None:
        await _refuse_early(context, error, telemetry, method, meter)

    return reject


async def _relay_error(
    context: _Context,
    error: aio.AioRpcError,
    cluster: Cluster,
    e: Endpoint,
    *,
    initial_sent: bool,
) -> str | None:
    """End the client's call with the backend's status, details and metadata; the details."""
    code = error.code()
    details = error.details()
    initial = error.initial_metadata()
    if code is grpc.StatusCode.UNAVAILABLE and not initial and _unreachable(e):
        # No response ever came: lbgw could not reach the endpoint, so lbgw says which.
        details = str(EndpointUnreachableError(cluster.name, e.address, details or "no details"))
    if initial and not initial_sent:
        await context.send_initial_metadata(initial)
    trailing = error.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(trailing)
    context.set_code(code)
    if details:
        context.set_details(details)
    return details


def _unreachable(e: Endpoint) -> bool:
    return e.backend is not None and e.backend.unreachable()


#: How grpc core (pick_first) fails a call that found no connected subchannel:
#: the call never left lbgw, so no backend saw it.
_NEVER_SENT: Final = "failed to connect to all addresses"


def _never_sent(error: aio.AioRpcError) -> bool:
    """Whether an attempt failed before its request left lbgw (no connection to send on)."""
    return (
        error.code() is grpc.StatusCode.UNAVAILABLE
        and not error.initial_metadata()
        and (error.details() or "").startswith(_NEVER_SENT)
    )


def _observed(error: aio.AioRpcError, e: Endpoint) -> bool:
    """Whether a failed call's duration says something about the backend's speed."""
    code = error.code()
    if code is grpc.StatusCode.CANCELLED:
        return False
    return code is not grpc.StatusCode.UNAVAILABLE or not _unreachable(e)


class _Progress:
    """How far one attempt got, which decides whether it may be retried.

    ``read``: lbgw has started reading the client's request stream, so a
    retry could lose what was read. ``relayed``: something of the response
    has reached the client. ``headers_ns``: when the backend's response
    headers came (0: not yet), the latency a stream's balancer observes.
    ``heard``: the client's stream has sent a message or ended;
    ``expired``: it had not when ``request_header_timeout`` ran out.
    """

    __slots__ = ("expired", "headers_ns", "heard", "read", "relayed")

    def __init__(self) -> None:
        self.read = False
        self.relayed = False
        self.headers_ns = 0
        self.heard = False
        self.expired = False


class _Unary(_Progress):
    """The progress of an attempt with a unary request and a unary response: it
    never reads a stream and relays nothing before it has succeeded. One, shared:
    it refuses to change."""

    __slots__ = ()

    def __init__(self) -> None:
        for name in _Progress.__slots__:
            object.__setattr__(self, name, 0 if name == "headers_ns" else False)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"the unary attempts' shared progress cannot change ({name})")


_UNARY: Final = _Unary()


async def _feed(
    call: Any, requests: ClientStream, handler: asyncio.Task[Any], progress: _Progress
) -> None:
    """Copy the client's request stream to the backend call, one message at a time.

    A retry's feeder first replays what the retry buffer holds, in order.
    The buffer is released once something of the response has been relayed.

    Each message is read from the client only after the previous one was
    sent on, so gRPC's flow control holds a fast client back. At the end of
    the client's stream the backend call is half-closed, unless the client
    cancelled: grpc.aio's server ends the request stream the same way for
    both, and the cancel reaches the handler's task a moment later, so the
    feeder yields once and looks before half-closing. (A cancel that comes
    later still cancels the backend call, from the handler's ``finally``; it
    comes later only when gRPC's poller thread is starved of CPU, and the
    backend then sees the end of the stream just before the cancel.)
    ``progress.read`` turns True once the client's stream is being read;
    from then on, a retry needs the retry buffer.
    """
    buffer = requests.buffer
    if buffer.ended or (buffer.replayable and buffer.messages):
        progress.heard = True  # a retry: the client has spoken, whatever the connect takes
    try:
        await call.wait_for_connection()
        progress.read = True  # from here on, a retry needs the buffer
        for held in buffer.messages if buffer.replayable else ():
            progress.heard = True
            if call.done() or not await send_message(call, held):
                return
        while not buffer.ended:
            message = await requests.read()
            if message is None:
                break
            progress.heard = True
            if progress.relayed and not buffer.released:
                buffer.release()
            if call.done() or not await send_message(call, message):
                return
        progress.heard = True
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


async def _relay_stream(
    call: Any, context: _Context, token: tuple[str, str] | None, progress: _Progress
) -> None:
    """Relay a response stream: initial metadata (with the sticky token), then each message.

    The token goes out with the backend's initial metadata, or on its own
    before the first message or the trailers when the backend sent none.
    """
    initial = await call.initial_metadata()
    progress.headers_ns = time.monotonic_ns()
    if initial:
        if token is not None:
            initial = (*initial, token)
        await context.send_initial_metadata(initial)
        progress.relayed = True
    async for response in call:
        if not progress.relayed and token is not None:
            await context.send_initial_metadata((token,))
        progress.relayed = True
        await context.write(response)
    if not progress.relayed and token is not None:
        await context.send_initial_metadata((token,))


def _replayable(stream: ClientStream, error: aio.AioRpcError) -> bool:
    """Whether a retry can resend all the client sent: no response header came, nothing
    outgrew the buffer (Envoy's rule)."""
    if not stream.buffer.replayable or error.initial_metadata():
        stream.buffer.release()
        return False
    return True


def _expire(call: Any, feeder: asyncio.Task[None], progress: _Progress) -> None:
    """``request_header_timeout`` ran out: end the stream if nothing came either way.

    A stream that sent HEADERS and nothing more holds a backend call and a
    stream slot for as long as its client likes; one whose backend has sent
    response headers is talking, and is left alone. Cancelling the backend
    call wakes the handler, which ends the client's call with
    ``DEADLINE_EXCEEDED`` (``RequestHeaderTimeoutError``).
    """
    if progress.heard or progress.headers_ns or call.done():
        return
    progress.expired = True
    feeder.cancel()
    call.cancel()


def _cancelling(timer: asyncio.TimerHandle) -> Callable[[asyncio.Task[None]], None]:
    """A done callback that cancels ``timer``: the feeder is over, nothing left to expire."""

    def cancel(_: asyncio.Task[None]) -> None:
        timer.cancel()

    return cancel


def _end(call: Any, feeder: asyncio.Task[None] | None) -> None:
    if feeder is not None and not feeder.done():
        feeder.cancel()
    if call is not None and not call.done():
        call.cancel()


def _retry_to(  # noqa: PLR0913 - what the retry decision reads, named
    target: Target,
    e: Endpoint,
    code: grpc.StatusCode,
    attempt: int,
    context: _Context,
    *,
    traced: TracedCall | None,
    method: str,
    unsent: bool = False,
) -> Endpoint | None:
    """The endpoint for the next attempt after ``e`` failed with ``code``, or None: no retry.

    A retry takes its place in the cluster's retry budget and its circuit
    breaker's ``max_retries`` here (the forwarder gives them back), unless
    the failed attempt was ``unsent``: its request never left lbgw, so
    sending it once, elsewhere, adds no load to any backend (gRPC retries
    such calls transparently, outside its retry policy: gRFC A6). It still
    counts toward ``max_attempts``.
    """
    cluster = target.cluster
    budget = cluster.budget
    if code not in target.retry_on or attempt >= cluster.retries.max_attempts:
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return None
    if not unsent and (not budget.may_retry() or not cluster.breaker.start_retry()):
        return None
    try:
        if traced is None:
            to = cluster.pick(context, method, e).endpoint
        else:
            to = traced.pick(attempt + 1, e, code.name)
    except NoEligibleEndpointError:
        if not unsent:
            cluster.breaker.end_retry()
        return None
    budget.sent += 1
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "retry",
            extra=fields(
                cluster=cluster.name,
                failed=e.address,
                code=code.name,
                next=to.address,
                attempt=attempt + 1,
            ),
        )
    return to


async def _refuse_early(
    context: _Context,
    error: GatewayError,
    telemetry: Telemetry,
    method: str,
    meter: Meter | None,
) -> None:
    """End a call refused before any attempt (no route, a limit): counted, its server span
    too if traced."""
    code, message = error.code, str(error)
    if meter is not None:
        meter.call(code, 0)
    if telemetry.enabled:
        parent = telemetry.extract(context.invocation_metadata())
        end_span(telemetry.server_span(method, context.peer(), parent), code, message)
    await context.abort(code, message)


async def _refuse(context: _Context, traced: TracedCall | None, error: GatewayError) -> None:
    """End a call that no endpoint can take: its trace, then the client's call."""
    if traced is not None:
        traced.end(error.code, str(error))
    await context.abort(error.code, str(error))


_CANCELLED: Final = grpc.StatusCode.CANCELLED
_OK: Final = grpc.StatusCode.OK
_GONE: Final = "cancelled by the client, or its deadline passed"

#: How each handler form makes its multicallable on an endpoint's channel.
_MULTICALLABLE: Final[dict[MethodKind | None, Callable[[aio.Channel, str], Any]]] = {
    MethodKind.UNARY: lambda channel, method: channel.unary_unary(method),
    MethodKind.CLIENT_STREAMING: lambda channel, method: channel.stream_unary(method),
    MethodKind.SERVER_STREAMING: lambda channel, method: channel.unary_stream(method),
    MethodKind.BIDI_STREAMING: lambda channel, method: channel.stream_stream(method),
    None: lambda channel, method: channel.stream_stream(method),
}


def _call_key(method: str, kind: MethodKind | None) -> str:
    """The key of ``method``'s multicallable of ``kind`` in ``Endpoint.calls``.

    Kind and method both: a method's kind can become known after start-up
    (reflection of a new endpoint), and a handler built before still calls
    the form it was built for.
    """
    return f"{kind.value if kind is not None else 'unknown'} {method}"


def _multicallable(e: Endpoint, key: str, method: str, kind: MethodKind | None) -> Any:
    """``e``'s multicallable for ``method``, made on first use and kept on the endpoint."""
    assert e.backend is not None, "a forwarded-to endpoint has a channel"
    call = e.calls[key] = _MULTICALLABLE[kind](e.backend.channel, method)
    return call


def _forwarder(  # noqa: PLR0913, PLR0915 - the attempt loop, inline: it runs on every call
    target: Target,
    method: str,
    kind: MethodKind | None,
    telemetry: Telemetry,
    identity: ClientIdentity | None = None,
    *,
    admission: Admission,
    header_timeout: float,
    meter: Meter | None = None,
) -> Callable[[Any, _Context], Awaitable[Any]]:
    """The handler of ``method``: one attempt loop for every call kind.

    ``kind`` None (unknown) is forwarded as bidi, which carries every kind.
    A unary response is awaited whole, and the latency the balancer
    observes is the call's; a response stream is relayed message by message
    (``_relay_stream``), and the latency is the time to the backend's
    response headers, as Linkerd measures streams: a stream's length says
    nothing of the backend's speed.
    """
    cluster = target.cluster
    balancer, health, budget = cluster.balancer, cluster.health, cluster.budget
    done, succeeded, failed = balancer.done, health.succeeded, health.failed
    pick = cluster.pick
    streaming_request = kind not in (MethodKind.UNARY, MethodKind.SERVER_STREAMING)
    unary_response = kind in (MethodKind.UNARY, MethodKind.CLIENT_STREAMING)
    clock = time.monotonic_ns
    traced = telemetry.enabled
    sticky = cluster.affinity is not None and cluster.affinity.sticky is not None
    key = _call_key(method, kind)
    # A single attempt needs no replay: buffer nothing.
    buffer_limit = cluster.retries.retry_buffer_bytes if cluster.retries.max_attempts > 1 else 0
    # Only a unary request with a unary response makes no progress worth a record.
    tracks_progress = streaming_request or not unary_response
    admit, release = admission.admit, admission.release
    breaker = cluster.breaker
    start_request, end_request = breaker.start_request, breaker.end_request
    start_pending, end_pending = breaker.start_pending, breaker.end_pending
    timed = streaming_request and header_timeout > 0
    _EXPIRED = RequestHeaderTimeoutError(header_timeout)  # noqa: N806 - a constant
    # Metrics (the admin port): plain counts, read when scraped (metrics.py).
    cm = None if meter is None else meter.cluster(cluster.name)

    async def forward(request: Any, context: _Context) -> Any:
        """The call's limits, then its attempts (``attempts``)."""
        overloaded = admit()
        if overloaded is not None:
            return await _refuse_early(context, overloaded, telemetry, method, meter)
        try:
            broken = start_request()
            if broken is not None:
                return await _refuse_early(context, broken, telemetry, method, meter)
            try:
                return await attempts(request, context)
            finally:
                end_request()
        finally:
            release()

    async def attempts(request: Any, context: _Context) -> Any:  # noqa: PLR0912, PLR0915
        tr = TracedCall(telemetry, target, method, context) if traced else None
        began = clock()
        try:
            e = pick(context, method).endpoint if tr is None else tr.pick(1, None, None)
        except NoEligibleEndpointError as exc:
            if meter is not None:
                meter.call(exc.code, clock() - began)
            await _refuse(context, tr, exc)
        metadata = forwarded_metadata(context.invocation_metadata())
        if identity is not None:  # forward_client_cert: the verified client's XFCC
            metadata = identity.forwarded(context, metadata)
        attempt = 1
        budgeted = False  # a retry of this call holds a place in the retry budget
        counted = False  # this attempt holds one of the breaker's max_retries
        stream = ClientStream(request, buffer_limit) if streaming_request else None
        # What the trace says if the handler is cancelled:
        code: grpc.StatusCode = _CANCELLED
        details: str | None = _GONE
        budget.active += 1
        try:
            while True:
                start = clock()
                latency: int | None = None
                call = feeder = None
                waiting = False
                progress = _Progress() if tracks_progress else _UNARY
                code, details = _CANCELLED, _GONE  # this attempt's, until it ends
                try:
                    if e.backend is not None and e.backend.unreachable():
                        # A call waiting for a connection: Envoy's "pending request".
                        refused = start_pending()
                        if refused is not None:
                            code, details = refused.code, str(refused)
                            await context.abort(code, details)
                        waiting = True
                    sent = metadata if tr is None else tr.metadata(metadata)
                    multicallable = e.calls.get(key) or _multicallable(e, key, method, kind)
                    timeout = context.time_remaining()
                    if stream is not None:
                        call = multicallable(metadata=sent, timeout=timeout)
                        handler = asyncio.current_task()
                        assert handler is not None  # grpc.aio runs every handler in a task
                        feeder = asyncio.ensure_future(_feed(call, stream, handler, progress))
                        if timed:
                            expiry = asyncio.get_running_loop().call_later(
                                header_timeout, _expire, call, feeder, progress
                            )
                            feeder.add_done_callback(_cancelling(expiry))
                    else:
                        call = multicallable(request, metadata=sent, timeout=timeout)
                    token = e.token if sticky else None
                    if unary_response:
                        response = await call
                        latency = clock() - start
                        succeeded(e)
                        initial = await call.initial_metadata()
                        if token is not None:
                            initial = (*(initial or ()), token)
                        if initial:
                            await context.send_initial_metadata(initial)
                    else:
                        response = None
                        await _relay_stream(call, context, token, progress)
                        latency = progress.headers_ns - start
                        succeeded(e)
                    trailing = await call.trailing_metadata()
                    if trailing:
                        context.set_trailing_metadata(trailing)
                    code, details = _OK, None
                    return response
                except asyncio.CancelledError:
                    # The backend call was cancelled under the handler: by _expire?
                    task = asyncio.current_task()
                    if not progress.expired or task is None or task.cancelling():
                        raise
                    code, details = _EXPIRED.code, str(_EXPIRED)
                    await context.abort(code, details)
                except aio.AioRpcError as error:
                    code = error.code()
                    if _observed(error, e):
                        latency = (progress.headers_ns or clock()) - start
                    failed(e, code, answered=bool(progress.headers_ns or error.initial_metadata()))
                    if tr is not None:
                        tr.end_attempt(code, error.details())
                    retry_to = None
                    unsent = False
                    if not progress.relayed and (stream is None or _replayable(stream, error)):
                        unsent = _never_sent(error)
                        retry_to = _retry_to(
                            target,
                            e,
                            code,
                            attempt,
                            context,
                            traced=tr,
                            method=method,
                            unsent=unsent,
                        )
                    if retry_to is None:
                        details = await _relay_error(
                            context, error, cluster, e, initial_sent=progress.relayed
                        )
                        return None
                finally:
                    _end(call, feeder)
                    done(e, start, latency)
                    if waiting:
                        end_pending()
                    if counted:
                        breaker.end_retry()
                    if cm is not None:
                        cm.attempt(e, code, clock() - start)
                attempt += 1
                e = retry_to
                counted = not unsent
                if counted and not budgeted:
                    budget.retrying += 1
                    budgeted = True
        finally:
            if stream is not None:
                stream.close()
            budget.active -= 1
            if budgeted:
                budget.retrying -= 1
            if meter is not None:
                meter.call(code, clock() - began)
                if attempt > 1 and code is _OK:
                    cm.retry_success += 1  # type: ignore[union-attr]  # set with meter
            if tr is not None:
                tr.end(code, details)

    return forward
