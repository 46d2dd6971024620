"""The admin port as an operator uses it: metrics, readiness, drain, explain, its HTTP rules.

Real gateways, real echo backends and a real HTTP client (aiohttp), all on
127.0.0.1; metrics are read back by prometheus_client's own text parser.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from lbgw.config import AdminConfig, Config, config_from_mapping
from lbgw.pb import echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend
from tests.integration.support import (
    UNARY,
    config,
    echo_backends,
    lbgw_process,
    request,
    through,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def with_admin(cfg: Config, **admin: Any) -> Config:
    return dataclasses.replace(cfg, admin=AdminConfig(address="127.0.0.1:0", **admin))


def admin_url(gateway: Gateway) -> str:
    assert gateway.admin_server is not None
    return f"http://{gateway.admin_server.address}"


async def http(url: str, verb: str = "GET", **params: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(verb, url, params=params) as response,
    ):
        return response.status, await response.text()


async def get_json(url: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, params=params) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.json()


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and sorted labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape(gateway: Gateway) -> Samples:
    status, text = await http(admin_url(gateway) + "/metrics")
    assert status == 200
    return samples(text)


def free_port() -> int:
    """A port nothing listens on (bound and closed): calls to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def admin_gateway(cfg: Config) -> AsyncIterator[tuple[Gateway, str, Any]]:
    async with through(with_admin(cfg)) as t:
        yield t.gateway, admin_url(t.gateway), t


async def test_counters_match_the_calls_by_cluster_and_code_with_retries_and_a_rejected_call() -> (
    None
):
    live = EchoBackend("live")
    async with echo_backends(live) as (addr,):
        dead = f"127.0.0.1:{free_port()}"
        cfg = config_from_mapping(
            {
                "listeners": [{"address": "127.0.0.1:0"}],
                "clusters": {
                    "echo": {
                        "endpoints": [{"address": dead}, {"address": addr}],
                        "methods": {UNARY: "unary"},
                        "health_check": {"mode": "none"},
                    }
                },
                "routes": [{"service": "lbgw.echo.v1.Echo", "cluster": "echo"}],
            },
            source="<test>",
        )
        async with admin_gateway(cfg) as (gateway, _, t):
            for _ in range(6):
                await t.stub.Unary(request(), timeout=5)
            with pytest.raises(aio.AioRpcError) as refused:
                await t.stub.Unary(request(status_code=grpc.StatusCode.NOT_FOUND.value[0]))
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(aio.AioRpcError) as unrouted:
                await t.channel.unary_unary("/other.v1.Svc/Call")(b"", timeout=5)
            assert unrouted.value.code() is grpc.StatusCode.UNIMPLEMENTED
            got = await scrape(gateway)
    echo = (("cluster", "echo"),)
    down = "lbgw_downstream_rq_total"
    assert got[down, (("grpc_code", "OK"),)] == 6
    assert got[down, (("grpc_code", "NOT_FOUND"),)] == 1
    assert got[down, (("grpc_code", "UNIMPLEMENTED"),)] == 1  # the call no route takes
    assert got["lbgw_downstream_rq_duration_seconds_count", ()] == 8
    up = "lbgw_upstream_rq_total"
    ok = got[up, (("cluster", "echo"), ("grpc_code", "OK"))]
    unavailable = got[up, (("cluster", "echo"), ("grpc_code", "UNAVAILABLE"))]
    assert ok == 6 == live.seen.calls - 1  # the live backend also answered NOT_FOUND once
    assert got[up, (("cluster", "echo"), ("grpc_code", "NOT_FOUND"))] == 1
    # Each call that met the dead endpoint first was retried on the live one, and succeeded.
    assert unavailable >= 1
    assert got["lbgw_upstream_rq_retry_total", echo] == unavailable
    assert got["lbgw_upstream_rq_retry_success_total", echo] == unavailable
    assert got["lbgw_upstream_rq_retry_overflow_total", echo] == 0
    assert got["lbgw_upstream_rq_duration_seconds_count", echo] == 7 + unavailable
    assert got["lbgw_upstream_rq_active", echo] == 0
    assert got["lbgw_downstream_rq_active", ()] == 0
    states = {dict(k[1])["state"]: v for k, v in got.items() if k[0] == "lbgw_endpoints"}
    assert states["serving"] >= 1 and sum(states.values()) == 2  # the dead one may be ejected
    assert states["ejected"] == got["lbgw_outlier_ejections_active", echo]
    info = [k for k in got if k[0] == "lbgw_build_info"]
    assert len(info) == 1 and dict(info[0][1])["implementation"] in ("cython", "python")
    assert any(name == "process_cpu_seconds_total" for name, _ in got)  # the process collector
    # No per-endpoint label unless asked for.
    assert not any("endpoint" in dict(labels) for _, labels in got)


