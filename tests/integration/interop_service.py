"""The gRPC interop ``TestService``, as the backend of lbgw's interop tests.

Implemented from the server features of the public interop spec
(grpc/grpc ``doc/interop-test-descriptions.md``): EmptyCall, UnaryCall,
StreamingOutputCall, StreamingInputCall, FullDuplexCall and HalfDuplexCall,
with "Echo Status", "Echo Metadata" and ``ResponseParameters.interval_us``.
``UnimplementedCall`` keeps the generated base class's UNIMPLEMENTED answer,
as the spec asks, and ``UnimplementedService`` is never registered.

Where the spec leaves the order open, a streaming call with a
``response_status`` first sends the responses that request asks for, then
ends with the status and reads nothing more.

The servicer also records what a test cannot see from the client side: which
calls started and which were cancelled (``started`` / ``cancelled`` events and
``calls`` / ``cancels`` counts, keyed by method name), so a test can assert
that a client's cancel travelled through lbgw to the backend.

Seeing a cancel in grpc.aio takes care: ``context.cancelled()`` stays False
for a call the peer cancelled (grpc/grpc#36193). The signal grpc.aio does give
is to cancel the handler's task, and only while the handler still runs: a
call counts as cancelled when it ends before its handler finished. A cancel
also ends the request stream as if the peer had half-closed, and the
cancellation may land a few milliseconds after that; a request-streaming
handler would by then have finished and the cancel would go unseen. So a test
that expects a cancel sets ``linger``, the seconds such a handler waits after
its request stream ends before it answers; the cancel interrupts the wait.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from grpc import aio

from lbgw.pb.interop import empty_pb2, messages_pb2, test_pb2_grpc

if TYPE_CHECKING:
    _Context: TypeAlias = aio.ServicerContext[Any, Any]

__all__ = ["ECHO_INITIAL", "ECHO_TRAILING", "InteropService", "interop_registrar"]

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"

_CODES: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

Metadata = tuple[tuple[str, str | bytes], ...]


def _payload(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=bytes(size))


@dataclass
class _Call:
    method: str
    finished: bool = False  # the handler ran to its end (a reply, or an echoed status)


class InteropService(test_pb2_grpc.TestServiceServicer):
    """An async ``grpc.testing.TestService`` that records starts and cancels."""

    def __init__(self, *, linger: float = 0.0) -> None:
        #: Seconds a request-streaming handler waits after its request stream
        #: ends, so that a cancel racing the end of the stream is seen.
        self.linger = linger
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.calls: Counter[str] = Counter()
        self.cancels: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<InteropService calls={dict(self.calls)} cancels={dict(self.cancels)}>"

    # -- bookkeeping and the shared features ---------------------------------

    def _begin(self, method: str, context: _Context) -> _Call:
        call = _Call(method)
        self.calls[method] += 1
        self.started[method].set()
        context.add_done_callback(self._on_done(call))  # type: ignore[arg-type]
        return call

    def _on_done(self, call: _Call) -> Callable[[_Context], None]:
        def done(context: _Context) -> None:
            if context.cancelled() or not call.finished:
                self.cancels[call.method] += 1
                self.cancelled[call.method].set()

        return done

    async def _linger(self) -> None:
        if self.linger:
            await asyncio.sleep(self.linger)

    @staticmethod
    async def _echo_metadata(context: _Context) -> Metadata:
        """Echo Metadata: send the initial key back now; return the trailers to send."""
        received: Iterable[tuple[str, str | bytes]] = context.invocation_metadata() or ()
        initial: Metadata = ()
        trailing: Metadata = ()
        for key, value in received:
            if key == ECHO_INITIAL:
                initial += ((key, value),)
            elif key == ECHO_TRAILING:
                trailing += ((key, value),)
        if initial:
            await context.send_initial_metadata(initial)
        if trailing:
            context.set_trailing_metadata(trailing)
        return trailing

    @staticmethod
    async def _echo_status(
        call: _Call,
        status: messages_pb2.EchoStatus,
        context: _Context,
        trailing: Metadata,
    ) -> None:
        """Echo Status: end the call with the requested code and message."""
        code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
        if code is not grpc.StatusCode.OK:
            call.finished = True
            await context.abort(code, status.message, trailing)

    @staticmethod
    async def _respond(
        request: messages_pb2.StreamingOutputCallRequest,
    ) -> AsyncIterator[messages_pb2.StreamingOutputCallResponse]:
        for params in request.response_parameters:
            if params.interval_us:
                await asyncio.sleep(params.interval_us / 1_000_000)
            yield messages_pb2.StreamingOutputCallResponse(payload=_payload(params.size))

    # -- the methods ---------------------------------------------------------

    async def EmptyCall(  # noqa: N802 - the gRPC method's name
        self, request: empty_pb2.Empty, context: _Context
    ) -> empty_pb2.Empty:
        call = self._begin("EmptyCall", context)
        call.finished = True
        return empty_pb2.Empty()

    async def UnaryCall(  # noqa: N802
        self, request: messages_pb2.SimpleRequest, context: _Context
    ) -> messages_pb2.SimpleResponse:
        call = self._begin("UnaryCall", context)
        trailing = await self._echo_metadata(context)
        if request.HasField("response_status"):
            await self._echo_status(call, request.response_status, context, trailing)
        call.finished = True
        if request.response_type != messages_pb2.COMPRESSABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unsupported response_type")
        return messages_pb2.SimpleResponse(payload=_payload(request.response_size))

    async def StreamingOutputCall(  # noqa: N802
        self, request: messages_pb2.StreamingOutputCallRequest, context: _Context
    ) -> AsyncIterator[messages_pb2.StreamingOutputCallResponse]:
        call = self._begin("StreamingOutputCall", context)
        trailing = await self._echo_metadata(context)
        async for response in self._respond(request):
            yield response
        if request.HasField("response_status"):
            await self._echo_status(call, request.response_status, context, trailing)
        call.finished = True

    async def StreamingInputCall(  # noqa: N802
        self,
        requests: AsyncIterator[messages_pb2.StreamingInputCallRequest],
        context: _Context,
    ) -> messages_pb2.StreamingInputCallResponse:
        call = self._begin("StreamingInputCall", context)
        size = 0
        async for request in requests:
            size += len(request.payload.body)
        await self._linger()
        call.finished = True
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=size)

    async def FullDuplexCall(  # noqa: N802
        self,
        requests: AsyncIterator[messages_pb2.StreamingOutputCallRequest],
        context: _Context,
    ) -> AsyncIterator[messages_pb2.StreamingOutputCallResponse]:
        call = self._begin("FullDuplexCall", context)
        trailing = await self._echo_metadata(context)
        async for request in requests:
            async for response in self._respond(request):
                yield response
            if request.HasField("response_status"):
                await self._echo_status(call, request.response_status, context, trailing)
        await self._linger()
        call.finished = True

    async def HalfDuplexCall(  # noqa: N802
        self,
        requests: AsyncIterator[messages_pb2.StreamingOutputCallRequest],
        context: _Context,
    ) -> AsyncIterator[messages_pb2.StreamingOutputCallResponse]:
        call = self._begin("HalfDuplexCall", context)
        trailing = await self._echo_metadata(context)
        buffered = [request async for request in requests]
        await self._linger()
        for request in buffered:
            async for response in self._respond(request):
                yield response
            if request.HasField("response_status"):
                await self._echo_status(call, request.response_status, context, trailing)
        call.finished = True


def interop_registrar(service: InteropService) -> Callable[[aio.Server], None]:
    """``register`` for ``lbgw.testing.serve`` that adds ``service`` as TestService."""

    def register(server: aio.Server) -> None:
        test_pb2_grpc.add_TestServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]

    return register
