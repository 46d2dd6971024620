"""The gateway: builds clusters from a config and runs the grpc.aio server.

``Gateway`` owns the lifecycle: ``start()`` makes one channel per endpoint,
starts the health checks, learns method kinds (config, descriptor sets, then
reflection, which goes on in the background for endpoints it could not ask),
binds the listeners and starts serving, with lbgw's own health service
beside the proxy; ``stop(grace)`` turns lbgw's health NOT_SERVING, stops
accepting calls, gives those in flight ``grace`` seconds, cancels what is
left, stops the checks and closes the channels. ``cli.py`` calls ``stop`` on
SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from types import TracebackType
from typing import TYPE_CHECKING, Any

from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from lbgw import _grpc_private
from lbgw.admission import Admission, listener_options
from lbgw.cluster import Cluster, Target, build_cluster
from lbgw.config import ClusterConfig, Config, RouteConfig, parse_address
from lbgw.discovery import DnsDiscovery
from lbgw.exceptions import StartError
from lbgw.health import HealthService
from lbgw.logs import fields
from lbgw.metrics import Meter
from lbgw.proxy import Proxy
from lbgw.reload import Plan, Reloader, Switch, plan
from lbgw.routing import Router
from lbgw.telemetry import Telemetry
from lbgw.tls import (
    ClientTls,
    IdentityInterceptor,
    ServerTls,
    TlsFileError,
    TlsState,
    as_config_error,
    client_identity,
    identity_settings,
)

if TYPE_CHECKING:
    from lbgw.admin import AdminServer, GatewayAdmin

__all__ = ["Gateway"]

log = logging.getLogger("lbgw.server")

# A replaced cluster closes after this many looks without a call in flight, this far apart.
_IDLE_CHECKS = 5
_IDLE_EVERY = 0.1
# A reload waits this long at least for a new DNS cluster's first answer.
_DNS_WAIT = 10.0


def server_options(config: Config, *, reuse_port: bool) -> list[tuple[str, Any]]:
    limits = config.limits
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_receive_message_bytes),
        ("grpc.max_send_message_length", limits.max_send_message_bytes),
        # gRPC sets SO_REUSEPORT by default on Linux, which would let a second
        # gateway bind the same port silently; only --workers shares a port.
        # (A single gateway binds with it too, after a probe: ``_probe``.)
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    options.extend(listener_options(limits))
    return options


class Gateway:
    """lbgw itself: ``async with Gateway(config) as gw: ... gw.addresses``."""

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        telemetry: Telemetry | None = None,
        tls_poll_interval: float = 5.0,
        admin_socket: str = "",
    ) -> None:
        """``telemetry`` replaces the one ``config.tracing`` describes (tests pass their own).

        ``tls_poll_interval``: seconds between looks at the backend TLS files
        (listener files are looked at by each new connection). ``admin_socket``:
        a worker's admin port, on this Unix socket (``--workers``).
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
        self._server: _Servers | None = None
        self.clusters: dict[str, Cluster] = {}
        self.proxy: Proxy | None = None
        self.health = HealthService()
        self.addresses: list[str] = []
        #: The DNS discovery of each cluster that has a [clusters.NAME.dns] table.
        self.discoveries: dict[str, DnsDiscovery] = {}
        self._switch: Switch | None = None
        # What reloads replaced and is draining: old servers and clusters.
        self._retiring: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()
        self.reloads = 0  # reloads applied, since start
        #: What re-reads the config and applies it (SIGHUP, POST /reload); set by cli.py.
        self.reloader: Reloader | None = None
        self.reload_failures = 0  # reloads refused or failed, since start
        #: TLS (issue 14): the certificates in use and the reloads, for the operator's view.
        self.tls = TlsState()
        #: The gateway-wide cap on calls in flight (``[limits] max_calls_in_flight``).
        self.admission = Admission(config.limits.max_calls_in_flight)
        self.listener_tls: dict[str, ServerTls] = {}  # by listener address as configured
        self.cluster_tls: dict[str, ClientTls] = {}
        self._tls_poll_interval = tls_poll_interval
        self._tls_watch: asyncio.Task[None] | None = None

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
        self.listener_tls = self._listener_tls(config)
        for cc in config.clusters:
            cluster, discovery = await self._build(cc)
            self.clusters[cc.name] = cluster
            if discovery is not None:
                self.discoveries[cc.name] = discovery
            self.health.track(cluster.health)
        for cluster in self.clusters.values():
            await cluster.learn_kinds()

        if self.meter is not None:  # imported before serving: no first call waits for it
            from lbgw.admin import start_gateway_admin  # noqa: PLC0415 - aiohttp only when asked
        self.proxy = self._proxy(config, self.clusters)
        self._switch = Switch(self.proxy)
        servers = _Servers()
        self._server = servers
        for lc in config.listeners:
            servers.add(lc.address, *await self._serve(config, lc.address, lc.address))
        self.addresses = servers.addresses
        self._watch_tls()
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
                    method_kinds=cluster.kind_sources,
                    reflection_pending=cluster.learner.asking,
                    health_check=self.config.cluster(cluster.name).health_check.mode,
                ),
            )

    async def _build(
        self, cc: ClusterConfig, *, wait: float | None = None
    ) -> tuple[Cluster, DnsDiscovery | None]:
        """The cluster ``cc`` describes; with a ``dns`` table, once its name has resolved.

        At start-up lbgw waits for the first answer as long as it takes (as
        Envoy warms a cluster); a reload waits at most ``wait`` seconds, then
        fails, and the running config stays.
        """
        discovery = None
        if cc.dns:
            discovery = DnsDiscovery(cc.name, cc.dns)
            try:
                async with asyncio.timeout(wait):
                    cc = dataclasses.replace(cc, endpoints=await discovery.first())
            except TimeoutError:
                await discovery.stop()
                raise StartError(
                    f"cluster {cc.name!r}: {', '.join(discovery.names)} did not resolve "
                    f"within {wait:g}s ({discovery.last_error})"
                ) from None
            except BaseException:
                await discovery.stop()
                raise
        config = self.config
        cluster_tls = None
        try:
            if cc.tls is not None:
                cluster_tls = ClientTls(cc.name, cc.tls, self.tls)
            cluster = build_cluster(
                cc,
                config.limits,
                telemetry=self.telemetry,
                grace=config.grace_period,
                tls=cluster_tls,
            )
        except BaseException as exc:
            if discovery is not None:
                await discovery.stop()
            if isinstance(exc, TlsFileError):
                raise as_config_error(config.source, exc) from None
            raise
        if discovery is not None:
            discovery.start(cluster)
        return cluster, discovery

    def _listener_tls(self, config: Config) -> dict[str, ServerTls]:
        """Each TLS listener's certificates, loaded; a bad file is a ``ConfigError``."""
        loaded: dict[str, ServerTls] = {}
        try:
            for n, listener in enumerate(config.listeners):
                if listener.tls is not None:
                    loaded[listener.address] = ServerTls(
                        listener.address, listener.tls, f"listeners[{n}].tls", self.tls
                    )
        except TlsFileError as exc:
            raise as_config_error(config.source, exc) from None
        return loaded

    def _watch_tls(self) -> None:
        """Start looking at the backend TLS files, once some cluster has them."""
        self.cluster_tls = {name: c.tls for name, c in self.clusters.items() if c.tls is not None}
        if self.cluster_tls and self._tls_watch is None:
            self._tls_watch = asyncio.ensure_future(self._watch_cluster_tls())

    async def _watch_cluster_tls(self) -> None:
        """Look at the backend TLS files; when they changed and are good, renew the channels."""
        while True:
            await asyncio.sleep(self._tls_poll_interval)
            for name, cluster in list(self.clusters.items()):
                ctls = cluster.tls
                if ctls is None or not ctls.changed():
                    continue
                renewed = ctls.reload()
                if renewed is not None:
                    cluster.tls = self.cluster_tls[name] = renewed
                    cluster.renew_channels(renewed.credentials)

    def _proxy(self, config: Config, clusters: dict[str, Cluster]) -> Proxy:
        def target(route: RouteConfig) -> Target:
            return Target.of(route, clusters)

        self.router = Router(config.routes, target)
        identity = client_identity(config)
        # One cap for the gateway, kept across reloads: calls in flight under the
        # old proxy still count.
        self.admission.set_limit(config.limits.max_calls_in_flight)
        return Proxy(
            self.router,
            clusters.values(),
            self.telemetry,
            identity=identity if identity is not None and identity.forward else None,
            admission=self.admission,
            header_timeout=config.limits.request_header_timeout,
            meter=self.meter,
        )

    async def _serve(self, config: Config, listener: str, address: str) -> tuple[aio.Server, str]:
        """A started server on one listener (``address``: its port 0 resolved, if known).

        One server per listener, so that a reload that adds or removes one
        never touches the others: stopping a grpc server fails the calls it
        has received but not yet handed to lbgw, so a server whose port
        stays is never stopped. Bound with ``SO_REUSEPORT`` (workers share
        the port; a reload of new limits starts the next server on the same
        port before this one stops); a single gateway first probes the port
        without it (``_probe``), so that it still refuses a port another
        process listens on.
        """
        identity = client_identity(config)
        interceptors = [IdentityInterceptor(identity)] if identity and identity.allowed else []
        server = aio.server(
            options=server_options(config, reuse_port=True), interceptors=interceptors
        )
        # lbgw's own health service comes first, so its calls are never forwarded.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        assert self._switch is not None
        server.add_generic_rpc_handlers((self._switch,))
        try:
            ours = self._server is not None and address in self._server.addresses
            if not self._reuse_port and not ours:
                _probe(address)
            server_tls = self.listener_tls.get(listener)
            try:
                if server_tls is None:
                    port = server.add_insecure_port(address)
                else:  # one credentials object per port: see lbgw.tls
                    port = server.add_secure_port(address, server_tls.credentials())
            except RuntimeError as exc:  # grpcio raises when it cannot bind
                raise StartError(f"cannot listen on {listener}: {exc}") from exc
            await server.start()
        except BaseException:
            await server.stop(0)
            raise
        host, _ = parse_address(address)
        return server, f"{host}:{port}"

    async def reload(self, config: Config) -> Plan:
        """Apply a new, validated config as a diff (``reload.plan``); nothing in flight is cut.

        New clusters (added, or rebuilt for a change) are built first, and
        a new server bound if the listeners changed: if either fails
        (``StartError``, say), nothing has changed and the error is raised.
        Then the proxy is swapped, and what was replaced drains in the
        background: an old server stops accepting and gives its calls the
        grace period; an old cluster closes once its last call has ended
        (or after the grace period). One reload at a time.
        """
        async with self._reloading:
            try:
                return await self._reload(config)
            except BaseException:
                self.reload_failures += 1
                raise

    async def _reload(self, config: Config) -> Plan:
        if self._switch is None or self._server is None:
            raise RuntimeError("the gateway is not serving")
        change = plan(self.config, config)
        old_config, self.config = self.config, config  # new clusters take the new limits
        built: dict[str, tuple[Cluster, DnsDiscovery | None]] = {}
        old_listener_tls = self.listener_tls
        certificates = self.tls.in_use()
        started: dict[str, tuple[aio.Server, str]] = {}
        try:
            self.listener_tls = self._listener_tls(config)
            for cc in (*change.added, *change.rebuilt):
                wait = max([_DNS_WAIT, *(2 * d.refresh_interval for d in cc.dns)])
                built[cc.name] = await self._build(cc, wait=wait)
                await built[cc.name][0].learn_kinds()
            servers = self._server
            # New server options, or new client-identity rules: every server anew.
            everything = old_config.limits != config.limits or identity_settings(
                old_config
            ) != identity_settings(config)
            was = {lc.address: lc for lc in old_config.listeners}
            for lc in config.listeners:
                # A listener whose TLS settings changed is served anew; a changed
                # certificate under the same file names is reloaded by ServerTls.
                if everything or lc.address not in servers.by_listener or was.get(lc.address) != lc:
                    address = servers.resolved(lc.address)
                    started[lc.address] = await self._serve(config, lc.address, address)
            if self._server is None:  # stop() began during the awaits: apply nothing
                raise RuntimeError("the gateway stopped during the reload")
        except BaseException:
            self.config = old_config
            self.listener_tls = old_listener_tls
            self.tls.restore(certificates)
            for cluster, discovery in built.values():
                if discovery is not None:
                    await discovery.stop()
                await cluster.close()
            for server, _ in started.values():
                await server.stop(0)
            raise
        self._install(config, change, built, grace=old_config.grace_period)
        self._hand_over(config, started, old_config.grace_period)
        # The replaced servers begin their shutdown, and so stop listening, before the
        # reload returns: a connection made after it reaches the new server (which
        # matters when the listener's protocol changed, plaintext to TLS or back).
        await asyncio.sleep(0)
        self._watch_tls()
        self.tls.keep(
            {("listener", lc.address) for lc in config.listeners if lc.tls is not None}
            | {("cluster", cc.name) for cc in config.clusters if cc.tls is not None}
        )
        self.reloads += 1
        return change

    def _install(
        self,
        config: Config,
        change: Plan,
        built: dict[str, tuple[Cluster, DnsDiscovery | None]],
        *,
        grace: float,
    ) -> None:
        """Put the new config in place, with no await: no call sees half of it."""
        assert self._switch is not None and self._server is not None
        retired = [(name, self.clusters.pop(name)) for name in change.removed]
        retired += [(cc.name, self.clusters[cc.name]) for cc in change.rebuilt]
        for name, _ in retired:
            old_discovery = self.discoveries.pop(name, None)
            if old_discovery is not None:
                self._retire(old_discovery.stop())
        for cc in change.updated:
            cluster = self.clusters[cc.name]
            cluster.update(cc.endpoints)
            cluster.config = cc
        for name, (cluster, discovery) in built.items():
            self.clusters[name] = cluster
            if discovery is not None:
                self.discoveries[name] = discovery
            self.health.track(cluster.health)
        for name in change.removed:
            self.health.forget(name)
        old_proxy = self.proxy
        self.proxy = self._proxy(config, self.clusters)
        self._switch.proxy = self.proxy
        if old_proxy is not None:
            old_proxy.detach()
        for name, cluster in retired:
            self._retire(self._drain_cluster(name, cluster, grace))

    def _hand_over(
        self, config: Config, started: dict[str, tuple[aio.Server, str]], grace: float
    ) -> None:
        """The new listeners' servers serve; those of removed listeners stop and drain."""
        servers = self._server
        assert servers is not None
        wanted = {lc.address for lc in config.listeners}
        for listener, (server, address) in started.items():
            old = servers.add(listener, server, address)
            if old is None:
                log.info("listening", extra=fields(address=address))
            else:
                self._retire(old.stop(grace))
        for listener in list(servers.by_listener):
            if listener not in wanted:
                gone, address = servers.remove(listener)
                log.info("stopped listening", extra=fields(address=address))
                self._retire(gone.stop(grace))
        self.addresses = servers.addresses

    def _retire(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_cluster(self, name: str, cluster: Cluster, grace: float) -> None:
        """Close a replaced cluster once its calls have ended, or after ``grace``.

        A call whose handler the old proxy gave just before the swap may not
        have started yet (grpc.aio runs each handler in a task of its own),
        so the cluster counts as idle only when it has had no call in flight
        for ``_IDLE_CHECKS`` looks in a row, ``_IDLE_EVERY`` apart.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        idle = 0
        while idle < _IDLE_CHECKS and loop.time() < deadline:
            await asyncio.sleep(_IDLE_EVERY)
            idle = idle + 1 if cluster.budget.active == 0 else 0
        await cluster.close()
        log.info("cluster retired", extra=fields(cluster=name, cut=cluster.budget.active))

    @property
    def serving(self) -> bool:
        """Whether the listeners are up (and no stop has begun)."""
        return self._listening and self._server is not None

    async def wait(self) -> None:
        """Until the gateway stops serving."""
        if self._server is not None:
            await self._server.stopped.wait()

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

    async def _close(self, server: _Servers | None, grace: float | None) -> None:
        admin, self.admin = self.admin, None
        try:
            if admin is not None:
                await admin.stop()
            if self._tls_watch is not None:
                self._tls_watch.cancel()
                self._tls_watch = None
            if server is not None:
                self.health.end_watches()
                await server.stop(grace)
            for discovery in list(self.discoveries.values()):
                await discovery.stop()
            # What earlier reloads replaced: old servers and clusters still draining.
            retiring = list(self._retiring)
            if retiring:
                _, pending = await asyncio.wait(retiring, timeout=grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*retiring, return_exceptions=True)
            clusters = list(self.clusters.values())
            for cluster in clusters:
                await cluster.close()
            # Flushes the spans still queued; it blocks, so off the event loop.
            await asyncio.to_thread(self.telemetry.shutdown)
        finally:
            admin_server, self.admin_server = self.admin_server, None
            if admin_server is not None:  # last: /ready says 503 for the whole drain
                await admin_server.stop()


def _probe(address: str) -> None:
    """Refuse a port that another socket holds, as a bind without ``SO_REUSEPORT`` would.

    lbgw's own server binds with ``SO_REUSEPORT`` so that a reload can hand
    the port over; this plain bind first (``SO_REUSEADDR`` only, so that
    connections in ``TIME_WAIT`` do not count) fails if any other socket
    listens there, with or without ``SO_REUSEPORT``. Port 0 needs no probe.
    """
    host, port = parse_address(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartError(f"cannot listen on {address}: {exc}") from exc
    for family, kind, proto, _, sockaddr in infos[:1]:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartError(f"cannot listen on {address}: {exc.strerror}") from exc


class _Servers:
    """The gateway's grpc servers, one per listener, by the listener's configured address."""

    def __init__(self) -> None:
        self.by_listener: dict[str, tuple[aio.Server, str]] = {}
        self.stopped = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Servers {', '.join(self.addresses) or '-'}>"

    @property
    def addresses(self) -> list[str]:
        """The addresses served, with port 0 resolved, in the listeners' order."""
        return [address for _, address in self.by_listener.values()]

    def resolved(self, listener: str) -> str:
        """The address a listener is served on now (its port 0 resolved), or as configured."""
        found = self.by_listener.get(listener)
        return listener if found is None else found[1]

    def add(self, listener: str, server: aio.Server, address: str) -> aio.Server | None:
        """Serve ``listener`` with ``server`` from now on; the server it replaces, if any."""
        old = self.by_listener.get(listener)
        self.by_listener[listener] = (server, address)
        return None if old is None else old[0]

    def remove(self, listener: str) -> tuple[aio.Server, str]:
        return self.by_listener.pop(listener)

    async def stop(self, grace: float | None) -> None:
        servers = [server for server, _ in self.by_listener.values()]
        try:
            await asyncio.gather(*(server.stop(grace) for server in servers))
        finally:
            self.stopped.set()