async def test_per_endpoint_metrics_label_the_upstream_series_by_endpoint() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs:
        cfg = with_admin(config(addrs, [1, 3]), per_endpoint_metrics=True)
        async with through(cfg) as t:
            for _ in range(8):
                await t.stub.Unary(request(), timeout=5)
            got = await scrape(t.gateway)
    per = {
        dict(labels)["endpoint"]: v
        for (name, labels), v in got.items()
        if name == "lbgw_upstream_rq_total" and dict(labels)["grpc_code"] == "OK"
    }
    assert per == {addrs[0]: 2, addrs[1]: 6}


async def test_health_checks_and_ejections_are_counted() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,):
        cfg = config([addr], cluster={"health_check": {"mode": "tcp", "interval": 0.05}})
        async with admin_gateway(cfg) as (gateway, _, _t):
            key = ("lbgw_health_check_total", (("cluster", "echo"), ("result", "passed")))
            async with asyncio.timeout(20):
                while (await scrape(gateway)).get(key, 0) < 3:
                    await asyncio.sleep(0.05)
            got = await scrape(gateway)
    assert got["lbgw_outlier_ejections_total", (("cluster", "echo"),)] == 0
    assert got["lbgw_outlier_ejections_active", (("cluster", "echo"),)] == 0


async def test_ready_is_503_after_healthcheck_fail_and_200_after_ok() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,), admin_gateway(config([addr])) as (gateway, url, t):
        assert (await http(url + "/ready"))[0] == 200
        assert (await http(url + "/live"))[0] == 200
        assert (await http(url + "/healthcheck/fail", "POST"))[0] == 200
        status, body = await http(url + "/ready")
        assert status == 503 and "/healthcheck/fail" in body
        # lbgw's own grpc.health.v1 "" says NOT_SERVING too, and calls still flow.
        assert not gateway.health.serving
        assert (await t.stub.Unary(request(), timeout=5)).backend == "a"
        assert (await http(url + "/healthcheck/ok", "POST"))[0] == 200
        assert (await http(url + "/ready"))[0] == 200


async def test_ready_is_503_while_the_gateway_drains() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,):
        cfg = with_admin(dataclasses.replace(config([addr]), drain_delay=2.0))
        gateway = Gateway(cfg)
        await gateway.start()
        url = admin_url(gateway)
        try:
            assert (await http(url + "/ready"))[0] == 200
            stopping = asyncio.ensure_future(gateway.stop(5.0))
            async with asyncio.timeout(10):
                while (await http(url + "/ready"))[0] != 503:
                    await asyncio.sleep(0.02)
            status, body = await http(url + "/ready")
            assert status == 503 and "draining" in body
            await stopping
        finally:
            await gateway.stop(0)


