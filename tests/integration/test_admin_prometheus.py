"""A real Prometheus server scrapes lbgw's ``/metrics``; promtool checks a scrape.

Debian's ``prometheus`` package (``.ci/run`` installs it), on 127.0.0.1,
with its data in the test's temporary folder; stopped by its PID.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp

from lbgw.testing import EchoBackend
from tests.integration.support import config, echo_backends, request, through
from tests.integration.test_admin import admin_url, free_port, http, with_admin

CALLS = 17


def _require_prometheus() -> None:
    missing = [p for p in ("prometheus", "promtool") if shutil.which(p) is None]
    assert not missing, f"{missing}: install Debian's prometheus package (.ci/run does)"


async def _query(api: str, promql: str) -> float | None:
    """The value of an instant query's only result, or None while there is none."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{api}/api/v1/query", params={"query": promql}) as response,
        ):
            data = await response.json()
    except (aiohttp.ClientError, TimeoutError):
        return None  # not up yet
    results = data.get("data", {}).get("result", [])
    return float(results[0]["value"][1]) if results else None


async def test_prometheus_scrapes_the_calls_made(tmp_path: Path) -> None:
    _require_prometheus()
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs, through(with_admin(config(addrs))) as t:
        for _ in range(CALLS):
            await t.stub.Unary(request(), timeout=5)
        target = admin_url(t.gateway).removeprefix("http://")
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: lbgw\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{port}"
        try:
            total = None
            async with asyncio.timeout(90):
                while total != CALLS:
                    assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
                    await asyncio.sleep(0.5)
                    total = await _query(api, 'sum(lbgw_downstream_rq_total{grpc_code="OK"})')
            up = await _query(api, 'sum(lbgw_upstream_rq_total{cluster="echo"})')
            health = await _query(api, 'up{job="lbgw"}')
        finally:
            prometheus.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(prometheus.wait, 30)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
            log.close()
        _, text = await http(admin_url(t.gateway) + "/metrics")
    assert total == CALLS
    assert up == CALLS
    assert health == 1
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == ""  # not even a lint warning
