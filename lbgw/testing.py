"""Test seams shipped with lbgw: a loopback server helper, the echo backend, a manual clock.

``EchoBackend`` implements ``lbgw.echo.v1.Echo`` (``protos/lbgw/pb/echo.proto``)
for all four call kinds. It is the backend of ``lbgw demo``, of the
integration tests and of the benchmarks, and it records what it saw (calls,
metadata, deadlines, cancellations) so a test can check what lbgw forwarded.
``serve`` starts any servicer on ``127.0.0.1`` on a port the OS chooses;
``echo_registrar(..., health=HealthService())`` adds a health service whose
status a test flips with ``health.set("", False)``.

``python -m lbgw.testing NAME [--port PORT]`` runs an echo backend with a
health service in its own process (for tests that kill one): it prints
``127.0.0.1:PORT`` on a line of its own and serves until SIGTERM.

``ManualClock`` stands in for the event loop's ``time``/``call_later`` in
unit tests of ``endpoints.ClusterHealth``; ``offline_cluster`` is a
``Cluster`` without channels, for unit tests of picking and affinity.

``OtlpReceiver`` is a real OTLP/gRPC trace receiver (what Jaeger or a
collector serves on 4317): it decodes the spans an exporter sends, so a test
can check what lbgw exported over the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.reflection import SERVICE_NAME, enable_server_reflection
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status as StatusProto
from opentelemetry.trace import SpanKind, StatusCode

from lbgw.affinity import Affinity
from lbgw.balancer import Balancer
from lbgw.cluster import Cluster
from lbgw.config import ClusterConfig
from lbgw.endpoints import ClusterHealth
from lbgw.health import HealthChecker, HealthService
from lbgw.pb import echo_pb2, echo_pb2_grpc

if TYPE_CHECKING:
    _Context: TypeAlias = aio.ServicerContext[Any, Any]

__all__ = [
    "EchoBackend",
    "ManualClock",
    "OtlpReceiver",
    "ReceivedSpan",
    "Seen",
    "echo_registrar",
    "serve",
]


@dataclass
class Seen:
    """What an ``EchoBackend`` observed, for assertions."""

    calls: int = 0
    cancelled: int = 0
    completed: int = 0  # calls whose handler ran to its end
    metadata: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)
    time_remaining: list[float | None] = field(default_factory=list)
    sent: int = 0  # stream replies written so far


class EchoBackend(echo_pb2_grpc.EchoServicer):
    """The echo service: replies name ``self.name``; ``self.seen`` records calls.

    ``delay`` (seconds) is added before every reply, to make a slow backend.
    """

    def __init__(self, name: str, *, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.seen = Seen()
        self.cancel_seen = asyncio.Event()

    def __repr__(self) -> str:
        return f"<EchoBackend {self.name} calls={self.seen.calls}>"

    @contextlib.contextmanager
    def _call(self, context: _Context) -> Iterator[None]:
        """Record a call; count it as cancelled if gRPC cancels its handler.

        grpc.aio cancels the handler's task on a client cancel or an expired
        deadline (``context.cancelled()`` does not say so, grpc/grpc#36193).
        A streaming handler paused at ``yield`` may never see the
        ``CancelledError``, so the context's done callback also looks at the
        task.
        """
        self.seen.calls += 1
        md = tuple((k, v) for k, v in context.invocation_metadata() or ())
        self.seen.metadata.append(md)
        self.seen.time_remaining.append(context.time_remaining())
        task = asyncio.current_task()
        marked = False

        def mark() -> None:
            nonlocal marked
            if not marked:
                marked = True
                self.seen.cancelled += 1
                self.cancel_seen.set()

        def on_done(_: _Context) -> None:
            if task is not None and (task.cancelling() or task.cancelled()):
                mark()

        context.add_done_callback(on_done)  # type: ignore[arg-type]  # stubs want a Call
        try:
            yield
        except asyncio.CancelledError:
            mark()
            raise
        self.seen.completed += 1

    def _reply(self, request: echo_pb2.EchoRequest, index: int) -> echo_pb2.EchoResponse:
        payload = b"x" * request.response_size if request.response_size else request.payload
        return echo_pb2.EchoResponse(
            message=request.message, payload=payload, backend=self.name, index=index
        )

    async def _maybe_fail(self, request: echo_pb2.EchoRequest, context: _Context) -> None:
        delay = self.delay + request.delay_ms / 1000
        if delay:
            await asyncio.sleep(delay)
        if request.status_code:
            await context.abort(_code(request.status_code), request.status_message)

    async def Unary(  # noqa: N802 - the gRPC method's name
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> echo_pb2.EchoResponse:
        with self._call(context):
            await self._maybe_fail(request, context)
            return self._reply(request, 0)

    async def ServerStream(  # noqa: N802
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        with self._call(context):
            for i in range(max(request.response_count, 1)):
                await self._maybe_fail(request, context)
                yield self._reply(request, i)
                self.seen.sent += 1

    async def ClientStream(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> echo_pb2.EchoResponse:
        with self._call(context):
            count = 0
            last = echo_pb2.EchoRequest()
            async for request in requests:
                count += 1
                last = request
                await self._maybe_fail(request, context)
            return echo_pb2.EchoResponse(message=last.message, backend=self.name, index=count)

    async def Bidi(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        with self._call(context):
            i = 0
            async for request in requests:
                await self._maybe_fail(request, context)
                yield self._reply(request, i)
                self.seen.sent += 1
                i += 1


_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def _code(value: int) -> grpc.StatusCode:
    try:
        return _CODES[value]
    except KeyError:
        raise ValueError(f"no gRPC status code {value}") from None


@contextlib.asynccontextmanager
async def serve(
    register: Callable[[aio.Server], None],
    *,
    options: Sequence[tuple[str, int | str]] = (),
    grace: float | None = 0.0,
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[str]:
    """Run a grpc.aio server on ``127.0.0.1:<free port>``; yield ``host:port``.

    ``register`` adds the servicers, e.g.
    ``lambda s: echo_pb2_grpc.add_EchoServicer_to_server(EchoBackend("a"), s)``.
    ``credentials``: serve TLS (``grpc.ssl_server_credentials``); None: plaintext.
    """
    server = aio.server(options=list(options))
    register(server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace)


def echo_registrar(
    backend: EchoBackend, *, reflection: bool = False, health: HealthService | None = None
) -> Callable[[aio.Server], None]:
    """``register`` for ``serve`` that adds ``backend`` as the Echo service.

    With ``reflection``, the server also serves gRPC server reflection, so a
    gateway can learn the Echo methods' kinds from it. With ``health``, it
    serves ``grpc.health.v1.Health`` from that service, which the test flips.
    """

    def register(server: aio.Server) -> None:
        echo_pb2_grpc.add_EchoServicer_to_server(backend, server)  # type: ignore[no-untyped-call]
        if health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if reflection:
            names = (echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name, SERVICE_NAME)
            enable_server_reflection(names, server)

    return register


class _Handle:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that moves only when told: ``time()``, ``call_later()``, ``advance()``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._timers: list[_Handle] = []

    def __repr__(self) -> str:
        return f"<ManualClock {self.now:g} timers={len(self.pending())}>"

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(self.now + delay, callback)
        self._timers.append(handle)
        return handle

    def pending(self) -> list[float]:
        """When the timers not yet run nor cancelled are due."""
        return sorted(h.when for h in self._timers if not h.cancelled)

    def advance(self, seconds: float) -> None:
        """Move time on, running each timer that falls due, in order."""
        end = self.now + seconds
        while True:
            due = [h for h in self._timers if not h.cancelled and h.when <= end]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self._timers.remove(handle)
            self.now = max(self.now, handle.when)
            handle.callback()
        self._timers = [h for h in self._timers if not h.cancelled]
        self.now = end


def offline_cluster(
    config: ClusterConfig, *, secret: bytes = b"", clock: ManualClock | None = None
) -> Cluster:
    """A ``Cluster`` of ``config`` without channels or checks, for picking in unit tests.

    Its endpoints have no backend and its health checker never starts:
    ``pick`` and ``decide`` run as in the gateway, and health follows
    ``clock`` (a new ``ManualClock`` by default). Its ``update`` is the
    gateway's, so the endpoints it adds get real channels and checks: call it
    only from an event loop, with loopback addresses.
    """
    clock = clock or ManualClock()
    balancer = Balancer(config)
    health = ClusterHealth(config, balancer, clock=clock.time, call_later=clock.call_later)
    affinity = None
    if balancer.hashing is not None or config.sticky.enabled:
        affinity = Affinity(config, balancer, secret)
    checker = HealthChecker(health, config.health_check)
    return Cluster(config, balancer, health, checker, affinity=affinity)


async def _serve_forever(name: str, port: int) -> None:
    server = aio.server()
    echo_registrar(EchoBackend(name), health=HealthService())(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(0)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lbgw.testing NAME [--port PORT]``: an echo backend in its own process."""
    parser = argparse.ArgumentParser(prog="python -m lbgw.testing", description=main.__doc__)
    parser.add_argument("name", help="the name the backend puts in its replies")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    args = parser.parse_args(argv)
    asyncio.run(_serve_forever(args.name, args.port))


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as an ``OtlpReceiver`` received it; ids are lowercase hex, as W3C writes them."""

    trace_id: str
    span_id: str
    parent_span_id: str | None  # None for a root span
    name: str
    kind: SpanKind
    attributes: dict[str, Any]
    status: StatusCode
    status_message: str
    service_name: str | None  # the resource's service.name
    scope: str  # the instrumentation scope, "lbgw" for lbgw's spans


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver, ``TraceService/Export``, that keeps what it gets.

    ``async with serve(receiver.register) as address:`` runs it on loopback;
    point an exporter at ``http://{address}``, then ``await
    receiver.wait_for(n)``. It answers from the event loop: an exporter in
    the same process flushes from a thread (``asyncio.to_thread``), or the
    two wait on each other.
    """

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._arrived = asyncio.Condition()

    def __repr__(self) -> str:
        return f"<OtlpReceiver requests={self.requests} spans={len(self.spans)}>"

    def register(self, server: aio.Server) -> None:
        """``register`` for ``serve``."""
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]

    async def Export(  # noqa: N802 - the gRPC method's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: _Context
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = resource.get("service.name")
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                self.spans.extend(_received(span, service, scope) for span in scope_spans.spans)
        self.requests += 1
        async with self._arrived:
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Every span received, once there are at least ``count``; AssertionError on timeout."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.spans) >= count)
        except TimeoutError:
            names = [s.name for s in self.spans]
            raise AssertionError(
                f"{len(self.spans)} of {count} spans received within {timeout}s: {names}"
            ) from None
        return list(self.spans)


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _received(span: SpanProto, service: str | None, scope: str) -> ReceivedSpan:
    kind = SpanProto.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")
    status = StatusProto.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_")
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        name=span.name,
        kind=SpanKind.INTERNAL if kind == "UNSPECIFIED" else SpanKind[kind],
        attributes=_attributes(span.attributes),
        status=StatusCode[status],
        status_message=span.status.message,
        service_name=service,
        scope=scope,
    )


if __name__ == "__main__":
    main()
