"""HTTP/2 rapid reset (CVE-2023-44487): a good client beside the attack loses no call.

The attacker opens 20,000 streams on one connection, each HEADERS and at
once RST_STREAM, as fast as it can send them. A well-behaved client on its
own connection makes unary calls one after another meanwhile: every one of
them must succeed (before lbgw's limits, 7 of 38 were CANCELLED), and lbgw
must still be up and serving. Its latency is measured by
``bench/hostile.py``, never asserted here. lbgw runs in its own process, as
in production, so the attack and the good client do not share its event loop.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.testing import EchoBackend
from tests.hostile.rawh2 import raw_connect
from tests.integration.support import ALL_KINDS, UNARY, echo_backends, lbgw_process, request

RESETS = 20_000


async def attack(address: str) -> int:
    """HEADERS + RST_STREAM ``RESETS`` times on one connection; how many were sent."""
    sent = 0
    async with raw_connect(address) as conn:
        try:
            for _ in range(RESETS):
                conn.reset(conn.open(UNARY, end=False))
                sent += 1
                if sent % 200 == 0:
                    await conn.drain()
                    if conn.closed.is_set():
                        break
            await conn.drain()
        except ConnectionError:
            pass  # lbgw may close the attacker's connection: that is allowed
    return sent


async def test_a_good_client_loses_no_call_to_a_rapid_reset_beside_it() -> None:
    backend = EchoBackend("a")
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
            async with aio.insecure_channel(lbgw.address) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                await stub.Unary(request(message="warm"), timeout=20)
                attacking = asyncio.ensure_future(attack(lbgw.address))
                codes: list[grpc.StatusCode] = []
                while not attacking.done() or len(codes) < 40:
                    try:
                        await stub.Unary(request(message="good"), timeout=30)
                        codes.append(grpc.StatusCode.OK)
                    except aio.AioRpcError as error:
                        codes.append(error.code())
                    await asyncio.sleep(0.01)
                sent = await attacking
                assert sent > 0
                assert set(codes) == {grpc.StatusCode.OK}, codes
                reply = await stub.Unary(request(message="after"), timeout=20)
                assert reply.message == "after"
            assert lbgw.process.poll() is None
            # Almost none of the reset streams reached the backend.
            assert backend.seen.calls < 100
            assert not [line for line in lbgw.lines if "Traceback" in str(line)]
