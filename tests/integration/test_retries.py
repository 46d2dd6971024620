"""Safe retries through a real gateway: what is retried, where, and what never is.

A failed attempt is retried on a different endpoint only while nothing of
the response has reached the client and, for request streams, while the
retry buffer holds all the client sent (tests/integration/test_replay.py).
Backends are real grpc.aio servers on 127.0.0.1; active checks are off
(``mode = "none"``) so that the endpoints stay in rotation and every
attempt is the one under test. With two endpoints and ``swrr``, a gateway's
first call goes to the first endpoint, which is the failing one in each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
import pytest
from grpc import aio

from lbgw.endpoints import State
from lbgw.pb import echo_pb2
from lbgw.testing import EchoBackend
from tests.integration.support import config, echo_backends, request, settle, through

_Context: TypeAlias = aio.ServicerContext[Any, Any]

NO_CHECKS: dict[str, Any] = {"health_check": {"mode": "none"}}
#: Checks off and passive ejection off: only the retry logic acts.
ONLY_RETRIES: dict[str, Any] = NO_CHECKS | {"outlier_detection": {"consecutive_failures": 0}}


class Failing(EchoBackend):
    """Ends every call with ``code``: streams after ``after`` messages each way."""

    def __init__(
        self, name: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, after: int = 0
    ) -> None:
        super().__init__(name)
        self.code = code
        self.after = after

    async def _fail(self, context: _Context) -> None:
        await context.abort(self.code, f"{self.name} fails")

    async def Unary(  # noqa: N802 - the gRPC method's name
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> echo_pb2.EchoResponse:
        self.seen.calls += 1
        await self._fail(context)
        raise AssertionError("abort returned")

    async def ServerStream(  # noqa: N802
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self.seen.calls += 1
        for i in range(self.after):
            yield echo_pb2.EchoResponse(backend=self.name, index=i)
            self.seen.sent += 1
        await self._fail(context)

    async def ClientStream(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> echo_pb2.EchoResponse:
        self.seen.calls += 1
        read = 0
        if self.after:
            async for _ in requests:
                read += 1
                if read >= self.after:
                    break
        await self._fail(context)
        raise AssertionError("abort returned")

    async def Bidi(  # noqa: N802
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: _Context
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self.seen.calls += 1
        i = 0
        if self.after:
            async for request in requests:
                yield echo_pb2.EchoResponse(message=request.message, backend=self.name, index=i)
                self.seen.sent += 1
                i += 1
                if i >= self.after:
                    break
        await self._fail(context)


async def _requests(n: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for i in range(n):
        yield request(message=str(i))


def _closed_port() -> str:
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _stats(t: Any) -> dict[str, int]:
    return dict(t.gateway.clusters["echo"].retry_stats)


# --- unary -------------------------------------------------------------------------


async def test_an_unavailable_call_is_retried_once_on_the_other_endpoint() -> None:
    bad, good = Failing("bad"), EchoBackend("good")
    async with (
        echo_backends(bad, good) as addrs,
        through(config(addrs, cluster=ONLY_RETRIES)) as t,
    ):
        reply = await t.stub.Unary(request(message="m"), timeout=5)
        assert (reply.backend, reply.message) == ("good", "m")
        assert (bad.seen.calls, good.seen.calls) == (1, 1)
        assert _stats(t) == {"sent": 1, "over_budget": 0}

        for _ in range(19):
            assert (await t.stub.Unary(request(), timeout=5)).backend == "good"
        assert good.seen.calls == 20  # every call ended on the good endpoint
        assert bad.seen.calls == _stats(t)["sent"]  # never two attempts on one endpoint
        assert bad.seen.calls >= 5
        assert await settle(t.gateway) == [0, 0]


async def test_resource_exhausted_is_not_retried_unless_the_route_says_so() -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    bad, good = Failing("bad", exhausted), EchoBackend("good")
    async with echo_backends(bad, good) as addrs:
        async with through(config(addrs, cluster=ONLY_RETRIES)) as t:
            with pytest.raises(aio.AioRpcError) as info:
                await t.stub.Unary(request(), timeout=5)
            assert info.value.code() is exhausted
            assert info.value.details() == "bad fails"
            assert (bad.seen.calls, good.seen.calls) == (1, 0)

        route = {"default": True, "cluster": "echo", "retry_on": [exhausted.name, "UNAVAILABLE"]}
        async with through(config(addrs, cluster=ONLY_RETRIES, routes=[route])) as t:
            assert (await t.stub.Unary(request(), timeout=5)).backend == "good"
            assert (bad.seen.calls, good.seen.calls) == (2, 1)
            assert _stats(t)["sent"] == 1


async def test_max_attempts_1_turns_retries_off() -> None:
    bad, good = Failing("bad"), EchoBackend("good")
    cluster = ONLY_RETRIES | {"retries": {"max_attempts": 1}}
    async with echo_backends(bad, good) as addrs, through(config(addrs, cluster=cluster)) as t:
        with pytest.raises(aio.AioRpcError) as info:
            await t.stub.Unary(request(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "bad fails"
        assert (bad.seen.calls, good.seen.calls) == (1, 0)
        assert _stats(t) == {"sent": 0, "over_budget": 0}


# --- server streams --------------------------------------------------------------------


async def test_a_server_stream_failing_before_its_first_message_is_retried() -> None:
    bad, good = Failing("bad"), EchoBackend("good")
    async with (
        echo_backends(bad, good) as addrs,
        through(config(addrs, cluster=ONLY_RETRIES)) as t,
    ):
        replies = [r async for r in t.stub.ServerStream(request(response_count=3), timeout=5)]
        assert [(r.backend, r.index) for r in replies] == [("good", 0), ("good", 1), ("good", 2)]
        assert (bad.seen.calls, good.seen.calls) == (1, 1)
        assert await settle(t.gateway) == [0, 0]


async def test_a_server_stream_failing_after_a_message_was_relayed_is_not_retried() -> None:
    bad, good = Failing("bad", after=1), EchoBackend("good")
    async with (
        echo_backends(bad, good) as addrs,
        through(config(addrs, cluster=ONLY_RETRIES)) as t,
    ):
        stream = t.stub.ServerStream(request(response_count=3), timeout=5)
        first = await stream.read()
        assert (first.backend, first.index) == ("bad", 0)
        with pytest.raises(aio.AioRpcError) as info:
            while await stream.read() is not aio.EOF:
                pass
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "bad fails"
        assert (bad.seen.calls, good.seen.calls) == (1, 0)
        assert _stats(t)["sent"] == 0
        assert await settle(t.gateway) == [0, 0]


# --- request streams ------------------------------------------------------------------------

STREAMING_REQUESTS = pytest.mark.parametrize("method", ["ClientStream", "Bidi"])


async def _call(stub: Any, method: str, n: int) -> list[tuple[str, int]]:
    """A client-stream or bidi call of ``n`` messages: (backend, index) of each reply."""
    if method == "ClientStream":
        reply = await stub.ClientStream(_requests(n), timeout=5)
        return [(reply.backend, reply.index)]
    return [(r.backend, r.index) async for r in stub.Bidi(_requests(n), timeout=5)]


@STREAMING_REQUESTS
async def test_a_request_stream_refused_before_lbgw_reads_it_is_retried(method: str) -> None:
    good = EchoBackend("good")
    async with echo_backends(good) as (addr,):
        down = _closed_port()
        async with through(config([down, addr], cluster=ONLY_RETRIES)) as t:
            got = await _call(t.stub, method, 3)
            if method == "ClientStream":
                assert got == [("good", 3)]  # all three messages reached the good endpoint
            else:
                assert got == [("good", 0), ("good", 1), ("good", 2)]
            assert good.seen.calls == 1
            assert _stats(t)["sent"] == 1
            assert await settle(t.gateway) == [0, 0]


async def test_a_bidi_stream_failing_after_a_response_was_relayed_is_not_retried() -> None:
    bad, good = Failing("bad", after=1), EchoBackend("good")
    async with (
        echo_backends(bad, good) as addrs,
        through(config(addrs, cluster=ONLY_RETRIES)) as t,
    ):
        with pytest.raises(aio.AioRpcError) as info:
            await _call(t.stub, "Bidi", 3)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "bad fails"
        assert (bad.seen.calls, good.seen.calls) == (1, 0)
        assert _stats(t)["sent"] == 0
        assert await settle(t.gateway) == [0, 0]


# --- retries and passive ejection together ----------------------------------------------


async def test_a_down_endpoint_costs_no_call_and_is_ejected_after_5_failures() -> None:
    good = EchoBackend("good")
    async with echo_backends(good) as (addr,):
        down = _closed_port()
        async with through(config([down, addr], cluster=NO_CHECKS)) as t:
            cluster = t.gateway.clusters["echo"]
            replies = [await t.stub.Unary(request(), timeout=5) for _ in range(20)]
            assert {r.backend for r in replies} == {"good"}
            assert cluster.health.states() == [State.EJECTED, State.SERVING]
            # Each attempt on the down endpoint failed and was retried: 5 of them,
            # then the ejection kept every later call away from it.
            assert cluster.retry_stats == {"sent": 5, "over_budget": 0}
            assert good.seen.calls == 20
            assert await settle(t.gateway) == [0, 0]


async def test_a_call_that_never_left_lbgw_is_retried_outside_the_budget() -> None:
    """A retry budget (and max_retries) of 0 stops every retry of a call a backend answered,
    but a call that found no connection to its endpoint never left lbgw: it is sent once,
    elsewhere, whatever the budget says (the soak's lost calls, issue 15)."""
    good = Failing("good", after=0)  # answers UNAVAILABLE itself: a call that was sent
    live = EchoBackend("live")
    none_left = {
        "retries": {"budget_percent": 0, "min_retry_concurrency": 0},
        "circuit_breakers": {"max_retries": 0},
    }
    async with echo_backends(live, good) as (addr, answering):
        down = _closed_port()
        async with through(config([down, addr], cluster=ONLY_RETRIES | none_left)) as t:
            replies = [await t.stub.Unary(request(), timeout=5) for _ in range(10)]
            assert {r.backend for r in replies} == {"live"}
            stats = _stats(t)
            assert stats["sent"] >= 4 and stats["over_budget"] == 0, stats
            assert t.gateway.clusters["echo"].breaker.overflows["max_retries"] == 0
            assert await settle(t.gateway) == [0, 0]
        # The same budget refuses the retry of a call the backend did answer.
        async with through(config([answering, addr], cluster=ONLY_RETRIES | none_left)) as t:
            codes = []
            for _ in range(10):
                try:
                    await t.stub.Unary(request(), timeout=5)
                    codes.append("OK")
                except aio.AioRpcError as error:
                    codes.append(error.code().name)
            assert "UNAVAILABLE" in codes and _stats(t)["sent"] == 0
            assert await settle(t.gateway) == [0, 0]
