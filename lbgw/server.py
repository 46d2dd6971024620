"""The gateway: builds clusters from a config and runs the grpc.aio server.

``Gateway`` owns the lifecycle: ``start()`` makes one channel per endpoint,
starts the health checks, learns method kinds (config, then reflection),
binds the listeners and starts serving, with lbgw's own health service
beside the proxy; ``stop(grace)`` turns lbgw's health NOT_SERVING, stops
accepting calls, gives those in flight ``grace`` seconds, cancels what is
left, stops the checks and closes the channels. ``cli.py`` calls ``stop`` on
SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any

from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from lbgw import _grpc_private
from lbgw.cluster import Cluster, Target, build_cluster
from lbgw.config import Config, RouteConfig, parse_address
from lbgw.exceptions import StartError
from lbgw.health import HealthService
from lbgw.logs import fields
from lbgw.metrics import Meter
from lbgw.proxy import Proxy
from lbgw.routing import Router
from lbgw.telemetry import Telemetry

if TYPE_CHECKING:
    from lbgw.admin import AdminServer, GatewayAdmin

__all__ = ["Gateway"]

log = logging.getLogger("lbgw.server")


def server_options(config: Config, *, reuse_port: bool) -> list[tuple[str, Any]]:
    limits = config.limits
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", limits.max_send_message_bytes),
        # gRPC sets SO_REUSEPORT by default on Linux, which would let a second
        # gateway bind the same port silently; only --workers shares a port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if limits.max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
    return options


class Gateway:
    """lbgw itself: ``async with Gateway(config) as gw: ... gw.addresses``."""

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        telemetry: Telemetry | None = None,
        admin_socket: str = "",
    ) -> None:
        """``telemetry`` replaces the one ``config.tracing`` describes (tests pass their own).

        ``admin_socket``: a worker's admin port, on this Unix socket (``--workers``).
        """
        self.config = config
        self._admin_socket = admin_socket
        #: The admin port (``[admin] address``), and the call counts its metrics read.
        self.admin: GatewayAdmin | None = None
        self.admin_server: AdminServer | None = None
        metered = config.admin.address is not None or bool(admin_socket)
        self.meter = Meter(c.name for c in config.clusters) if metered else None
        self.router: Router[Target] | None = None
        self._listening = False
        self.telemetry = telemetry if telemetry is not None else Telemetry(config.tracing)
        self._reuse_port = reuse_port
        self._server: aio.Server | None = None
        self.clusters: dict[str, Cluster] = {}
        self.proxy: Proxy | None = None
        self.health = HealthService()
        self.addresses: list[str] = []

    def __repr__(self) -> str:
        state = "serving" if self.addresses and self._server is not None else "stopped"
        return f"<Gateway {state} {', '.join(self.addresses) or '-'} clusters={len(self.clusters)}>"

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(0)

    async def start(self) -> None:
        """Connect, learn method kinds, bind and serve; on any failure, undo it all."""
        try:
            await self._start()
        except BaseException:  # a bind failure, or a cancel (SIGTERM) during start-up
            await self.stop(0)
            raise

    async def _start(self) -> None:
        config = self.config
        _grpc_private.check()
        for cc in config.clusters:
            cluster = build_cluster(
                cc, config.limits, telemetry=self.telemetry, grace=config.grace_period
            )
            self.clusters[cc.name] = cluster
            self.health.track(cluster.health)
        for cluster in self.clusters.values():
            await cluster.learn_kinds()

        server = aio.server(options=server_options(config, reuse_port=self._reuse_port))
        self._server = server
        clusters = self.clusters

        def target(route: RouteConfig) -> Target:
            return Target.of(route, clusters)

        self.router = Router(config.routes, target)
        self.proxy = Proxy(self.router, clusters.values(), self.telemetry, self.meter)
        # lbgw's own health service comes first, so its calls are never forwarded.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self.proxy,))
        for listener in config.listeners:
            try:
                port = server.add_insecure_port(listener.address)
            except RuntimeError as exc:  # grpcio raises when it cannot bind
                raise StartError(f"cannot listen on {listener.address}: {exc}") from exc
            host, _ = parse_address(listener.address)
            self.addresses.append(f"{host}:{port}")
        if self.meter is not None:  # imported before serving: no first call waits for it
            from lbgw.admin import start_gateway_admin  # noqa: PLC0415 - aiohttp only when asked
        await server.start()
        self._listening = True
        for address in self.addresses:
            log.info("listening", extra=fields(address=address))
        if self.meter is not None:
            self.admin, self.admin_server = await start_gateway_admin(self, path=self._admin_socket)
        for cluster in self.clusters.values():
            log.info(
                "cluster",
                extra=fields(
                    cluster=cluster.name,
                    strategy=cluster.balancer.strategy,
                    endpoints=[e.address for e in cluster.endpoints],
                    known_methods=len(cluster.kinds),
                    health_check=self.config.cluster(cluster.name).health_check.mode,
                ),
            )

    @property
    def serving(self) -> bool:
        """Whether the listeners are up (and no stop has begun)."""
        return self._listening and self._server is not None

    async def wait(self) -> None:
        """Until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight calls get ``grace`` seconds, then are cancelled.

        lbgw's own health turns NOT_SERVING first, so that an orchestrator
        watching it stops sending before the listeners close: ``Watch``
        streams hear it at once; ``Check`` polls during ``drain_delay``
        (taken from the grace period), while lbgw still serves every call.
        Then the ``Watch`` streams end, so they do not hold the drain open,
        and the listeners close. A cancel during the drain delay still stops
        everything, at once.
        """
        self.health.drain()
        server, self._server = self._server, None
        delay = self.config.drain_delay if server is not None else 0.0
        if grace is not None:
            delay = min(delay, grace)
        try:
            if delay > 0:
                log.info("draining", extra=fields(drain_delay=delay, grace=grace))
                await asyncio.sleep(delay)
        finally:
            await self._close(server, None if grace is None else grace - delay)

    async def _close(self, server: aio.Server | None, grace: float | None) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            await admin.stop()
        if server is not None:
            self.health.end_watches()
            await server.stop(grace)
        clusters = list(self.clusters.values())
        for cluster in clusters:
            await cluster.close()
        # Flushes the spans still queued; it blocks, so off the event loop.
        await asyncio.to_thread(self.telemetry.shutdown)
        admin_server, self.admin_server = self.admin_server, None
        if admin_server is not None:  # last: /ready says 503 for the whole drain
            await admin_server.stop()