async def test_drain_takes_an_endpoint_out_while_its_calls_in_flight_finish() -> None:
    slow, other = EchoBackend("slow", delay=1.5), EchoBackend("other")
    async with (
        echo_backends(slow, other) as (slow_addr, other_addr),
        admin_gateway(config([slow_addr, other_addr])) as (_, url, t),
    ):
        # swrr over [slow, other]: the first call goes to slow, and stays in flight.
        in_flight = asyncio.ensure_future(t.stub.Unary(request(), timeout=10))
        async with asyncio.timeout(10):
            while slow.seen.calls == 0:
                await asyncio.sleep(0.01)
        status, body = await http(
            url + "/endpoints/drain", "POST", cluster="echo", address=slow_addr
        )
        assert status == 200 and '"drained": true' in body and '"in_flight": 1' in body
        view = await get_json(url + "/clusters")
        row = next(e for e in view["clusters"][0]["endpoints"] if e["address"] == slow_addr)
        assert row["state"] == "drained" and row["in_flight"] == 1 and not row["in_rotation"]
        during = [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(4)]
        assert during == ["other"] * 4
        assert (await in_flight).backend == "slow"  # the call in flight finished on it
        status, _ = await http(
            url + "/endpoints/undrain", "POST", cluster="echo", address=slow_addr
        )
        assert status == 200
        slow.delay = 0
        after = collections.Counter(
            [(await t.stub.Unary(request(), timeout=5)).backend for _ in range(4)]
        )
        assert after == {"slow": 2, "other": 2}
        assert (await http(url + "/endpoints/drain", "POST", cluster="echo"))[0] == 400
        missing = await http(url + "/endpoints/drain", "POST", cluster="echo", address="x:1")
        assert missing[0] == 404


async def test_get_on_a_post_path_is_405_and_an_unknown_path_404() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,), admin_gateway(config([addr])) as (gateway, url, _):
        for path in ("/healthcheck/fail", "/healthcheck/ok", "/endpoints/drain", "/logging"):
            assert (await http(url + path))[0] == 405, path
        assert gateway.health.serving  # the GET did nothing
        for path in ("/nope", "/clusters/x", "/metrics/"):
            assert (await http(url + path))[0] == 404, path
        assert (await http(url + "/ready", "POST"))[0] == 405


async def test_logging_changes_the_level_and_every_action_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging  # noqa: PLC0415

    a = EchoBackend("a")
    root = logging.getLogger()
    before = root.level
    try:
        async with echo_backends(a) as (addr,), admin_gateway(config([addr])) as (_, url, _t):
            with caplog.at_level(logging.INFO, logger="lbgw.admin"):
                assert (await http(url + "/logging", "POST", level="debug"))[0] == 200
                assert root.level == logging.DEBUG
                assert (await http(url + "/logging", "POST", level="loud"))[0] == 400
            actions = [r for r in caplog.records if r.getMessage() == "admin action"]
            assert len(actions) == 2
    finally:
        root.setLevel(before)


async def test_config_shows_no_secret() -> None:
    a = EchoBackend("a")
    secret = "s3cr3t-sticky-value"
    async with echo_backends(a) as (addr,):
        cfg = config([addr], cluster={"sticky": {"enabled": True, "secret": secret}})
        async with admin_gateway(cfg) as (_, url, _t):
            status, body = await http(url + "/config")
            info = await get_json(url + "/server_info")
    assert status == 200
    assert secret not in body
    assert '"secret": "<redacted>"' in body
    assert addr in body  # the rest of the config is there
    assert info["implementation"] in ("cython", "python") and info["workers"] == 1
    assert len(info["config_hash"]) == 16 and "event_loop" in info


async def test_clusters_reports_state_reason_weights_and_shares() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs, admin_gateway(config(addrs, [1, 3])) as (_, url, t):
        for _ in range(40):
            await t.stub.Unary(request(), timeout=5)
        async with asyncio.timeout(10):
            while True:  # the sampler's minute includes the calls after its next second
                view = await get_json(url + "/clusters", history="1")
                eps = view["clusters"][0]["endpoints"]
                if sum(e["calls_1m"] for e in eps) == 40:
                    break
                await asyncio.sleep(0.1)
    cluster = view["clusters"][0]
    assert cluster["name"] == "echo" and cluster["strategy"] == "swrr" and cluster["serving"]
    first, second = cluster["endpoints"]
    assert (first["weight"], second["weight"]) == (1, 3)
    assert (first["calls_total"], second["calls_total"]) == (10, 30)
    assert (first["share_1m"], second["share_1m"]) == (0.25, 0.75)
    assert (first["configured_share"], second["configured_share"]) == (0.25, 0.75)
    assert first["state"] == "serving" and first["reason"]
    assert isinstance(first["history"], list)


