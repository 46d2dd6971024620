"""The gRPC interop test cases, run through lbgw.

Each case follows its client procedure and asserts what the public interop
spec (grpc/grpc ``doc/interop-test-descriptions.md``) says the client must
see. The client talks to a real lbgw listener on ``127.0.0.1:0``, which
forwards to the interop ``TestService`` of ``interop_service.py``, served on
another loopback port.

Every case runs three times, by the ``target`` fixture:

* ``kinds``: lbgw's cluster declares every method's kind, so unary methods
  take the unary fast path and streaming methods their own handler forms;
* ``fallback``: no kinds are declared, so every method is forwarded as a
  bidi stream (lbgw's stream_stream fallback);
* ``direct``: no lbgw at all, the client calls the backend. It is the
  control: a case that fails through lbgw but passes here is an lbgw bug.

Every case runs on asyncio's own event loop and on uvloop (ids ``asyncio``
and ``uvloop``; ``pytest_asyncio_loop_factories`` in tests/conftest.py), the
two loops lbgw's ``[server] event_loop`` chooses between.

Every wait is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from lbgw import loops
from lbgw.config import config_from_mapping
from lbgw.pb.interop import empty_pb2, messages_pb2, test_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import serve
from tests.integration.interop_service import (
    ECHO_INITIAL,
    ECHO_TRAILING,
    InteropService,
    interop_registrar,
)

#: Bound on any single wait; far above what a loopback call needs.
WAIT = 10.0

SERVICE = "grpc.testing.TestService"
METHOD_KINDS = {
    f"/{SERVICE}/EmptyCall": "unary",
    f"/{SERVICE}/UnaryCall": "unary",
    f"/{SERVICE}/StreamingOutputCall": "server_streaming",
    f"/{SERVICE}/StreamingInputCall": "client_streaming",
    f"/{SERVICE}/FullDuplexCall": "bidi_streaming",
    f"/{SERVICE}/HalfDuplexCall": "bidi_streaming",
    f"/{SERVICE}/UnimplementedCall": "unary",
    "/grpc.testing.UnimplementedService/UnimplementedCall": "unary",
}

INITIAL_VALUE = "test_initial_metadata_value"
TRAILING_VALUE = b"\xab\xab\xab"
ECHO_METADATA = ((ECHO_INITIAL, INITIAL_VALUE), (ECHO_TRAILING, TRAILING_VALUE))


def gateway_config(backend: str, *, kinds: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "endpoints": [{"address": backend, "weight": 1}],
        "strategy": "swrr",
    }
    if kinds:
        cluster["methods"] = METHOD_KINDS
    else:  # the interop service serves no reflection; no kinds, however asked
        cluster["reflection"] = False
    return {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {"interop": cluster},
        "routes": [
            {"service": SERVICE, "cluster": "interop"},
            {"service": "grpc.testing.UnimplementedService", "cluster": "interop"},
        ],
    }


@pytest.fixture
def service() -> InteropService:
    return InteropService()


@pytest.fixture
async def backend(service: InteropService) -> AsyncIterator[str]:
    async with serve(interop_registrar(service)) as address:
        yield address


@pytest.fixture(params=["kinds", "fallback", "direct"])
async def target(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[str]:
    """The address the client calls: an lbgw listener, or the backend itself."""
    if request.param == "direct":
        yield backend
        return
    kinds = request.param == "kinds"
    config = config_from_mapping(gateway_config(backend, kinds=kinds), source="<interop test>")
    async with Gateway(config) as gateway:
        yield gateway.addresses[0]


@pytest.fixture
async def channel(target: str) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(target) as channel:
        yield channel


@pytest.fixture
def stub(channel: aio.Channel) -> Any:
    return test_pb2_grpc.TestServiceStub(channel)  # type: ignore[no-untyped-call]


def zeros(size: int) -> messages_pb2.Payload:
    return messages_pb2.Payload(body=bytes(size))


def sizes(responses: list[messages_pb2.StreamingOutputCallResponse]) -> list[int]:
    return [len(r.payload.body) for r in responses]


def duplex_request(
    response_size: int | None = None, payload_size: int | None = None
) -> messages_pb2.StreamingOutputCallRequest:
    request = messages_pb2.StreamingOutputCallRequest()
    if response_size is not None:
        request.response_parameters.add(size=response_size)
    if payload_size is not None:
        request.payload.CopyFrom(zeros(payload_size))
    return request


async def read_all(call: Any) -> list[messages_pb2.StreamingOutputCallResponse]:
    return [response async for response in call]


def metadata_values(metadata: aio.Metadata | None, key: str) -> list[str | bytes]:
    return [] if metadata is None else list(metadata.get_all(key))


# -- unary ---------------------------------------------------------------------


async def test_empty_unary(stub: Any) -> None:
    async with asyncio.timeout(WAIT):
        response = await stub.EmptyCall(empty_pb2.Empty())
    assert isinstance(response, empty_pb2.Empty)
    assert response.ByteSize() == 0


async def test_large_unary(stub: Any) -> None:
    request = messages_pb2.SimpleRequest(response_size=314159, payload=zeros(271828))
    async with asyncio.timeout(WAIT):
        response = await stub.UnaryCall(request)
    assert response.payload.body == bytes(314159)


# -- streaming -----------------------------------------------------------------


async def test_client_streaming(stub: Any) -> None:
    async with asyncio.timeout(WAIT):
        call = stub.StreamingInputCall()
        for size in (27182, 8, 1828, 45904):
            await call.write(messages_pb2.StreamingInputCallRequest(payload=zeros(size)))
        await call.done_writing()
        response = await call
    assert response.aggregated_payload_size == 74922
    assert await call.code() == grpc.StatusCode.OK


async def test_server_streaming(stub: Any) -> None:
    request = messages_pb2.StreamingOutputCallRequest()
    for size in (31415, 9, 2653, 58979):
        request.response_parameters.add(size=size)
    async with asyncio.timeout(WAIT):
        call = stub.StreamingOutputCall(request)
        responses = await read_all(call)
        code = await call.code()
    assert code == grpc.StatusCode.OK
    assert sizes(responses) == [31415, 9, 2653, 58979]
    assert all(r.payload.body == bytes(len(r.payload.body)) for r in responses)


async def test_ping_pong(stub: Any) -> None:
    steps = [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]
    responses = []
    async with asyncio.timeout(WAIT):
        call = stub.FullDuplexCall()
        for response_size, payload_size in steps:
            await call.write(duplex_request(response_size, payload_size))
            response = await call.read()
            assert response is not aio.EOF, "the stream ended before its reply"
            responses.append(response)
        await call.done_writing()
        assert await call.read() is aio.EOF
        code = await call.code()
    assert code == grpc.StatusCode.OK
    assert sizes(responses) == [31415, 9, 2653, 58979]


async def test_empty_stream(stub: Any) -> None:
    async with asyncio.timeout(WAIT):
        call = stub.FullDuplexCall()
        await call.done_writing()
        responses = await read_all(call)
        code = await call.code()
    assert code == grpc.StatusCode.OK
    assert responses == []


# -- metadata and status -------------------------------------------------------


async def test_custom_metadata_unary(stub: Any) -> None:
    request = messages_pb2.SimpleRequest(response_size=314159, payload=zeros(271828))
    async with asyncio.timeout(WAIT):
        call = stub.UnaryCall(request, metadata=ECHO_METADATA)
        response = await call
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
    assert len(response.payload.body) == 314159
    assert metadata_values(initial, ECHO_INITIAL) == [INITIAL_VALUE]
    assert metadata_values(trailing, ECHO_TRAILING) == [TRAILING_VALUE]


async def test_custom_metadata_full_duplex(stub: Any) -> None:
    async with asyncio.timeout(WAIT):
        call = stub.FullDuplexCall(metadata=ECHO_METADATA)
        await call.write(duplex_request(314159, 271828))
        await call.done_writing()
        responses = await read_all(call)
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
        code = await call.code()
    assert code == grpc.StatusCode.OK
    assert sizes(responses) == [314159]
    assert metadata_values(initial, ECHO_INITIAL) == [INITIAL_VALUE]
    assert metadata_values(trailing, ECHO_TRAILING) == [TRAILING_VALUE]


STATUS_MESSAGES = {
    "plain": "test status message",
    "special": "\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n",
}


@pytest.mark.parametrize("message", STATUS_MESSAGES.values(), ids=STATUS_MESSAGES.keys())
async def test_status_code_and_message_unary(stub: Any, message: str) -> None:
    """status_code_and_message (unary step) and special_status_message."""
    request = messages_pb2.SimpleRequest(
        response_status=messages_pb2.EchoStatus(code=2, message=message)
    )
    async with asyncio.timeout(WAIT):
        with pytest.raises(aio.AioRpcError) as raised:
            await stub.UnaryCall(request)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN  # code 2
    assert raised.value.details() == message


async def test_status_code_and_message_full_duplex(stub: Any) -> None:
    request = messages_pb2.StreamingOutputCallRequest(
        response_status=messages_pb2.EchoStatus(code=2, message="test status message")
    )
    async with asyncio.timeout(WAIT):
        call = stub.FullDuplexCall()
        await call.write(request)
        await call.done_writing()
        with pytest.raises(aio.AioRpcError) as raised:
            await read_all(call)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    assert raised.value.details() == "test status message"


#: The unimplemented cases make this many calls, not one: a status that goes
#: wrong on a few percent of calls (a race) must fail the test every time.
REPEAT = 100


async def test_unimplemented_method(stub: Any) -> None:
    for _ in range(REPEAT):
        async with asyncio.timeout(WAIT):
            with pytest.raises(aio.AioRpcError) as raised:
                await stub.UnimplementedCall(empty_pb2.Empty())
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, raised.value


async def test_unimplemented_service(channel: aio.Channel) -> None:
    stub: Any = test_pb2_grpc.UnimplementedServiceStub(channel)  # type: ignore[no-untyped-call]
    for _ in range(REPEAT):
        async with asyncio.timeout(WAIT):
            with pytest.raises(aio.AioRpcError) as raised:
                await stub.UnimplementedCall(empty_pb2.Empty())
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED, raised.value


# -- deadlines and cancellation ------------------------------------------------


def masked_by_client(error: aio.AioRpcError) -> bool:
    """A write failed as the RPC ended, and grpc.aio reported INTERNAL instead of its status.

    grpc/grpc#36066: ``_write`` overwrites the status Core delivered with
    "Internal error from Core" when the send fails because the call is over.
    With a 1 ms deadline the write races the deadline, so this happens to a
    few percent of calls, with or without lbgw.
    """
    debug = error.debug_error_string() or ""
    return error.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in debug


async def test_timeout_on_sleeping_server(stub: Any) -> None:
    for _attempt in range(5):  # a status the client library masked says nothing: try again
        async with asyncio.timeout(WAIT):
            call = stub.FullDuplexCall(timeout=0.001)
            with pytest.raises(aio.AioRpcError) as raised:
                await call.write(duplex_request(payload_size=27182))
                await read_all(call)  # the client waits, the server sleeps
            code = await call.code()
        if not masked_by_client(raised.value):
            break
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


async def seen_by_backend(event: asyncio.Event, what: str) -> None:
    """Wait (bounded) for the backend to record ``what``; fail the test saying so if not."""
    try:
        async with asyncio.timeout(WAIT):
            await event.wait()
    except TimeoutError:
        pytest.fail(f"the backend did not see {what} within {WAIT} s")


async def test_cancel_after_begin(stub: Any, service: InteropService) -> None:
    service.linger = 2 * WAIT  # a cancel must interrupt it; see interop_service
    async with asyncio.timeout(WAIT):
        call = stub.StreamingInputCall()
        await call.wait_for_connection()  # the call's headers are on the wire
    await seen_by_backend(service.started["StreamingInputCall"], "the call start")
    assert call.cancel()
    async with asyncio.timeout(WAIT):
        with pytest.raises(asyncio.CancelledError):
            await call
        code = await call.code()
    assert code == grpc.StatusCode.CANCELLED
    await seen_by_backend(service.cancelled["StreamingInputCall"], "the cancel")
    assert service.cancels == {"StreamingInputCall": 1}


async def test_cancel_after_first_response(stub: Any, service: InteropService) -> None:
    service.linger = 2 * WAIT
    async with asyncio.timeout(WAIT):
        call = stub.FullDuplexCall()
        await call.write(duplex_request(31415, 27182))
        response = await call.read()
    assert response is not aio.EOF
    assert len(response.payload.body) == 31415
    assert call.cancel()
    async with asyncio.timeout(WAIT):
        code = await call.code()
    assert code == grpc.StatusCode.CANCELLED
    await seen_by_backend(service.cancelled["FullDuplexCall"], "the cancel")
    assert service.cancels == {"FullDuplexCall": 1}


async def test_the_case_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    wanted = "uvloop" if "uvloop" in request.node.callspec.id else "asyncio"
    assert loops.loop_name(asyncio.get_running_loop()) == wanted
