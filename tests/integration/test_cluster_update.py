"""``Cluster.update``: the endpoint set changes while calls flow, and no call notices.

Real gRPC on loopback: four echo backends, a gateway in front of some of
them, and callers of every call kind running while the cluster's endpoints
are added, removed and reweighted.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc import aio

from lbgw.config import EndpointConfig, MethodKind
from lbgw.endpoints import State
from lbgw.pb import echo_pb2
from lbgw.testing import EchoBackend, echo_registrar, serve

from .support import UNARY, config, echo_backends, in_flight, request, settle, through

NO_CHECKS = {"health_check": {"mode": "none"}}
KINDS = ("Unary", "ServerStream", "ClientStream", "Bidi")


async def _requests(count: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for n in range(count):
        yield request(message=f"m{n}", delay_ms=2)


async def _call(stub: Any, kind: str) -> str:
    """One call of ``kind`` with a few ms of work at the backend; the backend that answered."""
    if kind == "Unary":
        reply = await stub.Unary(request(delay_ms=3), timeout=10)
        return str(reply.backend)
    if kind == "ServerStream":
        replies = [r async for r in stub.ServerStream(request(response_count=3, delay_ms=1))]
        assert len(replies) == 3
        return str(replies[0].backend)
    if kind == "ClientStream":
        reply = await stub.ClientStream(_requests(3), timeout=10)
        assert reply.index == 3
        return str(reply.backend)
    replies = [r async for r in stub.Bidi(_requests(3), timeout=10)]
    assert len(replies) == 3
    return str(replies[0].backend)


def _endpoints(addresses: Sequence[str], weights: Sequence[int]) -> list[EndpointConfig]:
    return [EndpointConfig(a, w) for a, w in zip(addresses, weights, strict=True)]


async def test_fifty_updates_under_load_lose_no_call_and_leak_nothing() -> None:
    backends = [EchoBackend(name) for name in "abcd"]
    rng = random.Random(11)
    async with echo_backends(*backends) as addrs:
        by_name = dict(zip("abcd", addrs, strict=True))
        async with through(config(addrs[:2], cluster=NO_CHECKS)) as t:
            cluster = t.gateway.clusters["echo"]
            stop = asyncio.Event()
            failures: list[str] = []
            made = Counter[str]()

            async def caller(kind: str) -> None:
                while not stop.is_set():
                    try:
                        made[await _call(t.stub, kind)] += 1
                    except aio.AioRpcError as error:
                        failures.append(f"{kind}: {error.code().name} {error.details()}")

            callers = [asyncio.ensure_future(caller(KINDS[n % 4])) for n in range(8)]
            removed_seen = 0
            for _ in range(50):
                chosen = sorted(rng.sample("abcd", rng.randint(1, 4)))
                weights = [rng.randint(1, 5) for _ in chosen]
                before = {e.address for e in cluster.endpoints}
                cluster.update(_endpoints([by_name[n] for n in chosen], weights))
                removed_seen += len(before - {by_name[n] for n in chosen})
                assert [e.address for e in cluster.endpoints] == [by_name[n] for n in chosen]
                assert [e.weight for e in cluster.endpoints] == weights
                await asyncio.sleep(rng.uniform(0.005, 0.03))
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 30)

            assert failures == []
            assert sum(made.values()) > 100 and removed_seen > 10
            # Cancels and ends settle asynchronously.
            assert await settle(t.gateway, 10) == [0] * len(cluster.endpoints)
            assert cluster.budget.active == 0

            # The last set's weights decide the split: swrr gives each its exact share.
            cluster.update(_endpoints([by_name["a"], by_name["c"]], [1, 3]))
            got = Counter([await _call(t.stub, "Unary") for _ in range(40)])
            assert got == {"a": 10, "c": 30}


async def test_an_endpoint_that_stays_keeps_its_state_and_a_removed_one_drains() -> None:
    slow = EchoBackend("slow")
    fast = EchoBackend("fast")
    async with (
        echo_backends(slow, fast) as (slow_addr, fast_addr),
        through(config([slow_addr, fast_addr], cluster=NO_CHECKS)) as t,
    ):
        cluster = t.gateway.clusters["echo"]
        kept = cluster.endpoints[1]
        cluster.health.check_failed(kept, "test", explicit=True)
        assert cluster.health.states() == [State.SERVING, State.NOT_SERVING]
        cluster.health.check_passed(kept, "test", explicit=True)
        for _ in range(2):  # a streak of failures short of ejection, which must survive
            cluster.health.failed(kept, grpc.StatusCode.UNAVAILABLE)
        # Two calls in flight on "slow", then it leaves the cluster.
        calls = [t.stub.Unary(request(delay_ms=300), timeout=10) for _ in range(4)]
        await asyncio.sleep(0.1)
        leaving = cluster.endpoints[0]
        assert leaving.address == slow_addr
        on_slow = cluster.balancer.kernel.in_flight(0)
        assert on_slow == 2
        cluster.update(_endpoints([fast_addr], [1]))
        assert cluster.endpoints == (kept,) and kept.index == 0
        # "fast" kept its calls in flight, its state and its streak of failures.
        assert cluster.balancer.kernel.in_flight(0) == 2
        assert kept.state is State.SERVING and kept.failures == 2
        assert leaving.index == -1 and leaving.state is State.DRAINING
        assert leaving.backend is not None
        channel = leaving.backend.channel
        assert channel.get_state() is not grpc.ChannelConnectivity.SHUTDOWN
        # The calls in flight finish where they started, and then its channel closes.
        replies = await asyncio.gather(*calls)
        assert Counter(r.backend for r in replies) == {"slow": 2, "fast": 2}
        async with asyncio.timeout(5):
            while channel.get_state() is not grpc.ChannelConnectivity.SHUTDOWN:
                await asyncio.sleep(0.01)
        assert in_flight(t.gateway) == [0]
        # New calls go to the one left; a new endpoint joins with a channel of its own.
        assert {r.backend for r in [await t.stub.Unary(request()) for _ in range(3)]} == {"fast"}
        cluster.update(_endpoints([fast_addr, slow_addr], [1, 1]))
        back = next(e for e in cluster.endpoints if e.address == slow_addr)
        assert back is not leaving and back.state is State.SERVING
        assert {(await t.stub.Unary(request())).backend for _ in range(4)} == {"fast", "slow"}


async def test_an_update_the_kernels_cannot_take_changes_nothing() -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as addrs, through(config(addrs, cluster=NO_CHECKS)) as t:
        cluster = t.gateway.clusters["echo"]
        with pytest.raises(ValueError, match=r"an update needs 1 to .* endpoints, got 0"):
            cluster.update([])
        with pytest.raises(ValueError, match="needs endpoints with distinct addresses"):
            cluster.update(_endpoints([addrs[0], addrs[0]], [1, 2]))
        with pytest.raises(ValueError, match="weights from 1 to"):
            cluster.update(_endpoints(addrs, [0]))
        assert [e.address for e in t.gateway.clusters["echo"].endpoints] == addrs


async def test_a_new_endpoint_is_asked_for_its_method_kinds() -> None:
    plain, reflecting = EchoBackend("plain"), EchoBackend("reflecting")
    async with (
        serve(echo_registrar(plain)) as plain_addr,
        serve(echo_registrar(reflecting, reflection=True)) as reflecting_addr,
    ):
        cfg = config([plain_addr], methods={}, cluster={"reflection": True, **NO_CHECKS})
        async with through(cfg) as t:
            cluster = t.gateway.clusters["echo"]
            assert cluster.kinds == {}  # the first endpoint serves no reflection
            cluster.update(_endpoints([plain_addr, reflecting_addr], [1, 1]))
            async with asyncio.timeout(10):
                while UNARY not in cluster.kinds:
                    await asyncio.sleep(0.01)
            assert cluster.kinds[UNARY] is MethodKind.UNARY
            assert cluster.kinds["/lbgw.echo.v1.Echo/Bidi"] is MethodKind.BIDI_STREAMING


async def test_replacing_every_endpoint_never_shows_the_cluster_empty() -> None:
    backends = [EchoBackend(name) for name in "abcd"]
    async with echo_backends(*backends) as addrs:
        cfg = config(addrs[:2], cluster={"panic_threshold": 50, **NO_CHECKS})
        async with through(cfg) as t:
            cluster = t.gateway.clusters["echo"]
            seen: list[bool] = []
            cluster.health.on_change(lambda h: seen.append(h.serving))
            cluster.update(_endpoints(addrs[2:], [1, 1]))
            assert seen and all(seen)  # lbgw's own health for "echo" stayed SERVING
            assert not cluster.health.panic
            got = {(await t.stub.Unary(request())).backend for _ in range(4)}
            assert got == {"c", "d"}


async def test_a_reweight_during_slow_start_is_taken_whole_or_not_at_all() -> None:
    backends = [EchoBackend(name) for name in "ab"]
    async with echo_backends(*backends) as addrs:
        cfg = config(addrs, cluster={"slow_start": {"window": 10}, **NO_CHECKS})
        async with through(cfg) as t:
            cluster = t.gateway.clusters["echo"]
            a, b = cluster.endpoints
            cluster.health.check_failed(a, "test", explicit=True)
            cluster.health.check_passed(a, "test", explicit=True)  # back: ramping
            assert a.ramp_from is not None and a.share < 1
            # 50,000 x the old scale (1,000 for weights of 1) would overflow the old kernel.
            cluster.update(_endpoints([addrs[0]], [50_000]))
            assert cluster.endpoints == (a,) and a.weight == 50_000 and a.share < 1
            assert b.state is State.DRAINING and b.index == -1
            with pytest.raises(ValueError, match="weights from 1 to"):
                cluster.update(_endpoints(addrs, [50_000, 2**25]))
            assert cluster.endpoints == (a,) and a.weight == 50_000  # unchanged
            assert (await t.stub.Unary(request())).backend == "a"
        with pytest.raises(RuntimeError, match="is closed"):
            cluster.update(_endpoints(addrs, [1, 1]))