EXPLAINED = ["swrr", "round_robin", "maglev", "ring_hash", "least_request", "ewma"]


@pytest.mark.parametrize("strategy", EXPLAINED)
async def test_a_call_after_explain_goes_to_the_endpoint_it_named(strategy: str) -> None:
    backends = [EchoBackend(f"b{i}") for i in range(3)]
    async with echo_backends(*backends) as addrs:
        name_of = {addr: b.name for addr, b in zip(addrs, backends, strict=True)}
        extra: dict[str, Any] = {}
        if strategy in ("maglev", "ring_hash"):
            extra = {"params": {"hash_key": "x-user"}}
        # least_request draws two (P2C) only with equal weights; unequal, it runs EDF.
        weights = None if strategy in ("round_robin", "least_request") else [1, 2, 3]
        cfg = config(addrs, weights, strategy=strategy, cluster=extra)
        async with admin_gateway(cfg) as (_, url, t):
            for n in range(8):
                user = f"user-{n % 3}"
                data = await get_json(
                    url + "/explain", method=UNARY, metadata=f"x-user:{user}", peer="10.1.2.3"
                )
                again = await get_json(url + "/explain", method=UNARY, metadata=f"x-user:{user}")
                assert again["endpoint"] == data["endpoint"]  # explaining moved nothing
                reply = await t.stub.Unary(request(), metadata=(("x-user", user),), timeout=5)
                assert reply.backend == name_of[data["endpoint"]], (n, data)
    assert data["cluster"] == "echo" and data["strategy"] == strategy and data["route"]
    if strategy in ("maglev", "ring_hash"):
        assert data["hash"]["key"].startswith("user-") and data["hash"]["position"] >= 0
        assert data["candidates"] == []
    elif strategy in ("least_request", "ewma"):  # power of two choices: the two it draws
        assert len(data["draw"]) == 2 and data["endpoint"] in data["draw"]
    else:
        assert {c["address"] for c in data["candidates"]} == set(addrs)


async def test_explain_says_why_endpoints_are_skipped_and_when_nothing_routes() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs, admin_gateway(config(addrs)) as (_, url, _t):
        await http(url + "/endpoints/drain", "POST", cluster="echo", address=addrs[0])
        data = await get_json(url + "/explain", method=UNARY)
        assert data["skipped"] == [{"address": addrs[0], "reason": "drained"}]
        assert data["endpoint"] == addrs[1]
        assert (await http(url + "/explain"))[0] == 400
        await http(url + "/endpoints/drain", "POST", cluster="echo", address=addrs[1])
        status, body = await http(url + "/explain", method=UNARY)
        assert status == 503 and '"endpoint": null' in body


async def test_lbgw_explain_prints_a_table() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs, admin_gateway(config(addrs, [1, 3])) as (gw, url, _):
        assert gw.admin_server is not None
        admin = gw.admin_server.address
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "lbgw", "explain", "--admin", admin, UNARY, "-H", "x-a:1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        expected = (await get_json(url + "/explain", method=UNARY))["endpoint"]
    assert done.returncode == 0, done.stderr
    assert "strategy  swrr" in done.stdout
    assert f"endpoint  {expected}" in done.stdout
    assert "current_weight" in done.stdout


def test_a_non_loopback_admin_address_without_allow_remote_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbgw", "serve", "--backend", "127.0.0.1:1", "--admin", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--admin" in done.stderr and "allow_remote = true" in done.stderr


async def test_serve_admin_flag_serves_the_admin_port() -> None:
    a = EchoBackend("a")
    port = free_port()
    async with echo_backends(a) as (addr,):
        args = ["--listen", "127.0.0.1:0", "--backend", addr, "--admin", f"127.0.0.1:{port}"]
        async with lbgw_process(*args) as lbgw:
            async with asyncio.timeout(15):
                while not any(e["event"] == "admin listening" for e in lbgw.lines):
                    await asyncio.sleep(0.05)
            assert (await http(f"http://127.0.0.1:{port}/live"))[0] == 200
            status, page = await http(f"http://127.0.0.1:{port}/")
            assert status == 200 and "<title>lbgw status</title>" in page
            assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # offline
            lbgw.process.terminate()
            assert await asyncio.to_thread(lbgw.wait, 20) == 0


