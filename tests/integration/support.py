"""Shared set-up for the integration tests: echo backends and a gateway before them.

Everything binds ``127.0.0.1`` on ports the OS chooses; nothing about gRPC
is mocked. ``lbgw_process`` runs the real ``lbgw`` command as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from grpc import aio

from lbgw.config import Config, config_from_mapping
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve

UNARY = "/lbgw.echo.v1.Echo/Unary"
ALL_KINDS = {
    UNARY: "unary",
    "/lbgw.echo.v1.Echo/ServerStream": "server_streaming",
    "/lbgw.echo.v1.Echo/ClientStream": "client_streaming",
    "/lbgw.echo.v1.Echo/Bidi": "bidi_streaming",
}


@contextlib.asynccontextmanager
async def echo_backends(*backends: EchoBackend) -> AsyncIterator[list[str]]:
    """Serve each backend on its own loopback port; yield their addresses."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serve(echo_registrar(b))) for b in backends]


def config(
    addresses: Sequence[str],
    weights: Sequence[int] | None = None,
    *,
    strategy: str = "swrr",
    methods: dict[str, str] | None = None,
    **extra: Any,
) -> Config:
    """A one-cluster (``echo``) config that routes everything to ``addresses``."""
    weights = weights or [1] * len(addresses)
    cluster: dict[str, Any] = {
        "endpoints": [{"address": a, "weight": w} for a, w in zip(addresses, weights, strict=True)],
        "strategy": strategy,
        "methods": ALL_KINDS if methods is None else methods,
    }
    cluster.update(extra.pop("cluster", {}))
    return config_from_mapping(
        {"listeners": [{"address": "127.0.0.1:0"}], "clusters": {"echo": cluster}, **extra},
        source="<test>",
    )


@dataclass
class Through:
    gateway: Gateway
    channel: aio.Channel
    stub: Any  # echo_pb2_grpc.EchoStub, untyped generated code


@contextlib.asynccontextmanager
async def through(cfg: Config, **channel_options: Any) -> AsyncIterator[Through]:
    """A running gateway for ``cfg`` and a client channel to it."""
    options = list(channel_options.items())
    async with Gateway(cfg) as gateway, aio.insecure_channel(gateway.addresses[0], options) as ch:
        yield Through(gateway, ch, echo_pb2_grpc.EchoStub(ch))  # type: ignore[no-untyped-call]


def request(**fields: Any) -> echo_pb2.EchoRequest:
    return echo_pb2.EchoRequest(**fields)


def in_flight(gateway: Gateway, cluster: str = "echo") -> list[int]:
    kernel = gateway.clusters[cluster].balancer.kernel
    return [kernel.in_flight(i) for i in range(kernel.n)]


async def settle(gateway: Gateway, timeout: float = 5.0) -> list[int]:
    """Wait until the gateway has no call in flight (cancels finish asynchronously)."""
    async with asyncio.timeout(timeout):
        while any(in_flight(gateway)):
            await asyncio.sleep(0.01)
    return in_flight(gateway)


@dataclass
class LbgwProcess:
    process: subprocess.Popen[str]
    address: str
    lines: list[dict[str, Any]]
    drainer: threading.Thread | None = None

    def wait(self, timeout: float) -> int:
        """The exit status, once the process has exited and all its log lines are read."""
        code = self.process.wait(timeout)
        if self.drainer is not None:
            self.drainer.join(timeout)
        return code


def _drain(
    process: subprocess.Popen[str], lines: list[dict[str, Any]], listening: threading.Event
) -> None:
    """Every log line of ``process`` into ``lines``; ``listening`` set at the first
    'listening' line, or when the log ends (the process exited)."""
    assert process.stderr is not None
    for line in process.stderr:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            lines.append(event)
            if event.get("event") == "listening":
                listening.set()
    listening.set()


@contextlib.asynccontextmanager
async def lbgw_process(*args: str, timeout: float = 20.0) -> AsyncIterator[LbgwProcess]:
    """Run ``python -m lbgw serve ARGS``; yield once it listens. Stopped by PID at exit.

    The start is awaited off the event loop (a reader thread reads the log),
    so backends served on the test's own loop answer lbgw's health checks
    and reflection while it starts.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "lbgw", "serve", *args, "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict[str, Any]] = []
    listening = threading.Event()
    drainer = threading.Thread(target=_drain, args=(process, lines, listening), daemon=True)
    drainer.start()
    try:
        await asyncio.to_thread(listening.wait, timeout)
        found = [e for e in list(lines) if e.get("event") == "listening"]
        if not found:
            raise AssertionError(f"lbgw did not report listening within {timeout}s: {lines}")
        yield LbgwProcess(process, found[0]["address"], lines, drainer)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        drainer.join(10)
        if process.stderr is not None:
            process.stderr.close()
