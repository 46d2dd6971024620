"""``--workers 2`` with ``--admin``: one admin address for the whole gateway.

The real ``lbgw`` command, its two worker processes and their supervisor;
the metrics come from prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.testing import EchoBackend
from tests.integration.support import UNARY, echo_backends, lbgw_process, request
from tests.integration.test_admin import free_port, samples

CALLS = 24


async def _get(url: str, verb: str = "GET", **params: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(verb, url, params=params) as response,
    ):
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_one_admin_address_totals_every_worker() -> None:  # noqa: PLR0915 - one run
    a, b = EchoBackend("a"), EchoBackend("b")
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    async with echo_backends(a, b) as (addr_a, addr_b):
        args = ["--listen", "127.0.0.1:0", "--backend", addr_a, "--backend", addr_b]
        args += ["--workers", "2", "--admin", f"127.0.0.1:{port}", "--method", f"{UNARY}=unary"]
        args += ["--health-check", "none"]
        async with lbgw_process(*args) as lbgw:
            async with asyncio.timeout(20):
                while len([e for e in lbgw.lines if e["event"] == "admin listening"]) < 3:
                    await asyncio.sleep(0.05)  # the supervisor's, and each worker's socket
            workers = next(e for e in lbgw.lines if e["event"] == "workers")["pids"]
            served: set[int] = set()
            for _ in range(CALLS):  # one connection each: the kernel spreads them
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with aio.insecure_channel(lbgw.address, options) as channel:
                    stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                    await stub.Unary(request(), timeout=5)
            # Which workers served: each worker's own view in /clusters.
            async with asyncio.timeout(20):
                while True:  # the workers mirror their counts once a second
                    _, text = await _get(admin + "/metrics")
                    got = samples(text)
                    total = got.get(("lbgw_downstream_rq_total", (("grpc_code", "OK"),)), 0)
                    if total >= CALLS:
                        break
                    await asyncio.sleep(0.2)
            _, view = await _get(admin + "/clusters")
            for w in view["workers"]:
                if sum(e["calls_total"] for e in w["clusters"][0]["endpoints"]):
                    served.add(w["pid"])
            merged = view["clusters"][0]["endpoints"]
            _, ready = await _get(admin + "/ready")
            # An admin action reaches every worker.
            status_drain, drained = await _get(
                admin + "/endpoints/drain", "POST", cluster="default", address=addr_a
            )
            _, after = await _get(admin + "/clusters")
            _, explained = await _get(admin + "/explain", method=UNARY, metadata="x-user:1")
            _, info = await _get(admin + "/server_info")
            lbgw.process.terminate()
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    assert total == CALLS  # one scrape, the sum over both workers
    up = sum(
        v
        for (name, labels), v in got.items()
        if name == "lbgw_upstream_rq_total" and dict(labels)["grpc_code"] == "OK"
    )
    assert up == CALLS == a.seen.calls + b.seen.calls
    assert got[("lbgw_downstream_rq_duration_seconds_count", ())] == CALLS
    assert {w["pid"] for w in view["workers"]} == set(workers)
    assert served == set(workers), "the kernel spread the connections over both workers"
    assert sum(e["calls_total"] for e in merged) == CALLS
    assert ready["ready"] is True
    assert status_drain == 200 and len(drained["workers"]) == 2
    assert all(w["drained"] for w in drained["workers"])
    for w in after["workers"]:
        row = next(e for e in w["clusters"][0]["endpoints"] if e["address"] == addr_a)
        assert row["state"] == "drained"
    assert set(info["pids"][1:]) == set(workers) and info["workers"] == 2
    assert explained["worker"] in workers and explained["endpoint"] == addr_b
    assert explained["skipped"] == [{"address": addr_a, "reason": "drained"}]


async def test_post_reload_on_the_supervisor_reaches_every_worker_and_a_restarted_one_answers(
    tmp_path: Any,
) -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    path = tmp_path / "lbgw.toml"

    def write(backend: str) -> None:
        path.write_text(
            f'[server]\nworkers = 2\n[admin]\naddress = "127.0.0.1:{port}"\n'
            '[[listeners]]\naddress = "127.0.0.1:0"\n'
            f'[clusters.echo]\nendpoints = ["{backend}"]\n'
            f'[clusters.echo.methods]\n"{UNARY}" = "unary"\n'
        )

    async with echo_backends(a, b) as (addr_a, addr_b):
        write(addr_a)
        async with lbgw_process("--config", str(path)) as lbgw:
            async with asyncio.timeout(30):
                while len([e for e in list(lbgw.lines) if e["event"] == "serving"]) < 2:
                    await asyncio.sleep(0.05)
            write(addr_b)
            status, answer = await _get(admin + "/reload", "POST")
            assert status == 200 and answer["ok"] is True, answer
            async with asyncio.timeout(30):  # each worker applies the same snapshot
                while {
                    e["pid"]
                    for e in list(lbgw.lines)
                    if e["event"] == "reloaded" and e.get("config") == answer["config"]
                } != set(answer["workers"]):
                    await asyncio.sleep(0.05)
            # A TLS file that does not exist: refused by the supervisor, naming key and file,
            # before any worker (or a restarted one) would read it.
            text = path.read_text().replace(
                '[[listeners]]\naddress = "127.0.0.1:0"\n',
                '[[listeners]]\naddress = "127.0.0.1:0"\n'
                f'tls = {{ cert_file = "{tmp_path}/gone.pem", '
                f'key_file = "{tmp_path}/gone.key" }}\n',
            )
            path.write_text(text)
            status, refused = await _get(admin + "/reload", "POST")
            assert refused["ok"] is False, refused
            assert "listeners[0].tls.cert_file" in refused["error"]
            assert f"{tmp_path}/gone.pem" in refused["error"]
            write(addr_b)
            for _ in range(6):  # one connection each: both workers serve the new endpoint
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with aio.insecure_channel(lbgw.address, options) as channel:
                    stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                    assert (await stub.Unary(request(), timeout=5)).backend == "b"
            # A worker that dies is restarted with its admin socket: the fleet sees two again.
            victim = answer["workers"][0]
            os.kill(victim, signal.SIGKILL)
            async with asyncio.timeout(30):
                while True:
                    _, view = await _get(admin + "/clusters")
                    pids = {w["pid"] for w in view["workers"]}
                    if len(pids) == 2 and victim not in pids:
                        break
                    await asyncio.sleep(0.2)
            lbgw.process.terminate()
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
