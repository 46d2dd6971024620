"""``lbgw demo`` and ``lbgw call``: the gateway in front of two echo backends.

The demo starts two ``EchoBackend`` servers on free loopback ports (weights
1 and 3), the gateway in front of them with smooth weighted round robin, and
makes a few calls through it, printing which backend answered each. It then
keeps serving until Ctrl-C, so ``lbgw call`` (or any gRPC client with
``protos/lbgw/pb/echo.proto``) can call it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal

from grpc import aio

from lbgw.config import AdminConfig, TracingConfig, config_from_mapping
from lbgw.health import HealthService
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve

__all__ = ["call", "run_demo"]

_UNARY = "/lbgw.echo.v1.Echo/Unary"


async def call(address: str, count: int, message: str, timeout: float) -> int:
    """Make ``count`` unary Echo calls to ``address``; print who answered. Exit status."""
    async with aio.insecure_channel(address) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        for n in range(count):
            try:
                reply = await stub.Unary(echo_pb2.EchoRequest(message=message), timeout=timeout)
            except aio.AioRpcError as error:
                print(f"call {n + 1}: {error.code().name}: {error.details()}")
                return 1
            print(f"call {n + 1}: {reply.message!r} answered by {reply.backend}")
    return 0


async def run_demo(
    listen: str,
    calls: int,
    *,
    once: bool,
    tracing: TracingConfig | None = None,
    admin: str | None = None,
) -> int:
    # Ctrl-C or SIGTERM stops the demo at any point, start-up included.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    one, three = EchoBackend("backend-1 (weight 1)"), EchoBackend("backend-2 (weight 3)")
    async with (
        serve(echo_registrar(one, reflection=True, health=HealthService())) as a,
        serve(echo_registrar(three, reflection=True, health=HealthService())) as b,
    ):
        config = config_from_mapping(
            {
                "listeners": [{"address": listen}],
                "clusters": {
                    "echo": {
                        "strategy": "swrr",
                        "endpoints": [{"address": a, "weight": 1}, {"address": b, "weight": 3}],
                        "reflection": True,
                    }
                },
            },
            source="lbgw demo",
        )
        if tracing is not None:
            config = dataclasses.replace(config, tracing=tracing)
        if admin is not None:
            config = dataclasses.replace(config, admin=AdminConfig(address=admin))
        async with Gateway(config) as gateway:
            address = gateway.addresses[0]
            print(f"lbgw demo: gateway on {address}, backends {a} (weight 1) and {b} (weight 3)")
            if gateway.admin_server is not None:
                print(f"lbgw demo: status page on {gateway.admin_server.url}")
            status = await call(address, calls, "hello", 5.0)
            if once or status or stop.is_set():
                return status
            print(f"serving until Ctrl-C; try: lbgw call {address}")
            await stop.wait()
    return 0
