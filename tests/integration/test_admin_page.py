"""The status page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Playwright drives the system's browser (``executable_path``); it never
downloads one. The flags keep Chromium off the network but for 127.0.0.1
(this machine has no other), and a fresh profile per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import async_playwright

from lbgw.health import HealthService
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import config, request, through
from tests.integration.test_admin import admin_url, with_admin

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Any]:
    """A page in a fresh headless Chromium; the browser is closed (and so stopped) at exit."""
    assert shutil.which("chromium"), "install Debian's chromium package (.ci/run does)"
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield await context.new_page()
        finally:
            await context.close()


async def _traffic(stub: Any, stop: asyncio.Event) -> None:
    """A few calls a second, so the page has rates to chart."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            await stub.Unary(request(), timeout=5)
        await asyncio.sleep(0.05)


async def test_the_page_shows_endpoints_follows_a_change_and_says_when_stale(
    tmp_path: Path,
) -> None:
    health_a, health_b = HealthService(), HealthService()
    a, b = EchoBackend("a"), EchoBackend("b")
    async with (
        serve(echo_registrar(a, health=health_a)) as addr_a,
        serve(echo_registrar(b, health=health_b)) as addr_b,
    ):
        cfg = with_admin(config([addr_a, addr_b], [1, 3]))
        async with through(cfg) as t, chromium(tmp_path / "profile") as page:
            stop = asyncio.Event()
            traffic = asyncio.ensure_future(_traffic(t.stub, stop))
            try:
                await page.goto(admin_url(t.gateway) + "/", wait_until="load")
                row_a = f'tr[data-endpoint="{addr_a}"]'
                await page.wait_for_selector(f'{row_a}[data-state="serving"]', timeout=30_000)
                await page.wait_for_selector(f'tr[data-endpoint="{addr_b}"]', timeout=30_000)
                assert await page.title() == "lbgw status"
                assert await page.inner_text(f"{row_a} .state") == "serving"

                health_a.set("", False)  # the backend says NOT_SERVING: lbgw takes it out
                await page.wait_for_selector(f'{row_a}[data-state="not_serving"]', timeout=30_000)
                assert await page.inner_text(f"{row_a} .state") == "not serving"
                colour = await page.eval_on_selector(
                    f"{row_a} .state", "e => getComputedStyle(e).backgroundColor"
                )
                assert colour == "rgb(198, 40, 40)"  # red
                await page.wait_for_selector('svg.chart[data-chart="echo"] path', timeout=30_000)
                await page.screenshot(path=str(tmp_path / "status.png"), full_page=True)

                # The admin port goes away: the page says its figures are stale.
                assert t.gateway.admin_server is not None
                await t.gateway.admin_server.stop()
                await page.wait_for_selector("body.stale", timeout=30_000)
                assert await page.inner_text("#status") == "stale"
                assert await page.is_visible("#stale-banner")
            finally:
                stop.set()
                await traffic
    shot = tmp_path / "status.png"
    assert shot.stat().st_size > 10_000
    assert shot.read_bytes().startswith(b"\x89PNG")
