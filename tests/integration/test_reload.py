"""Hot reload on SIGHUP, as a user runs it: 8 callers, 10 reloads, 0 calls lost.

Each reload rewrites the config file and sends lbgw SIGHUP: endpoints are
added and removed, weights and strategies change, and a second listener
comes and goes (the callers use the first, which stays). After each reload
the split of the calls follows the new weights. The same with --workers 2,
where each worker applies the same validated snapshot. A
broken file on SIGHUP keeps lbgw serving the old config, and the log names
the key.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.reload import config_hash
from lbgw.testing import EchoBackend
from tests.integration.dnsmasq import free_port
from tests.integration.support import UNARY, LbgwProcess, echo_backends, lbgw_process, request


def toml(
    listeners: Sequence[str], endpoints: dict[str, int], strategy: str = "swrr", *, grace: float = 5
) -> str:
    lines = [f"[server]\ngrace_period = {grace}\n"]
    lines += [f'[[listeners]]\naddress = "{a}"\n' for a in listeners]
    lines.append(f'[clusters.echo]\nstrategy = "{strategy}"\nendpoints = [')
    lines += [f'  {{ address = "{a}", weight = {w} }},' for a, w in endpoints.items()]
    lines.append("]\n[clusters.echo.methods]")
    lines.append(f'"{UNARY}" = "unary"\n')
    return "\n".join(lines)


@dataclass
class Callers:
    address: str
    n: int = 8
    replies: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _run(self) -> None:
        # Each caller its own connection, so that workers share them.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with aio.insecure_channel(self.address, options) as channel:
            stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                try:
                    reply = await stub.Unary(request(), timeout=10)
                    self.replies.append((time.monotonic(), reply.backend))
                except aio.AioRpcError as exc:
                    at = time.monotonic()
                    self.failures.append(f"{at:.3f} {exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.002)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def split(self, since: float) -> collections.Counter[str]:
        return collections.Counter(b for t, b in self.replies if t >= since)


async def applied(lbgw: LbgwProcess, config_id: str, workers: int, timeout: float = 30) -> None:
    """Until ``workers`` processes say they run ``config_id``."""
    async with asyncio.timeout(timeout):
        while True:
            running = {
                e["pid"]
                for e in list(lbgw.lines)
                if e.get("event") in ("serving", "reloaded") and e.get("config") == config_id
            }
            if len(running) >= workers:
                return
            await asyncio.sleep(0.05)


def shares(counts: collections.Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 2])
async def test_ten_reloads_under_8_callers_lose_no_call(tmp_path: Path, workers: int) -> None:
    a, b, c = EchoBackend("a"), EchoBackend("b"), EchoBackend("c")
    main, extra = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path = tmp_path / "lbgw.toml"
    async with echo_backends(a, b, c) as (addr_a, addr_b, addr_c):
        addr = {"a": addr_a, "b": addr_b, "c": addr_c}
        # (listeners, weights by backend, strategy): 10 reloads after the first.
        steps: list[tuple[list[str], dict[str, int], str]] = [
            ([main], {"a": 1, "b": 3}, "swrr"),
            ([main], {"a": 1, "b": 1, "c": 2}, "swrr"),  # c added
            ([main], {"a": 3, "b": 1, "c": 1}, "swrr"),  # weights
            ([main, extra], {"a": 3, "b": 1, "c": 1}, "swrr"),  # a listener added
            ([main, extra], {"b": 1, "c": 3}, "swrr"),  # a removed
            ([main, extra], {"b": 1, "c": 1}, "round_robin"),  # strategy
            ([main], {"a": 1, "b": 1, "c": 1}, "round_robin"),  # listener removed, a back
            ([main], {"a": 2, "c": 1}, "least_request"),  # b removed, strategy
            ([main, extra], {"a": 1, "b": 1}, "swrr"),  # listener back, endpoints swapped
            ([main, extra], {"a": 1, "b": 4}, "swrr"),  # weights
            ([main], {"c": 1, "b": 1}, "swrr"),  # listener removed, a out, c in
        ]

        def write(step: int) -> str:
            listeners, weights, strategy = steps[step]
            text = toml(listeners, {addr[k]: w for k, w in weights.items()}, strategy)
            path.write_text(text)
            return config_hash(text.encode())

        config_id = write(0)
        args = ["--config", str(path), "--workers", str(workers)]
        async with lbgw_process(*args) as lbgw:
            await applied(lbgw, config_id, workers)
            callers = Callers(main)
            callers.start()
            for step in range(1, len(steps)):
                config_id = write(step)
                lbgw.process.send_signal(signal.SIGHUP)
                await applied(lbgw, config_id, workers)
                since = time.monotonic() + 0.25  # calls picked before it may still end
                await asyncio.sleep(1.25)
                listeners, weights, strategy = steps[step]
                got = shares(callers.split(since))
                if strategy != "least_request":  # its split follows load, not weights alone
                    total = sum(weights.values())
                    for name, w in weights.items():
                        want = w / total if strategy == "swrr" else 1 / len(weights)
                        assert abs(got.get(name, 0) - want) < 0.1, (step, got, weights)
                assert set(got) <= set(weights), (step, got, weights)
                if extra in listeners:  # the added listener serves
                    async with aio.insecure_channel(extra) as ch:
                        stub: Any = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
                        assert (await stub.Unary(request(), timeout=5)).backend in weights
            await callers.stop()
            assert lbgw.process.poll() is None
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    assert callers.failures == [], callers.failures
    assert len(callers.replies) > 1000
    print(f"\nworkers={workers}: {len(callers.replies)} calls, {len(callers.failures)} lost")


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_broken_config_on_sighup_keeps_serving_and_names_the_key(
    tmp_path: Path, workers: int
) -> None:
    a = EchoBackend("a")
    path = tmp_path / "lbgw.toml"
    async with echo_backends(a) as (addr_a,):
        path.write_text(toml(["127.0.0.1:0"], {addr_a: 1}))
        async with lbgw_process("--config", str(path), "--workers", str(workers)) as lbgw:
            path.write_text(toml(["127.0.0.1:0"], {addr_a: 0}))  # weight 0: invalid
            lbgw.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(15):
                while not any(e.get("event", "").startswith("reload refused") for e in lbgw.lines):
                    await asyncio.sleep(0.05)
            refused = next(e for e in lbgw.lines if e["event"].startswith("reload refused"))
            assert refused["key"] == "clusters.echo.endpoints[0].weight"
            assert refused["source"] == str(path)
            async with aio.insecure_channel(lbgw.address) as ch:
                stub: Any = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
                for _ in range(4):
                    assert (await stub.Unary(request(), timeout=5)).backend == "a"
            assert lbgw.process.poll() is None
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0


async def test_a_reload_changes_the_number_of_workers(tmp_path: Path) -> None:
    """More workers: 0 calls lost. Fewer: the workers past the new number drain, and what
    they had received but not yet started is failed by grpc's server shutdown (CANCELLED), at
    most one call per caller (each caller has one call in flight): measured, not hidden."""
    a = EchoBackend("a")
    path = tmp_path / "lbgw.toml"
    main = f"127.0.0.1:{free_port()}"
    async with echo_backends(a) as (addr_a,):
        text = toml([main], {addr_a: 1})
        path.write_text(text.replace("[server]\n", "[server]\nworkers = 2\n"))
        async with lbgw_process("--config", str(path)) as lbgw:
            await applied(lbgw, config_hash(path.read_bytes()), 2)
            callers = Callers(main)
            callers.start()
            lost = []
            for n in (3, 1):
                path.write_text(text.replace("[server]\n", f"[server]\nworkers = {n}\n"))
                lbgw.process.send_signal(signal.SIGHUP)
                await applied(lbgw, config_hash(path.read_bytes()), n)
                if n == 1:  # the two workers past 1 drain and exit
                    async with asyncio.timeout(30):
                        while len([e for e in list(lbgw.lines) if "old worker" in e["event"]]) < 2:
                            await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                lost.append(len(callers.failures))
            await callers.stop()
            assert lbgw.process.poll() is None
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    assert lost[0] == 0, callers.failures  # 2 -> 3 workers
    assert lost[1] <= callers.n, callers.failures  # 3 -> 1
    assert all("CANCELLED" in f for f in callers.failures), callers.failures
    assert len(callers.replies) > 100
    print(f"\nworkers 2 -> 3: 0 lost; 3 -> 1: {lost[1]} lost of {len(callers.replies) + lost[1]}")
