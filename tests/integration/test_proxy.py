"""Forwarding through a real gateway: distribution, metadata, deadlines, cancels, limits, errors.

Client, gateway and echo backends are real grpc.aio peers on 127.0.0.1.
Each test bounds its waits; in-flight counts are checked to return to zero,
so a leaked call fails the test that leaked it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc import aio

from lbgw._grpc_private import send_message
from lbgw.config import MethodKind
from lbgw.pb import echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.h2wire import frame_relay
from tests.integration.support import (
    ALL_KINDS,
    UNARY,
    config,
    echo_backends,
    request,
    settle,
    through,
)

#: The frame relay counts every stream; health checks would add their own.
NO_CHECKS = {"health_check": {"mode": "none"}}
# No stream but the test's own reaches the backend: no health checks, no reflection.
QUIET = {**NO_CHECKS, "reflection": False}

MiB = 1024 * 1024
KINDS = pytest.mark.parametrize("methods", [ALL_KINDS, {}], ids=["kinds-known", "kinds-unknown"])


async def _requests(n: int, **fields: object) -> AsyncIterator[object]:
    for i in range(n):
        yield request(message=str(i), **fields)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- distribution ----------------------------------------------------------


@KINDS
async def test_swrr_3_to_1_splits_100_calls_exactly_75_25(methods: dict[str, str]) -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs, through(config(addrs, [3, 1], methods=methods)) as t:
        got = collections.Counter(
            [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(100)]
        )
    assert got == {"a": 75, "b": 25}
    assert (a.seen.calls, b.seen.calls) == (75, 25)


async def test_round_robin_splits_50_50() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with (
        echo_backends(a, b) as addrs,
        through(config(addrs, [3, 1], strategy="round_robin")) as t,
    ):
        got = [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(100)]
    assert collections.Counter(got) == {"a": 50, "b": 50}
    assert got[:4] == ["a", "b", "a", "b"]


async def test_ewma_sends_far_fewer_calls_to_a_20ms_backend_than_to_a_1ms_one() -> None:
    slow, fast = EchoBackend("slow", delay=0.020), EchoBackend("fast", delay=0.001)
    async with (
        echo_backends(slow, fast) as addrs,
        through(config(addrs, strategy="ewma", cluster={"params": {"default_rtt": 0.005}})) as t,
    ):
        # Four concurrent callers, 200 calls: enough for the estimates to
        # settle and for in-flight counts to matter.
        async def caller() -> list[str]:
            return [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(50)]

        async with asyncio.timeout(30):
            results = await asyncio.gather(*(caller() for _ in range(4)))
    got = collections.Counter(b for r in results for b in r)
    assert got["fast"] + got["slow"] == 200
    assert got["slow"] < got["fast"] / 4, got


# --- metadata, status, deadlines -------------------------------------------


@KINDS
async def test_request_metadata_reaches_the_backend_with_binary_values_intact(
    methods: dict[str, str],
) -> None:
    backend = EchoBackend("a")
    sent = (
        ("x-tenant", "acme"),
        ("x-blob-bin", b"\x00\xff\x10"),
        ("x-multi", "1"),
        ("x-multi", "2"),
    )
    async with echo_backends(backend) as addrs, through(config(addrs, methods=methods)) as t:
        await t.stub.Unary(request(), metadata=sent, timeout=5)
        replies = t.stub.ServerStream(request(response_count=2), metadata=sent, timeout=5)
        assert [r.index async for r in replies] == [0, 1]
    for seen in backend.seen.metadata:
        forwarded = [kv for kv in seen if kv[0].startswith("x-")]
        assert forwarded == list(sent)


async def test_backend_status_details_and_metadata_pass_through_on_every_kind() -> None:
    backend = EchoBackend("a")
    details = "\t\nnot here ☺ 😈\r\n"
    fail = {"status_code": grpc.StatusCode.NOT_FOUND.value[0], "status_message": details}
    async with echo_backends(backend) as addrs, through(config(addrs)) as t:
        calls = [
            t.stub.Unary(request(**fail), timeout=5),
            t.stub.ClientStream(_requests(2, **fail), timeout=5),
        ]
        for call in calls:
            with pytest.raises(aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
            assert info.value.details() == details
        for stream in (
            t.stub.ServerStream(request(**fail), timeout=5),
            t.stub.Bidi(_requests(2, **fail), timeout=5),
        ):
            with pytest.raises(aio.AioRpcError) as info:
                async for _ in stream:
                    pass
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
            assert info.value.details() == details
        assert await settle(t.gateway) == [0]


@KINDS
async def test_the_client_deadline_becomes_the_backend_timeout(methods: dict[str, str]) -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as addrs, through(config(addrs, methods=methods)) as t:
        await t.stub.Unary(request(), timeout=3.0)
        await t.stub.Unary(request())
    with_deadline, without = backend.seen.time_remaining
    # gRPC encodes the timeout on the wire rounded up to its unit, hence the slack.
    assert with_deadline is not None and 2.0 < with_deadline <= 3.1
    assert without is None


@KINDS
async def test_a_deadline_that_expires_at_the_backend_is_deadline_exceeded(
    methods: dict[str, str],
) -> None:
    backend = EchoBackend("a", delay=2.0)
    async with echo_backends(backend) as addrs, through(config(addrs, methods=methods)) as t:
        with pytest.raises(aio.AioRpcError) as info:
            await t.stub.Unary(request(), timeout=0.2)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        async with asyncio.timeout(5):
            await backend.cancel_seen.wait()  # the backend's call ended too
        assert await settle(t.gateway) == [0]


# --- cancellation -----------------------------------------------------------


@KINDS
async def test_a_client_cancel_cancels_the_backend_call(methods: dict[str, str]) -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as addrs, through(config(addrs, methods=methods)) as t:
        unary = t.stub.Unary(request(delay_ms=10_000), timeout=30)
        await asyncio.sleep(0.2)
        unary.cancel()
        async with asyncio.timeout(5):
            await backend.cancel_seen.wait()
        backend.cancel_seen.clear()

        stream = t.stub.ServerStream(request(response_count=1000, delay_ms=5), timeout=30)
        first = await stream.read()
        assert first.index == 0
        stream.cancel()
        async with asyncio.timeout(5):
            await backend.cancel_seen.wait()
        assert backend.seen.cancelled == 2
        assert await settle(t.gateway) == [0]


# --- message size limits ----------------------------------------------------


@KINDS
async def test_messages_up_to_the_limit_pass_and_larger_ones_are_resource_exhausted(
    methods: dict[str, str],
) -> None:
    backend = EchoBackend("a")
    big = {"max_send_message_length": 64 * MiB, "max_receive_message_length": 64 * MiB}
    async with (
        echo_backends(backend) as addrs,
        through(
            config(
                addrs,
                methods=methods,
                limits={"max_receive_message_bytes": MiB, "max_send_message_bytes": MiB},
            ),
            **{f"grpc.{k}": v for k, v in big.items()},
        ) as t,
    ):
        fits = MiB - 64  # room for the message's own framing
        reply = await t.stub.Unary(request(payload=b"p" * fits), timeout=10)
        assert len(reply.payload) == fits

        with pytest.raises(aio.AioRpcError) as info:  # too large on the way in
            await t.stub.Unary(request(payload=b"p" * (MiB + 1)), timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert backend.seen.calls == 1

        with pytest.raises(aio.AioRpcError) as info:  # too large on the way out
            await t.stub.Unary(request(response_size=MiB + 1), timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await settle(t.gateway) == [0]


async def test_the_default_limit_is_4_mib() -> None:
    backend = EchoBackend("a")
    big = {"grpc.max_send_message_length": 64 * MiB, "grpc.max_receive_message_length": 64 * MiB}
    async with echo_backends(backend) as addrs, through(config(addrs), **big) as t:
        reply = await t.stub.Unary(request(payload=b"p" * (4 * MiB - 64)), timeout=10)
        assert len(reply.payload) == 4 * MiB - 64
        with pytest.raises(aio.AioRpcError) as info:
            await t.stub.Unary(request(payload=b"p" * (4 * MiB + 1)), timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


# --- lbgw's own answers -----------------------------------------------------


async def test_an_unrouted_method_is_unimplemented_naming_the_method() -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as addrs:
        cfg = config(addrs, routes=[{"service": "other.v1.Thing", "cluster": "echo"}])
        async with through(cfg) as t:
            with pytest.raises(aio.AioRpcError) as info:
                await t.stub.Unary(request(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert UNARY in (info.value.details() or "")
    assert backend.seen.calls == 0


@KINDS
async def test_no_eligible_endpoint_is_unavailable_naming_the_cluster(
    methods: dict[str, str],
) -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addrs,
        through(config(addrs, methods=methods, cluster=NO_CHECKS)) as t,
    ):
        health = t.gateway.clusters["echo"].health
        health.check_failed(health.endpoints[0], "test", explicit=True)
        for call in (t.stub.Unary(request(), timeout=5),):
            with pytest.raises(aio.AioRpcError) as info:
                await call
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "'echo'" in (info.value.details() or "")
            assert "no endpoint of cluster 'echo' is healthy" in (info.value.details() or "")
        with pytest.raises(aio.AioRpcError) as info:
            async for _ in t.stub.Bidi(_requests(1), timeout=5):
                pass
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert backend.seen.calls == 0
        assert await settle(t.gateway) == [0]


@KINDS
async def test_a_backend_that_is_down_is_unavailable_naming_the_endpoint(
    methods: dict[str, str],
) -> None:
    down = _closed_port()
    # Health checks off: with them, the first failed check would take the
    # endpoint out and the call would fail fast with "no endpoint is healthy".
    async with through(config([down], methods=methods, cluster=NO_CHECKS)) as t:
        with pytest.raises(aio.AioRpcError) as info:
            await t.stub.Unary(request(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert down in (info.value.details() or "")
        with pytest.raises(aio.AioRpcError) as info:
            async for _ in t.stub.ServerStream(request(), timeout=5):
                pass
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert down in (info.value.details() or "")
        assert await settle(t.gateway) == [0]


# --- streams ------------------------------------------------------------------


@KINDS
async def test_every_call_kind_round_trips(methods: dict[str, str]) -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as addrs, through(config(addrs, methods=methods)) as t:
        assert (await t.stub.Unary(request(message="u"), timeout=5)).message == "u"
        replies = [r.index async for r in t.stub.ServerStream(request(response_count=5), timeout=5)]
        assert replies == [0, 1, 2, 3, 4]
        summary = await t.stub.ClientStream(_requests(7), timeout=5)
        assert (summary.index, summary.message) == (7, "6")
        echoed = [r.message async for r in t.stub.Bidi(_requests(5), timeout=5)]
        assert echoed == ["0", "1", "2", "3", "4"]
        empty = [r async for r in t.stub.Bidi(_requests(0), timeout=5)]
        assert empty == []
        assert await settle(t.gateway) == [0]


async def test_a_slow_reader_holds_back_the_backend_instead_of_filling_lbgw() -> None:
    backend = EchoBackend("a")
    total, size = 2000, 64 * 1024  # 125 MiB if lbgw buffered it all
    async with echo_backends(backend) as addrs, through(config(addrs)) as t:
        stream = t.stub.ServerStream(request(response_count=total, response_size=size), timeout=30)
        for _ in range(3):
            await stream.read()
        await asyncio.sleep(1.0)  # the reader stalls; the backend keeps trying to send
        sent_while_stalled = backend.seen.sent
        # Flow-control windows on two hops hold some MiB at most, not the stream.
        assert sent_while_stalled < total // 4, sent_while_stalled
        count = 3
        while await stream.read() is not aio.EOF:
            count += 1
        assert count == total
        assert await settle(t.gateway) == [0]


async def test_reflection_gives_unary_methods_the_fast_path() -> None:
    backend = EchoBackend("a")
    async with serve(echo_registrar(backend, reflection=True)) as addr:
        cfg = config([addr], methods={}, cluster={"reflection": True})
        async with through(cfg) as t:
            kinds = t.gateway.clusters["echo"].kinds
            assert kinds == {m: MethodKind(k) for m, k in ALL_KINDS.items()}
            assert _handler_form(t.gateway, UNARY) == (False, False)  # unary_unary
            assert _handler_form(t.gateway, "/lbgw.echo.v1.Echo/ClientStream") == (True, False)
            assert (await t.stub.Unary(request(message="r"), timeout=5)).message == "r"


def _handler_form(gateway: Gateway, method: str) -> tuple[bool, bool]:
    """(request_streaming, response_streaming) of the handler lbgw serves ``method`` with."""
    assert gateway.proxy is not None
    details = cast(grpc.HandlerCallDetails, SimpleNamespace(method=method))
    handler = gateway.proxy.service(details)
    assert handler is not None
    return handler.request_streaming, handler.response_streaming


async def test_a_method_of_unknown_kind_is_forwarded_as_stream_stream() -> None:
    async with echo_backends(EchoBackend("a")) as addrs, through(config(addrs, methods={})) as t:
        assert _handler_form(t.gateway, UNARY) == (True, True)
        assert (await t.stub.Unary(request(message="s"), timeout=5)).message == "s"


# --- misbehaving peers ----------------------------------------------------------


async def test_a_backend_killed_mid_stream_gives_unavailable_and_frees_the_call() -> None:
    backend = EchoBackend("dying")
    server = aio.server()
    echo_registrar(backend)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with through(config([f"127.0.0.1:{port}"])) as t:
            stream = t.stub.ServerStream(request(response_count=1000, delay_ms=10), timeout=30)
            assert (await stream.read()).index == 0
            await server.stop(0)
            with pytest.raises(aio.AioRpcError) as info:
                async with asyncio.timeout(10):
                    while await stream.read() is not aio.EOF:
                        pass
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await settle(t.gateway) == [0]
    finally:
        await server.stop(0)


async def test_a_client_that_vanishes_mid_stream_cancels_the_backend_call() -> None:
    # Read off the wire: grpc.aio's server may end a cancelled bidi handler
    # as if its request stream had ended, so the backend's own view is not
    # a reliable witness.
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as (addr,),
        frame_relay(addr) as (relay, events),
        Gateway(config([relay], cluster=QUIET)) as gateway,
    ):
        channel = aio.insecure_channel(gateway.addresses[0])
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        bidi = stub.Bidi(_requests(1_000_000, delay_ms=0), timeout=30)
        assert (await bidi.read()).index == 0
        await channel.close(grace=None)  # the connection goes away, no cancel sent first
        async with asyncio.timeout(5):
            while not events:
                await asyncio.sleep(0.01)
        assert list(events.values()) == [["RST_STREAM"]]
        assert await settle(gateway) == [0]


@KINDS
async def test_a_client_cancel_mid_upload_reaches_the_backend_as_a_cancel_not_an_end(
    methods: dict[str, str],
) -> None:
    # grpc.aio's server ends a request stream alike for a half-close and a
    # cancel, so what lbgw sends the backend is read off the wire itself.
    # lbgw tells them apart by the cancel reaching its handler a loop turn
    # later; when gRPC's poller thread is starved of CPU for a time slice the
    # cancel can come later still (seen about once in 100 cancels with both
    # cores busy), so one stray END_STREAM of ten is tolerated. Before the
    # feeder, all ten went out as END_STREAM.
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as (addr,),
        frame_relay(addr) as (relay, events),
        through(config([relay], methods=methods, cluster=QUIET)) as t,
    ):
        for _ in range(10):
            queue: asyncio.Queue[object] = asyncio.Queue()

            async def feed(q: asyncio.Queue[object] = queue) -> AsyncIterator[object]:
                while (item := await q.get()) is not None:
                    yield item

            call = t.stub.ClientStream(feed(), timeout=10)
            for n in range(3):
                await queue.put(request(message=str(n), delay_ms=200))
            await asyncio.sleep(0.05)
            call.cancel()
            await asyncio.sleep(0.05)
        reply = await t.stub.ClientStream(_requests(3), timeout=10)  # a normal end
        assert reply.index == 3
        assert await settle(t.gateway) == [0]
    endings = [events[stream] for stream in sorted(events)]
    cancelled, normal = endings[:-1], endings[-1]
    assert len(cancelled) == 10 and normal == ["END_STREAM"], endings
    assert all(ending[-1] == "RST_STREAM" for ending in cancelled), endings
    assert sum("END_STREAM" in ending for ending in cancelled) <= 1, endings


class _Refuser(grpc.GenericRpcHandler):
    """A backend that refuses every call before reading it, as an auth check would."""

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def refuse(requests: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry")

        return grpc.stream_stream_rpc_method_handler(refuse)


@KINDS
async def test_a_status_sent_before_the_request_stream_is_read_passes_through(
    methods: dict[str, str],
) -> None:
    # grpc.aio's own request writer turns this into INTERNAL "Internal error
    # from Core" now and then (grpc/grpc#36066). The test's client writes the
    # way lbgw does (_grpc_private.send_message), so that lbgw's writer is the one on trial.
    message = request(payload=b"p" * 1000).SerializeToString()
    async with (
        serve(lambda s: s.add_generic_rpc_handlers((_Refuser(),))) as addr,
        through(config([addr], methods=methods, cluster=NO_CHECKS)) as t,
    ):
        upload: Any = t.channel.stream_unary("/lbgw.echo.v1.Echo/ClientStream")
        for _ in range(40):
            call = upload()
            with pytest.raises(aio.AioRpcError) as info:
                await call.wait_for_connection()
                for _ in range(50):
                    if not await send_message(call, message):
                        break
                await call.done_writing()
                await call
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED, info.value
            assert info.value.details() == "no entry"
        assert await settle(t.gateway) == [0]
