"""The retry buffer: a streamed request replayed on another endpoint, and when it is not.

Real grpc.aio backends on 127.0.0.1, in this process or (for SIGKILL) in
their own. Active health checks are off where a test needs the failing
endpoint to stay in rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

import grpc
import pytest
from grpc import aio

from lbgw.pb import echo_pb2
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import config, request, settle, through

_Context: TypeAlias = aio.ServicerContext[Any, Any]

NO_CHECKS: dict[str, Any] = {"health_check": {"mode": "none"}}
#: Checks off and passive ejection off: only the retry logic acts.
ONLY_RETRIES: dict[str, Any] = NO_CHECKS | {"outlier_detection": {"consecutive_failures": 0}}
#: Kinds unknown: every method is forwarded as stream_stream (the quick form, --no-reflection).
UNKNOWN: dict[str, str] = {}
KINDS = pytest.mark.parametrize("methods", [None, UNKNOWN], ids=["kinds-known", "kinds-unknown"])


class Recording(EchoBackend):
    """Records each client-stream message it reads; with ``hold``, never answers."""

    def __init__(self, name: str, *, hold: bool = False) -> None:
        super().__init__(name)
        self.hold = hold
        self.got: list[str] = []

    async def ClientStream(  # noqa: N802 - the gRPC method's name
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> echo_pb2.EchoResponse:
        self.seen.calls += 1
        async for r in requests:
            self.got.append(r.message)
        if self.hold:
            await asyncio.Event().wait()
        return echo_pb2.EchoResponse(message=",".join(self.got), backend=self.name)


class FailsAfterHeaders(EchoBackend):
    """Sends its response headers (with metadata), then fails with UNAVAILABLE."""

    async def _headers_then_fail(self, context: _Context) -> None:
        self.seen.calls += 1
        await context.send_initial_metadata((("x-backend", self.name),))
        await asyncio.sleep(0.05)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails after headers")

    async def Unary(  # noqa: N802
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> echo_pb2.EchoResponse:
        await self._headers_then_fail(context)
        raise AssertionError("abort returned")

    async def ClientStream(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> echo_pb2.EchoResponse:
        async for _ in requests:
            pass
        await self._headers_then_fail(context)
        raise AssertionError("abort returned")


class FailsAfterReading(EchoBackend):
    """Reads the whole client stream, then fails with UNAVAILABLE (no response header)."""

    async def ClientStream(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> echo_pb2.EchoResponse:
        self.seen.calls += 1
        async for _ in requests:
            pass
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails")
        raise AssertionError("abort returned")


async def _messages(*texts: str, size: int = 0) -> AsyncIterator[echo_pb2.EchoRequest]:
    for text in texts:
        yield request(message=text, payload=b"x" * size)


# --- a backend killed under sequential unary calls, kinds unknown -------------------------


@contextlib.contextmanager
def _backend_process(name: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m lbgw.testing NAME`` on a free port; SIGKILLed by PID at exit if still up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lbgw.testing", name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        yield process, address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("run", range(2))
async def test_a_backend_killed_when_next_in_rotation_loses_no_call(run: int) -> None:
    with (
        _backend_process("a") as (_, a),
        _backend_process("b") as (_, b),
        _backend_process("c") as (victim, c),
    ):
        # The quick form with --no-reflection: kinds unknown, every call forwarded as a stream.
        cfg = config([a, b, c], methods=UNKNOWN, cluster={"reflection": False})
        async with through(cfg) as t:
            assert t.gateway.clusters["echo"].kinds == {}
            failed: list[str] = []
            kill_after = 30 + 3 * run
            killed = False
            for i in range(100):
                try:
                    reply = await t.stub.Unary(request(message=str(i)), timeout=10)
                except aio.AioRpcError as error:
                    failed.append(f"{i}: {error.code().name} {error.details()}")
                    continue
                # swrr with equal weights goes a, b, c, a, ...: c is next after b.
                if not killed and i >= kill_after and reply.backend == "b":
                    os.kill(victim.pid, signal.SIGKILL)
                    killed = True
            assert killed
            assert failed == []
            assert t.gateway.clusters["echo"].retry_stats["sent"] >= 1
            assert await settle(t.gateway) == [0, 0, 0]


# --- a client stream replayed whole ---------------------------------------------------


@KINDS
async def test_a_client_stream_whose_backend_dies_before_responding_is_replayed_in_order(
    methods: dict[str, str] | None,
) -> None:
    dying, good = Recording("dying", hold=True), Recording("good")
    server = aio.server()
    echo_registrar(dying)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with serve(echo_registrar(good)) as good_addr:
            cfg = config([f"127.0.0.1:{port}", good_addr], methods=methods, cluster=ONLY_RETRIES)
            async with through(cfg) as t:
                call = t.stub.ClientStream(_messages("m1", "m2", "m3"), timeout=15)
                async with asyncio.timeout(10):
                    while len(dying.got) < 3:
                        await asyncio.sleep(0.01)
                await server.stop(0)  # it dies before it responds
                reply = await call
                assert (reply.backend, reply.message) == ("good", "m1,m2,m3")
                assert good.got == ["m1", "m2", "m3"]
                assert t.gateway.clusters["echo"].retry_stats["sent"] == 1
                assert await settle(t.gateway) == [0, 0]
    finally:
        await server.stop(0)


@KINDS
async def test_a_replay_carries_on_with_the_live_stream(methods: dict[str, str] | None) -> None:
    dying, good = Recording("dying", hold=True), Recording("good")
    server = aio.server()
    echo_registrar(dying)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    more = asyncio.Event()

    async def client() -> AsyncIterator[echo_pb2.EchoRequest]:
        yield request(message="m1")
        yield request(message="m2")
        await more.wait()
        yield request(message="m3")

    try:
        async with serve(echo_registrar(good)) as good_addr:
            cfg = config([f"127.0.0.1:{port}", good_addr], methods=methods, cluster=ONLY_RETRIES)
            async with through(cfg) as t:
                call = t.stub.ClientStream(client(), timeout=15)
                async with asyncio.timeout(10):
                    while len(dying.got) < 2:
                        await asyncio.sleep(0.01)
                await server.stop(0)  # dies mid-stream, lbgw waiting on the client
                async with asyncio.timeout(10):
                    while len(good.got) < 2:
                        await asyncio.sleep(0.01)
                more.set()
                reply = await call
                assert (reply.backend, reply.message) == ("good", "m1,m2,m3")
                assert good.got == ["m1", "m2", "m3"]
    finally:
        await server.stop(0)


# --- when the buffer cannot help: no retry ------------------------------------------------


@KINDS
async def test_past_the_buffer_limit_no_retry_and_the_original_status(
    methods: dict[str, str] | None,
) -> None:
    bad, good = FailsAfterReading("bad"), EchoBackend("good")
    retries = {"retry_buffer_bytes": 1000}
    async with serve(echo_registrar(bad)) as bad_addr, serve(echo_registrar(good)) as good_addr:
        cfg = config(
            [bad_addr, good_addr], methods=methods, cluster=ONLY_RETRIES | {"retries": retries}
        )
        async with through(cfg) as t:
            with pytest.raises(aio.AioRpcError) as info:
                await t.stub.ClientStream(_messages("1", "2", "3", size=400), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "bad fails"
            assert (bad.seen.calls, good.seen.calls) == (1, 0)
            assert t.gateway.clusters["echo"].retry_stats["sent"] == 0
            # Within the limit, the same call is replayed.
            reply = await t.stub.ClientStream(_messages("1", "2", "3", size=300), timeout=10)
            assert (reply.backend, reply.index) == ("good", 3)
            assert await settle(t.gateway) == [0, 0]


@pytest.mark.parametrize(
    ("method", "methods"),
    [("ClientStream", None), ("ClientStream", UNKNOWN), ("Unary", UNKNOWN)],
    ids=["client-stream-known", "client-stream-unknown", "unary-unknown"],
)
async def test_after_response_headers_no_retry(method: str, methods: dict[str, str] | None) -> None:
    bad, good = FailsAfterHeaders("bad"), EchoBackend("good")
    async with serve(echo_registrar(bad)) as bad_addr, serve(echo_registrar(good)) as good_addr:
        cfg = config([bad_addr, good_addr], methods=methods, cluster=ONLY_RETRIES)
        async with through(cfg) as t:
            with pytest.raises(aio.AioRpcError) as info:
                if method == "Unary":
                    await t.stub.Unary(request(message="u"), timeout=10)
                else:
                    await t.stub.ClientStream(_messages("1", "2"), timeout=10)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "bad fails after headers"
            assert ("x-backend", "bad") in tuple(info.value.initial_metadata() or ())
            assert (bad.seen.calls, good.seen.calls) == (1, 0)
            assert t.gateway.clusters["echo"].retry_stats["sent"] == 0
            assert await settle(t.gateway) == [0, 0]
