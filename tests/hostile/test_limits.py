"""lbgw's own limits, hit on purpose: what the clients see, and a good client beside them.

Each test runs a real gateway on 127.0.0.1 before real echo backends; the
hostile side is the raw HTTP/2 client (``rawh2``) or a real gRPC client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from lbgw.cli import _parser, _serve_config
from lbgw.testing import EchoBackend
from tests.hostile.rawh2 import raw_connect
from tests.integration.support import config, echo_backends, request, settle, through

BIDI = "/lbgw.echo.v1.Echo/Bidi"
NO_CHECKS = {"health_check": {"mode": "none"}}


async def good_call(stub: Any) -> None:
    """A well-behaved client's call: it must succeed."""
    reply = await stub.Unary(request(message="good"), timeout=10)
    assert reply.message == "good"


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_calls_past_the_gateway_cap_get_resource_exhausted_naming_it() -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS, limits={"max_calls_in_flight": 4})) as t,
    ):
        held = [
            asyncio.ensure_future(t.stub.Unary(request(message="held", delay_ms=1500), timeout=20))
            for _ in range(4)
        ]
        await wait_for(lambda: backend.seen.calls == 4)
        for _ in range(3):
            with pytest.raises(aio.AioRpcError) as refused:
                await t.stub.Unary(request(message="extra"), timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == "lbgw: gateway overloaded: max_calls_in_flight 4"
        assert [r.message for r in await asyncio.gather(*held)] == ["held"] * 4
        assert backend.seen.calls == 4  # the refused calls never left lbgw
        assert t.gateway.proxy is not None
        assert t.gateway.proxy.admission.refused == 3
        await good_call(t.stub)
        assert t.gateway.proxy.admission.in_flight == 0


async def test_a_tripped_circuit_breaker_gives_unavailable_and_is_not_retried() -> None:
    backends = [EchoBackend("a"), EchoBackend("b")]
    cluster = {**NO_CHECKS, "circuit_breakers": {"max_requests": 2}}
    async with (
        echo_backends(*backends) as addresses,
        through(config(addresses, cluster=cluster)) as t,
    ):
        held = [
            asyncio.ensure_future(t.stub.Unary(request(message="held", delay_ms=1500), timeout=20))
            for _ in range(2)
        ]
        await wait_for(lambda: sum(b.seen.calls for b in backends) == 2)
        with pytest.raises(aio.AioRpcError) as refused:
            await t.stub.Unary(request(message="extra"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert (
            refused.value.details() == "lbgw: cluster 'echo' circuit breaker open: max_requests 2"
        )
        # UNAVAILABLE is a retry_on code, and another endpoint was there: not retried.
        assert sum(b.seen.calls for b in backends) == 2
        breaker = t.gateway.clusters["echo"].breaker
        assert breaker.overflows["max_requests"] == 1
        await asyncio.gather(*held)
        await good_call(t.stub)
        assert breaker.requests == 0
        assert await settle(t.gateway) == [0, 0]


async def test_a_stream_that_sends_only_headers_is_ended_by_request_header_timeout() -> None:
    backend = EchoBackend("a")
    limits = {"request_header_timeout": 0.5}
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS, limits=limits)) as t,
        raw_connect(t.gateway.addresses[0]) as conn,
    ):
        streams = [conn.open(BIDI, end=False) for _ in range(20)]  # HEADERS, then nothing
        await conn.drain()
        for sid in streams:
            ended = await conn.wait_ended(sid, timeout=15)
            assert ended.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], ended
            assert "request_header_timeout" in ended.grpc_message
        # Each had opened a backend call, which the timeout ended too.
        assert backend.seen.calls == 20
        await wait_for(lambda: backend.seen.completed + backend.seen.cancelled == 20)
        await good_call(t.stub)
        assert await settle(t.gateway) == [0]


async def test_a_talking_bidi_stream_outlives_request_header_timeout() -> None:
    backend = EchoBackend("a")
    limits = {"request_header_timeout": 0.3}
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS, limits=limits)) as t,
    ):
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def slowly() -> Any:
            while (item := await queue.get()) is not None:
                yield item

        call = t.stub.Bidi(slowly(), timeout=20)
        for n in range(3):  # a message every 0.5 s: slower than the timeout, but talking
            await queue.put(request(message=str(n)))
            reply = await call.read()
            assert reply.message == str(n)
            await asyncio.sleep(0.5)
        await queue.put(None)
        assert await call.code() is grpc.StatusCode.OK


async def test_an_idle_connection_gets_goaway_after_max_connection_idle() -> None:
    backend = EchoBackend("a")
    limits = {"max_connection_idle": 0.5}
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS, limits=limits)) as t,
    ):
        async with raw_connect(t.gateway.addresses[0]) as idle:
            await wait_for(lambda: idle.goaway is not None or idle.closed.is_set(), 15)
        # The gRPC client's own connection went idle too: its next call reconnects.
        await asyncio.sleep(1.0)
        await good_call(t.stub)


async def test_the_quick_form_sets_the_circuit_breaker() -> None:
    args = _parser().parse_args(["serve", "--backend", "127.0.0.1:1", "--max-requests", "7"])
    cfg = _serve_config(args)
    assert cfg.clusters[0].circuit_breakers.max_requests == 7
    assert cfg.clusters[0].circuit_breakers.max_pending_requests == 1024  # Envoy's default
