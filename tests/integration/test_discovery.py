"""DNS discovery against a real dnsmasq: records added and removed, DNS down, SRV weights.

Backends listen on 127.0.0.2, 127.0.0.3, ... on one port, under one name in
dnsmasq's hosts file; the test rewrites the file and sends dnsmasq SIGHUP.
8 callers keep calling through lbgw the whole time; not one call may fail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from lbgw.config import AdminConfig, config_from_mapping
from lbgw.pb import echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar
from tests.integration.dnsmasq import Dnsmasq, dnsmasq, free_port, serve_at
from tests.integration.support import ALL_KINDS, lbgw_process, request

NAME = "backends.test"
REFRESH = 1.0
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def dns_config(server: Dnsmasq, port: int, **extra: Any) -> Any:
    cluster: dict[str, Any] = {
        "dns": {
            "name": NAME,
            "port": port,
            "refresh_interval": REFRESH,
            "nameservers": [server.address],
        },
        "methods": ALL_KINDS,
    }
    cluster.update(extra)
    return config_from_mapping(
        {"listeners": [{"address": "127.0.0.1:0"}], "clusters": {"echo": cluster}},
        source="<test>",
    )


@contextlib.asynccontextmanager
async def backends_at(port: int, names: Sequence[str]) -> AsyncIterator[list[EchoBackend]]:
    backends = [EchoBackend(n) for n in names]
    async with contextlib.AsyncExitStack() as stack:
        for host, b in zip(HOSTS, backends, strict=False):
            await stack.enter_async_context(serve_at(echo_registrar(b), f"{host}:{port}"))
        yield backends


@dataclass
class Callers:
    """``n`` callers calling ``Unary`` until stopped; every reply's backend and time."""

    stub: Any
    n: int = 8
    replies: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    metadata: tuple[tuple[str, str], ...] = ()
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = await self.stub.Unary(request(), timeout=10, metadata=self.metadata)
                self.replies.append((time.monotonic(), reply.backend))
            except aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.005)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def first_at(self, backend: str, after: float) -> float | None:
        return next((t for t, b in self.replies if b == backend and t >= after), None)

    def last_at(self, backend: str) -> float | None:
        return max((t for t, b in self.replies if b == backend), default=None)

    async def until_seen(self, backend: str, after: float, timeout: float) -> float:
        async with asyncio.timeout(timeout):
            while (t := self.first_at(backend, after)) is None:
                await asyncio.sleep(0.01)
        return t


def stub_of(channel: aio.Channel) -> Any:
    return echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]


async def test_follows_an_added_and_a_removed_record_under_8_callers(tmp_path: Path) -> None:
    port = free_port(HOSTS)
    with dnsmasq(tmp_path) as dns_server:
        dns_server.write([(HOSTS[0], NAME), (HOSTS[1], NAME)])
        async with backends_at(port, ["a", "b", "c"]):
            cfg = dns_config(dns_server, port)
            async with Gateway(cfg) as gw, aio.insecure_channel(gw.addresses[0]) as ch:
                discovery = gw.discoveries["echo"]
                assert [e.address for e in gw.clusters["echo"].endpoints] == [
                    f"{HOSTS[0]}:{port}",
                    f"{HOSTS[1]}:{port}",
                ]
                callers = Callers(stub_of(ch))
                callers.start()
                await callers.until_seen("b", 0, 10)
                # Added: 127.0.0.4 under the name.
                changed = time.monotonic()
                dns_server.write([(h, NAME) for h in HOSTS])
                first_c = await callers.until_seen("c", changed, 10)
                assert first_c - changed <= 2 * REFRESH + 0.5, first_c - changed
                # Removed: 127.0.0.2 leaves the name; its calls drain, none fails.
                removed = time.monotonic()
                dns_server.write([(HOSTS[1], NAME), (HOSTS[2], NAME)])
                async with asyncio.timeout(10):
                    while len(gw.clusters["echo"].endpoints) != 2:
                        await asyncio.sleep(0.01)
                out = time.monotonic()
                await asyncio.sleep(REFRESH)
                await callers.stop()
                last_a = callers.last_at("a")
                assert last_a is not None and last_a <= out + 0.5
                assert out - removed <= 2 * REFRESH + 0.5, out - removed
                assert callers.failures == []
                assert discovery.changes == 2 and discovery.failures == 0
                after = collections.Counter(b for t, b in callers.replies if t > out + 0.5)
                assert set(after) == {"b", "c"}, after
    print(  # the figures of the closing note: pytest -s shows them
        f"\nDNS change to first call at new endpoint: {first_c - changed:.3f}s; "
        f"to last call at removed endpoint: {last_a - removed:.3f}s; "
        f"calls: {len(callers.replies)}, failed: {len(callers.failures)}"
    )