def test_demo_prints_the_status_page_url() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lbgw", "demo", "--listen", "127.0.0.1:0", "--once", "--calls", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "status page on http://127.0.0.1:" in done.stdout


async def test_a_tripped_circuit_breaker_and_the_gateway_cap_are_counted() -> None:
    slow = EchoBackend("slow", delay=1.0)
    async with echo_backends(slow) as (addr,):
        cfg = config(
            [addr],
            cluster={"circuit_breakers": {"max_requests": 1}, "health_check": {"mode": "none"}},
        )
        async with admin_gateway(cfg) as (gateway, _, t):
            held = asyncio.ensure_future(t.stub.Unary(request(), timeout=10))
            async with asyncio.timeout(5):
                while slow.seen.calls == 0:
                    await asyncio.sleep(0.01)
            with pytest.raises(aio.AioRpcError) as tripped:
                await t.stub.Unary(request(), timeout=5)
            assert tripped.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "circuit breaker open: max_requests 1" in (tripped.value.details() or "")
            await held
            got = await scrape(gateway)
    opened = "lbgw_circuit_breaker_open_total"
    assert got[opened, (("cluster", "echo"), ("limit", "max_requests"))] == 1
    assert got[opened, (("cluster", "echo"), ("limit", "max_retries"))] == 0
    assert got["lbgw_downstream_rq_total", (("grpc_code", "UNAVAILABLE"),)] == 1
    assert got["lbgw_downstream_rq_total", (("grpc_code", "OK"),)] == 1
    assert got["lbgw_downstream_rq_overflow_total", ()] == 0


async def test_post_reload_applies_the_file_and_is_counted(tmp_path: Any) -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    port = free_port()
    async with echo_backends(a, b) as (addr_a, addr_b):
        path = tmp_path / "lbgw.toml"

        def write(backend: str) -> None:
            path.write_text(
                f'[admin]\naddress = "127.0.0.1:{port}"\n'
                '[[listeners]]\naddress = "127.0.0.1:0"\n'
                f'[clusters.echo]\nendpoints = ["{backend}"]\n'
                f'[clusters.echo.methods]\n"{UNARY}" = "unary"\n'
            )

        write(addr_a)
        async with lbgw_process("--config", str(path)) as lbgw:
            url = f"http://127.0.0.1:{port}"
            async with asyncio.timeout(15):
                while not any(e["event"] == "admin listening" for e in list(lbgw.lines)):
                    await asyncio.sleep(0.05)
            async with aio.insecure_channel(lbgw.address) as channel:
                stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                assert (await stub.Unary(request(), timeout=5)).backend == "a"
                assert (await http(url + "/reload"))[0] == 405  # a GET changes nothing
                write(addr_b)
                status, body = await http(url + "/reload", "POST")
                assert status == 200, body
                answer = json.loads(body)
                assert answer["ok"] is True and answer["plan"]["updated"] == ["echo"]
                assert (await stub.Unary(request(), timeout=5)).backend == "b"
                path.write_text("[clusters.echo]\nstrategy = 7\n")  # invalid: refused
                status, body = await http(url + "/reload", "POST")
                refused = json.loads(body)
                assert refused["ok"] is False and str(path) in refused["error"]
                assert "expected" in refused["error"]
                assert (await stub.Unary(request(), timeout=5)).backend == "b"
            got = samples((await http(url + "/metrics"))[1])
            assert got["lbgw_config_reload_total", (("result", "ok"),)] == 1
            assert got["lbgw_config_reload_total", (("result", "error"),)] == 1
            lbgw.process.terminate()
            assert await asyncio.to_thread(lbgw.wait, 20) == 0
