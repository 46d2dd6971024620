"""100 server streams whose clients never send WINDOW_UPDATE: lbgw's memory stays bounded.

Each raw client reads its first 64 KiB and stops. Backpressure must reach
the backend: lbgw holds about one HTTP/2 window and one message per stream
(``admission.FLOW_CONTROL``), not whatever the backend can push. lbgw runs in
its own process, so that its resident memory is its own. Before the fix, the
same attack held 0.9 GB after one round and 1.2 GB after two
(``bench/hostile.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.testing import EchoBackend
from tests.hostile.rawh2 import raw_connect
from tests.integration.support import ALL_KINDS, echo_backends, lbgw_process, request

SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"
STREAMS = 100
#: The issue's target for 100 unread streams of 64 KiB messages, backend stalled.
RSS_LIMIT_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def stalled(backend: EchoBackend, timeout: float = 60.0) -> None:
    """Until the backend has sent nothing more for a second: flow control holds it."""
    async with asyncio.timeout(timeout):
        last = -1
        while backend.seen.sent != last:
            last = backend.seen.sent
            await asyncio.sleep(1.0)


async def test_unread_server_streams_hold_bounded_memory_and_give_it_back() -> None:
    backend = EchoBackend("a")
    message = request(message="slow", response_count=2**31, response_size=64 * 1024)
    async with echo_backends(backend) as (address,):
        methods = [f"--method={m}={k}" for m, k in ALL_KINDS.items()]
        async with lbgw_process(
            "--listen",
            "127.0.0.1:0",
            "--backend",
            address,
            "--health-check",
            "none",
            *methods,
            timeout=90,  # a loaded machine can take long to start a process
        ) as lbgw:
            peaks = []
            for _ in range(2):  # a second attack must not add to the first
                sent_before = backend.seen.sent
                async with contextlib.AsyncExitStack() as stack:
                    conns = [
                        await stack.enter_async_context(raw_connect(lbgw.address))
                        for _ in range(STREAMS // 10)
                    ]
                    for conn in conns:
                        conn.open_connection_window()
                        for _ in range(10):
                            conn.open(SERVER_STREAM, message.SerializeToString())
                        await conn.drain()
                    await stalled(backend)
                    peaks.append(rss_mb(lbgw.process.pid))
                    received = sum(s.received for c in conns for s in c.streams.values())
                    # The clients read their windows; the backend was held back too.
                    assert received <= STREAMS * 70 * 1024
                    assert backend.seen.sent - sent_before < STREAMS * 8
                    # A well-behaved client beside the attack is served.
                    reply = await _unary(lbgw.address)
                    assert reply == "good"
                assert lbgw.process.poll() is None
            assert max(peaks) < RSS_LIMIT_MB, peaks
            assert peaks[1] < peaks[0] * 1.25 + 20, peaks  # reused, not grown


async def _unary(address: str) -> str:
    async with aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        reply = await stub.Unary(request(message="good"), timeout=20)
        return str(reply.message)