async def test_dns_down_keeps_the_last_good_set_and_loses_no_call(tmp_path: Path) -> None:
    port = free_port(HOSTS)
    with dnsmasq(tmp_path) as dns_server:
        dns_server.write([(HOSTS[0], NAME), (HOSTS[1], NAME)])
        async with backends_at(port, ["a", "b"]):
            cfg = dataclasses.replace(
                dns_config(dns_server, port), admin=AdminConfig(address="127.0.0.1:0")
            )
            async with Gateway(cfg) as gw, aio.insecure_channel(gw.addresses[0]) as ch:
                discovery = gw.discoveries["echo"]
                callers = Callers(stub_of(ch))
                callers.start()
                dns_server.stop()
                async with asyncio.timeout(15):
                    while discovery.failures < 2:
                        await asyncio.sleep(0.05)
                stopped = time.monotonic()
                await asyncio.sleep(0.5)
                await callers.stop()
                assert callers.failures == []
                assert {b for t, b in callers.replies if t > stopped} == {"a", "b"}
                assert len(gw.clusters["echo"].endpoints) == 2
                assert discovery.last_error is not None
                # Counted for the operator: lbgw_dns_resolution_total by result.
                assert gw.admin_server is not None
                url = f"http://{gw.admin_server.address}/metrics"
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    text = await response.text()
                found = {
                    s.labels["result"]: s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if s.name == "lbgw_dns_resolution_total" and s.labels["cluster"] == "echo"
                }
                assert found["ok"] >= 1 and found["failure"] >= 2 and found["empty"] == 0


