"""Hostile: a worker killed under load, a crash loop, and SIGHUP storms.

A well-behaved client beside the fault: 8 callers, each on its own
connection (the kernel spreads them over the workers). What a killed worker
costs is what was in flight on its own connections: those calls fail with
UNAVAILABLE, and nothing else does; the supervisor restarts the worker and
the gateway never stops serving. Only a crash loop stops it. SIGHUP, sent
to the supervisor or a worker, early or in a storm, never kills lbgw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.supervisor import CRASH_LOOP_DEATHS
from lbgw.testing import EchoBackend
from tests.integration.support import UNARY, LbgwProcess, echo_backends, lbgw_process, request


@dataclass
class Callers:
    address: str
    n: int = 8
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _run(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        async with aio.insecure_channel(self.address, options) as channel:
            stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                try:
                    await stub.Unary(request(), timeout=10)
                    self.ok += 1
                except aio.AioRpcError as exc:
                    self.failures.append((time.monotonic(), exc.code().name))
                await asyncio.sleep(0.002)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def events(lbgw: LbgwProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in list(lbgw.lines) if e.get("event") == name]


async def until(check: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


def serving_pids(lbgw: LbgwProcess) -> set[int]:
    return {e["pid"] for e in events(lbgw, "serving")}


ARGS = ["--listen", "127.0.0.1:0", "--method", f"{UNARY}=unary", "--workers", "2"]


async def test_a_killed_worker_is_restarted_while_the_other_keeps_serving() -> None:
    async with echo_backends(EchoBackend("a")) as (addr,):  # noqa: SIM117 - the inner context needs the outer
        async with lbgw_process(*ARGS, "--backend", addr) as lbgw:
            await until(lambda: len(serving_pids(lbgw)) == 2)
            first = sorted(serving_pids(lbgw))
            callers = Callers(lbgw.address)
            callers.start()
            await until(lambda: callers.ok > 200)
            victim = first[0]
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            await until(lambda: len(serving_pids(lbgw) - set(first)) == 1)
            restarted = time.monotonic()
            ok_before = callers.ok
            await until(lambda: callers.ok > ok_before + 500)
            await callers.stop()
            assert lbgw.process.poll() is None
            died = events(lbgw, "worker died; restarting it")
            assert [e["pid"] for e in died] == [victim]
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    # Only calls in flight on the killed worker's connections fail: at most one per
    # caller, all UNAVAILABLE, all at the kill.
    assert len(callers.failures) <= callers.n, callers.failures
    assert {code for _, code in callers.failures} <= {"UNAVAILABLE"}
    assert all(t - killed < 2.0 for t, _ in callers.failures)
    print(
        f"\nkilled worker: {len(callers.failures)} of {callers.ok + len(callers.failures)} "
        f"calls failed; restarted in {restarted - killed:.2f}s"
    )


async def test_only_a_crash_loop_stops_the_gateway() -> None:
    async with echo_backends(EchoBackend("a")) as (addr,):  # noqa: SIM117 - the inner context needs the outer
        async with lbgw_process(*ARGS, "--backend", addr) as lbgw:
            killed: set[int] = set()
            async with asyncio.timeout(60):
                while lbgw.process.poll() is None:
                    # Each worker as soon as it starts: deaths come faster than restarts.
                    started = {e["pid"] for e in events(lbgw, "worker started")}
                    for pid in started - killed:
                        killed.add(pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    await asyncio.sleep(0.02)
            code = await asyncio.to_thread(lbgw.wait, 30)
    assert code == 1
    assert len(killed) >= CRASH_LOOP_DEATHS - 1
    assert events(lbgw, "workers crash-looping: stopping the gateway")


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_storms_never_kill_lbgw(tmp_path: Path, workers: str) -> None:
    path = tmp_path / "lbgw.toml"
    async with echo_backends(EchoBackend("a")) as (addr,):
        good = (
            f'[[listeners]]\naddress = "127.0.0.1:0"\n[clusters.echo]\nendpoints = ["{addr}"]\n'
            f'[clusters.echo.methods]\n"{UNARY}" = "unary"\n'
        )
        path.write_text(good)
        async with lbgw_process("--config", str(path), "--workers", workers) as lbgw:
            lbgw.process.send_signal(signal.SIGHUP)  # early: workers may not serve yet
            await until(lambda: len(serving_pids(lbgw)) >= int(workers))
            callers = Callers(lbgw.address)
            callers.start()
            for n in range(30):
                if n == 10:
                    path.write_text(good.replace("endpoints", "endpoint"))  # broken
                if n == 20:
                    path.write_text(good)
                targets = [lbgw.process.pid, *serving_pids(lbgw)]
                os.kill(targets[n % len(targets)], signal.SIGHUP)
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)
            await callers.stop()
            assert lbgw.process.poll() is None
            refused = events(lbgw, "reload refused: config invalid, still running the old one")
            assert refused and refused[0]["key"] == "clusters.echo.endpoint"
            assert not events(lbgw, "worker died; restarting it")
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    assert callers.failures == []
    assert callers.ok > 100
