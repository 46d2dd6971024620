"""Endpoint health through a real gateway: active checks, ejection, slow start, drain, panic.

Backends, gateway and client are real grpc.aio peers on 127.0.0.1; the
backends' health is flipped through their own ``grpc.health.v1`` service
(``lbgw.health.HealthService``), as an operator's would be. Intervals are
0.1-0.2 s so each test takes a second or two; every wait is bounded, and
the backend processes started here are stopped by their PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbgw.endpoints import ClusterHealth, State
from lbgw.health import HealthService
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import config, echo_backends, lbgw_process, request, through

_Context: TypeAlias = aio.ServicerContext[Any, Any]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def _state(health: ClusterHealth, i: int) -> State:
    """Endpoint ``i``'s state (a call, so that mypy does not narrow it across events)."""
    return health.endpoints[i].state


class TimedBackend(EchoBackend):
    """An echo backend that notes when each unary call arrived (``time.monotonic``)."""

    def __init__(self, name: str, *, delay: float = 0.0) -> None:
        super().__init__(name, delay=delay)
        self.arrivals: list[float] = []

    async def Unary(  # noqa: N802 - the gRPC method's name
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> echo_pb2.EchoResponse:
        self.arrivals.append(time.monotonic())
        return await super().Unary(request, context)


class CountingHealth(HealthService):
    """A backend's health service that counts the calls it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: _Context
    ) -> health_pb2.HealthCheckResponse:
        self.calls += 1
        return await super().Check(request, context)


@contextlib.asynccontextmanager
async def health_backends(
    *backends: EchoBackend, health: type[HealthService] = HealthService
) -> AsyncIterator[tuple[list[str], list[HealthService]]]:
    """Serve each backend with a health service of its own; yield addresses and services."""
    services = [health() for _ in backends]
    async with contextlib.AsyncExitStack() as stack:
        addrs = [
            await stack.enter_async_context(serve(echo_registrar(b, health=h)))
            for b, h in zip(backends, services, strict=True)
        ]
        yield addrs, services


def checks(rpc: str = "check", interval: float = 0.1, **more: Any) -> dict[str, Any]:
    """The ``cluster=`` part of a config with fast active checks."""
    return {"health_check": {"rpc": rpc, "interval": interval, **more}}


async def until(what: str, predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Wait until ``predicate()`` holds (fail after ``timeout``); when it did (monotonic)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic()


def all_in(health: ClusterHealth, state: State = State.SERVING) -> Callable[[], bool]:
    return lambda: all(s is state for s in health.states())


@dataclasses.dataclass
class Outcome:
    started: float
    ended: float
    backend: str | None  # who answered; None when the call failed
    code: grpc.StatusCode
    details: str = ""


async def steady_load(stub: Any, seconds: float, callers: int = 4) -> list[Outcome]:
    """``callers`` loops of unary calls for ``seconds``; every call's outcome."""
    end = time.monotonic() + seconds

    async def caller() -> list[Outcome]:
        out: list[Outcome] = []
        while (started := time.monotonic()) < end:
            try:
                reply = await stub.Unary(request(), timeout=5)
            except aio.AioRpcError as error:
                ended = time.monotonic()
                out.append(Outcome(started, ended, None, error.code(), error.details() or ""))
            else:
                out.append(Outcome(started, time.monotonic(), reply.backend, grpc.StatusCode.OK))
        return out

    results = await asyncio.gather(*(caller() for _ in range(callers)))
    return sorted((o for r in results for o in r), key=lambda o: o.started)


def health_stub(channel: aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)


def ask(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# --- active checks take a NOT_SERVING backend out and bring it back --------------

RPCS = pytest.mark.parametrize("rpc", ["check", "watch"])
INTERVAL = 0.2


@RPCS
async def test_a_backend_that_turns_not_serving_gets_no_call_after_two_intervals(
    rpc: str,
) -> None:
    a, b = TimedBackend("a"), TimedBackend("b")
    async with (
        health_backends(a, b) as (addrs, (health_a, _)),
        through(config(addrs, cluster=checks(rpc, INTERVAL))) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        load = asyncio.ensure_future(steady_load(t.stub, 1.0))
        await asyncio.sleep(0.3)
        flipped = time.monotonic()
        health_a.set("", False)
        outcomes = await load
        assert health.states() == [State.NOT_SERVING, State.SERVING]
    assert all(o.code is grpc.StatusCode.OK for o in outcomes), outcomes
    last_a = max(a.arrivals)
    assert last_a < flipped + 2 * INTERVAL, f"last call {last_a - flipped:.3f} s after the flip"
    assert any(t > flipped + 2 * INTERVAL for t in b.arrivals)  # the load kept flowing


@pytest.mark.parametrize(
    ("rpc", "thresholds"),
    [
        pytest.param("check", {}, id="check"),
        pytest.param("watch", {}, id="watch"),
        pytest.param("watch", {"healthy_threshold": 1}, id="watch-healthy_threshold-1"),
    ],
)
async def test_a_backend_back_to_serving_gets_calls_again(
    rpc: str, thresholds: dict[str, int]
) -> None:
    a, b = TimedBackend("a"), TimedBackend("b")
    async with (
        health_backends(a, b) as (addrs, (health_a, _)),
        through(config(addrs, cluster=checks(rpc, INTERVAL, **thresholds))) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        health_a.set("", False)
        await until("a NOT_SERVING", lambda: _state(health, 0) is State.NOT_SERVING)
        await asyncio.sleep(0.1)
        before = len(a.arrivals)
        back = time.monotonic()
        health_a.set("", True)
        # healthy_threshold (2) checks at INTERVAL each, with room for a busy machine.
        load = asyncio.ensure_future(steady_load(t.stub, 6 * INTERVAL))
        try:
            await until("a gets calls again", lambda: len(a.arrivals) > before, 6 * INTERVAL)
        finally:
            outcomes = await load
        assert _state(health, 0) is State.SERVING
    assert all(o.code is grpc.StatusCode.OK for o in outcomes)
    assert a.arrivals[before] - back < 6 * INTERVAL


async def test_slow_start_ramps_a_readmitted_backends_share_over_the_window() -> None:
    a, b = TimedBackend("a"), TimedBackend("b")
    window = 1.0
    cluster = checks("check", 0.05, healthy_threshold=1) | {"slow_start": {"window": window}}
    async with (
        health_backends(a, b) as (addrs, (health_a, _)),
        through(config(addrs, cluster=cluster)) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        health_a.set("", False)
        await until("a NOT_SERVING", lambda: _state(health, 0) is State.NOT_SERVING)
        readmitted: list[float] = []

        def note(h: ClusterHealth) -> None:
            if _state(h, 0) is State.SERVING and not readmitted:
                readmitted.append(time.monotonic())

        health.on_change(note)
        load = asyncio.ensure_future(steady_load(t.stub, 2.0))
        await asyncio.sleep(0.2)
        health_a.set("", True)
        outcomes = await load
    assert readmitted, "a was not readmitted"
    back = readmitted[0]
    # Half-windows since readmission, then half a window past it: wide enough
    # that a stalled moment on a busy machine still leaves calls to count.
    edges = [0.0, 0.5, 1.0, 1.5]

    def share(lo: float, hi: float) -> float:
        mine = [o for o in outcomes if lo <= o.started - back < hi]
        assert len(mine) >= 10, f"too few calls in [{lo}, {hi}) to judge: {len(mine)}"
        return sum(o.backend == "a" for o in mine) / len(mine)

    shares = [share(lo, hi) for lo, hi in itertools.pairwise(edges)]
    # Envoy's ramp with aggression 1: a's weight is max(10%, t / window) of b's,
    # so its share goes from ~10% to 50%: ~20% in the first half, ~40% in the
    # second, 50% after. Rises, give or take noise.
    assert shares[0] < 0.33, shares
    assert shares[0] < shares[1], shares
    assert shares[1] < shares[2] + 0.1, shares
    assert shares[2] > 0.4, shares


# --- a backend killed under load ------------------------------------------------


@dataclasses.dataclass
class BackendProcess:
    name: str
    process: subprocess.Popen[str]
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


async def spawn_backend(name: str, port: int = 0, timeout: float = 20.0) -> BackendProcess:
    """``python -m lbgw.testing NAME --port PORT``, once it prints its address."""
    argv = [sys.executable, "-m", "lbgw.testing", name, "--port", str(port)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout)
    except BaseException:
        stop_backend(process)
        raise
    if not line.strip():
        stop_backend(process)
        raise AssertionError(f"backend {name} exited with {process.poll()} before listening")
    return BackendProcess(name, process, line.strip())


def stop_backend(process: subprocess.Popen[str]) -> None:
    """SIGTERM by PID, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    if process.stdout is not None:
        process.stdout.close()


async def test_a_backend_killed_under_load_costs_only_calls_in_flight_and_comes_back() -> None:
    procs: list[BackendProcess] = []
    try:
        procs.extend(await asyncio.gather(*(spawn_backend(f"p{i}") for i in range(3))))
        callers = 8
        cluster = checks("check", INTERVAL) | {
            # gRPC's reconnect backoff starts at 1 s and grows; short, to keep the test short.
            "channel_options": {
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": 300,
            },
            # One retry in flight per caller fits the budget. With the default
            # (3 here) a fourth retry at the moment of death is refused now and
            # then, and that call is lost: the budget doing its job.
            "retries": {"min_retry_concurrency": callers},
        }
        async with through(config([p.address for p in procs], cluster=cluster)) as t:
            health = t.gateway.clusters["echo"].health
            await until("all SERVING", all_in(health))
            victim = procs[1]
            load = asyncio.ensure_future(steady_load(t.stub, 3.0, callers=callers))
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            os.kill(victim.process.pid, signal.SIGKILL)
            outcomes = await load
            victim.process.wait(5)
            assert _state(health, 1) in (State.EJECTED, State.NOT_SERVING), health.states()

            lost = [o for o in outcomes if o.code is not grpc.StatusCode.OK]
            print(f"\n{len(outcomes)} calls, {len(lost)} lost to the kill: {lost}")
            after = [o for o in outcomes if o.started > killed]
            assert len(after) > 100
            stats = t.gateway.clusters["echo"].retry_stats
            failed_after = [o for o in after if o.code is not grpc.StatusCode.OK]
            assert failed_after == [], (killed, stats, health.states())
            assert stats["over_budget"] == 0
            assert not any(o.backend == victim.name for o in after)
            # Only calls the gateway had already sent can be lost.
            assert all(o.started <= killed <= o.ended for o in lost), lost
            assert t.gateway.clusters["echo"].retry_stats["sent"] >= 1

            revived = await spawn_backend(victim.name, victim.port)
            procs.append(revived)
            answered: list[str] = []

            async def one_call() -> bool:
                reply = await t.stub.Unary(request(), timeout=5)
                backend: str = reply.backend
                answered.append(backend)
                return backend == victim.name

            deadline = time.monotonic() + 10
            while not await one_call():
                assert time.monotonic() < deadline, f"not readmitted: {health.states()}"
                await asyncio.sleep(0.01)
            assert _state(health, 1) is State.SERVING
    finally:
        for p in procs:
            stop_backend(p.process)


# --- passive ejection: the cap ----------------------------------------------------


@pytest.mark.parametrize(("percent", "cap"), [(50.0, 2), (None, 1)], ids=["50%", "default-10%"])
async def test_ejection_never_takes_more_than_max_ejection_percent_out(
    percent: float | None, cap: int
) -> None:
    backends = [EchoBackend(f"b{i}") for i in range(4)]
    outlier: dict[str, Any] = {"consecutive_failures": 2}
    if percent is not None:
        outlier["max_ejection_percent"] = percent
    cluster = {"health_check": {"mode": "none"}, "outlier_detection": outlier}
    async with echo_backends(*backends) as addrs, through(config(addrs, cluster=cluster)) as t:
        health = t.gateway.clusters["echo"].health
        most: list[int] = [0]

        def count(h: ClusterHealth) -> None:
            most[0] = max(most[0], sum(s is State.EJECTED for s in h.states()))

        health.on_change(count)
        for _ in range(30):
            with pytest.raises(aio.AioRpcError) as info:
                await t.stub.Unary(request(status_code=UNAVAILABLE), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        states = health.states()
    assert most[0] == cap
    assert states.count(State.EJECTED) == cap, states
    assert sum(b.seen.calls for b in backends) == 60  # every call tried twice, still


# --- the retry budget ---------------------------------------------------------------


async def test_the_retry_budget_stops_a_retry_storm() -> None:
    backends = [EchoBackend("a"), EchoBackend("b")]
    n = 40
    cluster = {"health_check": {"mode": "none"}, "outlier_detection": {"consecutive_failures": 0}}
    async with echo_backends(*backends) as addrs, through(config(addrs, cluster=cluster)) as t:
        failing = request(status_code=UNAVAILABLE, delay_ms=300)

        async def call() -> grpc.StatusCode:
            try:
                await t.stub.Unary(failing, timeout=10)
            except aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        async with asyncio.timeout(10):
            codes = await asyncio.gather(*(call() for _ in range(n)))
        stats = dict(t.gateway.clusters["echo"].retry_stats)
        retries = t.gateway.config.cluster("echo").retries
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
    sent = sum(b.seen.calls for b in backends) - n
    assert sent == stats["sent"]
    allowed = max(retries.min_retry_concurrency, retries.budget_percent / 100 * n)
    assert 1 <= sent <= allowed, (sent, allowed, stats)
    assert stats["over_budget"] > 0, stats
    print(f"\n{n} failing calls: {sent} retries sent, {stats['over_budget']} over budget")


# --- lbgw's own health service ---------------------------------------------------------


async def test_lbgw_answers_health_calls_itself_and_never_forwards_them() -> None:
    backend = EchoBackend("a")
    async with (
        health_backends(backend, health=CountingHealth) as (addrs, (backend_health,)),
        through(config(addrs, cluster={"health_check": {"mode": "none"}})) as t,
    ):
        stub = health_stub(t.channel)
        assert (await stub.Check(ask(""), timeout=5)).status == SERVING
        assert (await stub.Check(ask("echo"), timeout=5)).status == SERVING
        with pytest.raises(aio.AioRpcError) as info:
            await stub.Check(ask("nope"), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(ask("nope"), timeout=5)
        assert (await watch.read()).status == SERVICE_UNKNOWN
        watch.cancel()
    assert isinstance(backend_health, CountingHealth)
    assert backend_health.calls == 0
    assert backend.seen.calls == 0


async def test_lbgw_health_turns_not_serving_when_a_drain_starts_for_watchers() -> None:
    backend = EchoBackend("a", delay=0.5)
    async with (
        health_backends(backend) as (addrs, _),
        through(config(addrs, cluster=checks())) as t,
    ):
        stub = health_stub(t.channel)
        watch_all, watch_echo = stub.Watch(ask(""), timeout=10), stub.Watch(ask("echo"), timeout=10)
        assert (await watch_all.read()).status == SERVING
        assert (await watch_echo.read()).status == SERVING
        in_flight = asyncio.ensure_future(t.stub.Unary(request(message="m"), timeout=10))
        await until("the call reaches the backend", lambda: backend.seen.calls == 1)
        grace = 5.0
        began = time.monotonic()
        stopping = asyncio.ensure_future(t.gateway.stop(grace))
        async with asyncio.timeout(2):
            assert (await watch_all.read()).status == NOT_SERVING
            assert (await watch_echo.read()).status == NOT_SERVING
        assert not in_flight.done()  # the drain came while the call was still in flight
        # Then lbgw ends the Watch streams, so that they do not hold the drain open.
        async with asyncio.timeout(2):
            assert await watch_all.read() is aio.EOF
            assert await watch_echo.read() is aio.EOF
        assert await watch_all.code() is grpc.StatusCode.OK
        assert (await in_flight).message == "m"
        async with asyncio.timeout(grace + 5):
            await stopping
        assert time.monotonic() - began < grace  # it ended with the last call, not the grace


async def test_lbgw_health_check_says_not_serving_during_the_drain_delay() -> None:
    """With server.drain_delay, a polling Check sees NOT_SERVING before the listeners close."""
    backend = EchoBackend("a", delay=1.0)
    async with (
        health_backends(backend) as (addrs, _),
        through(config(addrs, cluster=checks(), server={"drain_delay": 0.5})) as t,
    ):
        stub = health_stub(t.channel)
        assert (await stub.Check(ask(""), timeout=5)).status == SERVING
        in_flight = asyncio.ensure_future(t.stub.Unary(request(), timeout=10))
        await until("the call reaches the backend", lambda: backend.seen.calls == 1)
        stopping = asyncio.ensure_future(t.gateway.stop(5))
        await asyncio.sleep(0.1)
        try:
            assert not in_flight.done()
            assert (await stub.Check(ask(""), timeout=2)).status == NOT_SERVING
            # New calls are still served during the delay: nothing is refused yet.
            assert (await t.stub.Unary(request(), timeout=5)).backend == "a"
        finally:
            await in_flight
            await stopping


async def test_the_cluster_service_follows_whether_any_endpoint_is_in_rotation() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with (
        health_backends(a, b) as (addrs, services),
        through(config(addrs, cluster=checks())) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        stub = health_stub(t.channel)
        watch = stub.Watch(ask("echo"), timeout=10)
        assert (await watch.read()).status == SERVING
        services[0].set("", False)
        await until("a NOT_SERVING", lambda: _state(health, 0) is State.NOT_SERVING)
        assert (await stub.Check(ask("echo"), timeout=5)).status == SERVING  # b is left
        services[1].set("", False)
        async with asyncio.timeout(2):
            assert (await watch.read()).status == NOT_SERVING
        assert (await stub.Check(ask("echo"), timeout=5)).status == NOT_SERVING
        assert (await stub.Check(ask(""), timeout=5)).status == SERVING  # lbgw itself is fine
        services[1].set("", True)
        async with asyncio.timeout(2):
            assert (await watch.read()).status == SERVING
        assert (await stub.Check(ask("echo"), timeout=5)).status == SERVING
        watch.cancel()


# --- no healthy endpoint: fail fast, or panic ---------------------------------------------


async def test_with_every_endpoint_down_calls_fail_fast_naming_the_cluster() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with (
        health_backends(a, b) as (addrs, services),
        through(config(addrs, cluster=checks())) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        for service in services:
            service.set("", False)
        await until("both NOT_SERVING", all_in(health, State.NOT_SERVING))
        for _ in range(5):
            with pytest.raises(aio.AioRpcError) as info:
                await t.stub.Unary(request(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "lbgw: no endpoint of cluster 'echo' is healthy"
        assert not health.panic
    assert (a.seen.calls, b.seen.calls) == (0, 0)


async def test_below_the_panic_threshold_calls_go_to_every_endpoint_anyway() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with (
        health_backends(a, b) as (addrs, services),
        through(config(addrs, cluster=checks() | {"panic_threshold": 50})) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until("both SERVING", all_in(health))
        services[0].set("", False)
        await until("a NOT_SERVING", lambda: _state(health, 0) is State.NOT_SERVING)
        assert not health.panic  # 50% healthy is not below 50%
        assert {(await t.stub.Unary(request(), timeout=5)).backend for _ in range(6)} == {"b"}
        services[1].set("", False)
        await until("both NOT_SERVING", all_in(health, State.NOT_SERVING))
        assert health.panic
        got = [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(10)]
        assert health.states() == [State.NOT_SERVING, State.NOT_SERVING]
    assert sorted(set(got)) == ["a", "b"]
    assert a.seen.calls == 5 and b.seen.calls == 11


# --- tcp checks and backends without a health service -------------------------------------


async def test_a_tcp_check_takes_a_closed_port_out_and_lets_a_listening_one_in() -> None:
    live, late = EchoBackend("live"), EchoBackend("late")
    down = closed_port()
    cluster = {
        "health_check": {"mode": "tcp", "interval": 0.1},
        # The tcp check connects on its own; the endpoint's channel reconnects
        # on gRPC's backoff (1 s, growing), made short here.
        "channel_options": {
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 300,
        },
    }
    async with echo_backends(live) as (up,), through(config([up, down], cluster=cluster)) as t:
        health = t.gateway.clusters["echo"].health
        await until("tcp states", lambda: health.states() == [State.SERVING, State.NOT_SERVING])
        assert {(await t.stub.Unary(request(), timeout=5)).backend for _ in range(4)} == {"live"}
        server = aio.server()
        echo_registrar(late)(server)  # no health service: tcp does not need one
        assert server.add_insecure_port(down) == int(down.rsplit(":", 1)[1])
        await server.start()
        try:
            await until("the port is listening", all_in(health))
            got: set[str] = set()
            deadline = time.monotonic() + 5
            while "late" not in got:
                assert time.monotonic() < deadline, f"no call reached the late backend: {got}"
                got.add((await t.stub.Unary(request(), timeout=5)).backend)
                await asyncio.sleep(0.01)
        finally:
            await server.stop(0)
    assert got == {"live", "late"}


@RPCS
@pytest.mark.parametrize(
    ("unimplemented", "state"),
    [(None, State.SERVING), ("unhealthy", State.NOT_SERVING)],
    ids=["default-healthy", "unhealthy"],
)
async def test_a_backend_without_health_service_counts_as_configured(
    rpc: str, unimplemented: str | None, state: State
) -> None:
    with_health, without = EchoBackend("with"), EchoBackend("without")
    more = {} if unimplemented is None else {"unimplemented": unimplemented}
    async with (
        health_backends(with_health) as ((checked,), _),
        echo_backends(without) as (unchecked,),
        through(config([checked, unchecked], cluster=checks(rpc, 0.1, **more))) as t,
    ):
        health = t.gateway.clusters["echo"].health
        await until(
            f"states [SERVING, {state.name}]",
            lambda: health.states() == [State.SERVING, state],
        )
        await asyncio.sleep(0.3)  # a few more checks do not change it
        assert health.states() == [State.SERVING, state]
        got = {(await t.stub.Unary(request(), timeout=5)).backend for _ in range(6)}
    assert got == ({"with", "without"} if state is State.SERVING else {"with"})


# --- the command line ---------------------------------------------------------------------


async def test_serve_quick_form_with_tcp_health_checks_forwards() -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as (addr,):
        down = closed_port()
        args = ["--listen", "127.0.0.1:0", "--backend", addr, "--backend", down]
        checks = ["--health-check", "tcp", "--health-interval", "0.2", "--log-level", "debug"]
        async with lbgw_process(*args, *checks) as lbgw:
            async with aio.insecure_channel(lbgw.address) as channel:
                stub = health_stub(channel)
                assert (await stub.Check(ask("default"), timeout=5)).status == SERVING
                echo_stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]

                def out() -> bool:  # the TCP check took the closed port out of rotation
                    return any(
                        line.get("event") == "endpoint state"
                        and line.get("endpoint") == down
                        and line.get("state") == "not_serving"
                        and "TCP connect failed" in line.get("reason", "")
                        for line in list(lbgw.lines)
                    )

                await until("the closed port leaves rotation", out)
                got = {(await echo_stub.Unary(request(), timeout=5)).backend for _ in range(4)}
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 15) == 0
    assert got == {"a"}
    # No call reached "a" by a retry off the closed port: the check kept them off it.
    assert [line for line in lbgw.lines if line.get("event") == "retry"] == []
    states = [(e.get("endpoint"), e.get("state")) for e in lbgw.lines]
    assert (down, "not_serving") in states
    assert (addr, "serving") in states


async def test_endpoint_state_changes_are_logged_as_endpoint_state_events() -> None:
    backend = EchoBackend("a")
    async with echo_backends(backend) as (addr,):
        args = ["--listen", "127.0.0.1:0", "--backend", addr, "--health-check", "tcp"]
        async with lbgw_process(*args, "--health-interval", "0.2") as lbgw:
            await until("a state change is logged", lambda: len(lbgw.lines) > 2)
            await asyncio.sleep(0.3)
    changes = [e for e in lbgw.lines if e.get("state") == "serving"]
    assert changes, lbgw.lines
    # The line keeps its own name: no field may overwrite "event".
    assert changes[0]["event"] == "endpoint state", changes[0]
    assert changes[0]["endpoint"] == addr


async def test_a_tcp_check_reaches_an_ipv6_endpoint() -> None:
    connections: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    try:
        listener = await asyncio.start_server(accept, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listener.sockets[0].getsockname()[1]
    try:
        cfg = config([f"[::1]:{port}"], cluster={"health_check": {"mode": "tcp", "interval": 0.1}})
        async with through(cfg) as t:
            health = t.gateway.clusters["echo"].health
            await until("the IPv6 endpoint is SERVING", all_in(health))
            await until("checked again", lambda: len(connections) >= 3)
            assert health.states() == [State.SERVING]
    finally:
        listener.close()
        await listener.wait_closed()


async def test_a_stop_cancelled_during_the_drain_delay_still_stops_everything() -> None:
    backend = EchoBackend("a")
    async with (
        health_backends(backend) as (addrs, _),
        through(config(addrs, cluster=checks(), server={"drain_delay": 30})) as t,
    ):
        gateway = t.gateway
        stopping = asyncio.ensure_future(gateway.stop(60))
        await asyncio.sleep(0.2)  # inside the 30 s drain delay
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        assert gateway.addresses  # it had listened ...
        with pytest.raises(aio.AioRpcError) as info:  # ... and listens no more
            await t.stub.Unary(request(), timeout=2)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert all(s is State.DRAINING for s in gateway.clusters["echo"].health.states())