async def test_srv_weights_3_to_1_give_a_75_25_split(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    srv = "_grpc._tcp.backends.test"
    extra = [f"--srv-host={srv},a.test,{port_a},0,3", f"--srv-host={srv},b.test,{port_b},0,1"]
    with dnsmasq(tmp_path, extra) as dns_server:
        dns_server.write([("127.0.0.1", "a.test"), ("127.0.0.1", "b.test")])
        a, b = EchoBackend("a"), EchoBackend("b")
        async with (
            serve_at(echo_registrar(a), f"127.0.0.1:{port_a}"),
            serve_at(echo_registrar(b), f"127.0.0.1:{port_b}"),
        ):
            cfg = config_from_mapping(
                {
                    "listeners": [{"address": "127.0.0.1:0"}],
                    "clusters": {
                        "echo": {
                            "dns": {
                                "name": srv,
                                "type": "srv",
                                "nameservers": [dns_server.address],
                            },
                            "methods": ALL_KINDS,
                        }
                    },
                },
                source="<test>",
            )
            async with Gateway(cfg) as gw, aio.insecure_channel(gw.addresses[0]) as ch:
                weights = {e.address: e.weight for e in gw.clusters["echo"].endpoints}
                assert weights == {f"127.0.0.1:{port_a}": 3, f"127.0.0.1:{port_b}": 1}
                stub = stub_of(ch)
                got = collections.Counter(
                    [(await stub.Unary(request(), timeout=5)).backend for _ in range(400)]
                )
    assert got == {"a": 300, "b": 100}


async def test_maglev_moves_only_the_removed_endpoints_keys_and_a_sticky_token_repicks(
    tmp_path: Path,
) -> None:
    port = free_port(HOSTS)
    with dnsmasq(tmp_path) as dns_server:
        dns_server.write([(h, NAME) for h in HOSTS])
        async with backends_at(port, ["a", "b", "c"]):
            cfg = dns_config(
                dns_server,
                port,
                strategy="maglev",
                params={"hash_key": "x-session"},
                sticky={"enabled": True, "secret": "s3cret"},
            )
            async with Gateway(cfg) as gw, aio.insecure_channel(gw.addresses[0]) as ch:
                stub = stub_of(ch)

                async def owners() -> list[str]:
                    return [
                        (await stub.Unary(request(), metadata=(("x-session", f"k{n}"),))).backend
                        for n in range(300)
                    ]

                before = await owners()
                call = stub.Unary(request(), metadata=(("x-session", "k-of-a"),))
                token = next(v for k, v in await call.initial_metadata() if k == "lbgw-sticky")
                pinned = (await call).backend
                gone = HOSTS[["a", "b", "c"].index(pinned)]
                dns_server.write([(h, NAME) for h in HOSTS if h != gone])
                async with asyncio.timeout(10):
                    while len(gw.clusters["echo"].endpoints) != 2:
                        await asyncio.sleep(0.01)
                after = await owners()
                moved_others = sum(b not in (a, pinned) for b, a in zip(before, after, strict=True))
                assert pinned not in after
                assert moved_others <= 0.01 * len(before) + 1, moved_others
                reply = await stub.Unary(request(), metadata=(("lbgw-sticky", token),))
                assert reply.backend != pinned


async def test_quick_form_backend_dns(tmp_path: Path) -> None:
    port = free_port(HOSTS)
    with dnsmasq(tmp_path) as dns_server:
        dns_server.write([(HOSTS[0], NAME)])
        async with backends_at(port, ["a", "b"]):
            args = [
                "--listen",
                "127.0.0.1:0",
                "--backend-dns",
                f"{NAME}:{port}",
                "--dns-server",
                dns_server.address,
                "--dns-refresh",
                "0.5",
            ]
            async with lbgw_process(*args) as lbgw:  # noqa: SIM117 - the inner context needs the outer
                async with aio.insecure_channel(lbgw.address) as ch:
                    stub = stub_of(ch)
                    assert (await stub.Unary(request(), timeout=5)).backend == "a"
                    dns_server.write([(HOSTS[0], NAME), (HOSTS[1], NAME)])
                    seen: set[str] = set()
                    async with asyncio.timeout(10):
                        while seen != {"a", "b"}:
                            seen.add((await stub.Unary(request(), timeout=5)).backend)


@pytest.mark.parametrize("bad", ["backends.test", "backends.test:0", "a b:1"])
def test_quick_form_refuses_a_bad_backend_dns(bad: str) -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    result = subprocess.run(
        [sys.executable, "-m", "lbgw", "serve", "--backend-dns", bad],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "dns" in result.stderr


async def test_a_connection_failure_re_resolves_early(tmp_path: Path) -> None:
    """With a 30 s refresh, a backend that goes away is dropped within seconds: its
    connection fails, and that re-resolves at once (at most once per refresh / 5)."""
    port = free_port(HOSTS)
    refresh = 30.0
    with dnsmasq(tmp_path) as dns_server:
        dns_server.write([(HOSTS[0], NAME), (HOSTS[1], NAME)])
        a, b = EchoBackend("a"), EchoBackend("b")
        async with serve_at(echo_registrar(a), f"{HOSTS[0]}:{port}"):
            cfg = dns_config(
                dns_server,
                port,
                health_check={"interval": 0.2, "unhealthy_threshold": 1},
            )
            cfg = dataclasses.replace(
                cfg,
                clusters=tuple(
                    dataclasses.replace(
                        c, dns=(dataclasses.replace(c.dns[0], refresh_interval=refresh),)
                    )
                    for c in cfg.clusters
                ),
            )
            b_server = serve_at(echo_registrar(b), f"{HOSTS[1]}:{port}")
            await b_server.__aenter__()
            try:
                async with Gateway(cfg) as gw:
                    discovery = gw.discoveries["echo"]
                    assert len(gw.clusters["echo"].endpoints) == 2
                    dns_server.write([(HOSTS[0], NAME)])
                    gone = time.monotonic()
                    await b_server.__aexit__(None, None, None)  # b stops: its connection fails
                    async with asyncio.timeout(refresh / 2):
                        while len(gw.clusters["echo"].endpoints) != 1:
                            await asyncio.sleep(0.05)
                    took = time.monotonic() - gone
                    assert discovery.early >= 1
            finally:
                await b_server.__aexit__(None, None, None)
    assert took < refresh / 2
