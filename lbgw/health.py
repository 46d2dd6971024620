"""Active health checks of the endpoints, and lbgw's own ``grpc.health.v1`` service.

``HealthChecker`` runs one task per endpoint, off the request path; a call
never waits for a check. Each result goes to ``endpoints.ClusterHealth``,
which applies thresholds and states. Modes, per cluster
(``[clusters.NAME.health_check]``):

* ``grpc``: the standard health protocol, ``grpc.health.v1.Health``, over the
  endpoint's own channel (the connection calls use, as gRPC's client-side
  health checking does). ``rpc = "check"`` polls ``Check`` every
  ``interval`` with a ``timeout``. ``rpc = "watch"`` (the default) also keeps
  a ``Watch`` stream open, so a change of status takes the endpoint out at
  once; its ``Check`` probes are how a frozen backend, whose ``Watch`` just
  goes quiet, is found. A failing endpoint still in rotation is probed
  again ``timeout`` after the last probe started, not ``interval`` after it
  ended, so a frozen backend is out within 10 s with the defaults.
  A backend without the health service answers ``UNIMPLEMENTED``: like
  gRPC's client-side checking, lbgw counts it as healthy and says so once in
  the log (``unimplemented = "unhealthy"`` counts it as a failed check).
  A ``Watch`` that is unimplemented is not asked again.
* ``tcp``: connect and close, for backends without the health service.
* ``none``: every endpoint is SERVING; passive ejection still applies.

With ``[tracing] health_checks = true``, each ``Check`` probe is a root
CLIENT span; ``Watch`` streams are long-lived and are not traced. Every
change of an endpoint's state is a log line either way (``endpoints.py``).

``HealthService`` is the health service that lbgw itself serves on its
listeners: ``""`` is SERVING while lbgw accepts calls and NOT_SERVING from the
moment a drain starts; each cluster's name is SERVING while the cluster has
an endpoint in rotation. Both ``Check`` and ``Watch`` are served; calls to
``grpc.health.v1.Health`` are answered by lbgw and never forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lbgw.config import HealthCheckConfig, parse_address
from lbgw.endpoints import ClusterHealth, Endpoint, State
from lbgw.logs import fields
from lbgw.telemetry import Telemetry, end_span

if TYPE_CHECKING:
    _Context: TypeAlias = aio.ServicerContext[Any, Any]

__all__ = ["SERVICE_NAME", "HealthChecker", "HealthService"]

log = logging.getLogger("lbgw.health")

SERVICE_NAME: Final = "grpc.health.v1.Health"
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN: Final = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_END: Final = -1  # in a Watch's queue: end the stream


class HealthChecker:
    """The active checks of one cluster: one task per endpoint, for as long as it is in."""

    def __init__(
        self,
        health: ClusterHealth,
        config: HealthCheckConfig,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.health = health
        self.telemetry = telemetry
        self.config = config
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._random = random.Random()
        self._told_unimplemented: set[Endpoint] = set()

    def __repr__(self) -> str:
        return f"<HealthChecker {self.health.name} {self.config.mode} tasks={len(self._tasks)}>"

    def start(self) -> None:
        """Check every endpoint of the cluster."""
        for e in self.health.endpoints:
            self.add(e)

    def add(self, e: Endpoint) -> None:
        """Check ``e`` from now on (it has joined the cluster)."""
        if self.config.mode == "none":
            self.health.healthy_without_checks([e])
            return
        if e not in self._tasks:
            self._tasks[e] = asyncio.create_task(self._run(e), name=f"health {e.address}")

    def remove(self, e: Endpoint) -> None:
        """Stop checking ``e`` (it has left the cluster)."""
        task = self._tasks.pop(e, None)
        if task is not None:
            task.cancel()
        self._told_unimplemented.discard(e)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pause(self, e: Endpoint, started: float) -> None:
        """Wait for the next probe of ``e``; a failing endpoint still in rotation is
        confirmed fast: its next probe starts ``timeout`` after the last one started
        (at once after a timed-out probe), so a frozen backend is out within
        ``interval x (1 + jitter) + unhealthy_threshold x timeout`` (8.5 s by default)."""
        if e.failed_checks and e.state is State.SERVING:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(max(0.0, started + self.config.timeout - loop.time()))
            return
        interval = self.config.interval
        await asyncio.sleep(interval * (1 + self._random.uniform(0, self.config.jitter)))

    async def _run(self, e: Endpoint) -> None:
        """Probe ``e`` until it leaves. In ``Watch`` mode a ``Watch`` stream follows
        its status beside the probes: a ``Watch`` is silent while nothing changes,
        so it cannot tell a frozen backend from a steady one, and its ``Check``
        probes (each with ``timeout``) can. They also make the backend write
        between keepalive PINGs (``keepalive.py``)."""
        loop = asyncio.get_running_loop()
        watcher = None
        if self.config.mode == "grpc" and self.config.rpc == "watch":
            watcher = asyncio.create_task(self._follow(e), name=f"health watch {e.address}")
        try:
            while True:
                started = loop.time()
                try:
                    if self.config.mode == "grpc":
                        await self._check(e)
                    else:
                        await self._tcp(e)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a check must never end its task
                    log.exception("health check failed unexpectedly")
                    self.health.check_failed(e, f"health check error: {exc!r}")
                await self._pause(e, started)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _follow(self, e: Endpoint) -> None:
        """Keep a ``Watch`` stream open on ``e``; end when ``Watch`` is unimplemented."""
        while True:
            try:
                if not await self._watch(e):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a watch must never end its task
                log.exception("health watch failed unexpectedly")
                self.health.check_failed(e, f"health watch error: {exc!r}")
            interval = self.config.interval
            await asyncio.sleep(interval * (1 + self._random.uniform(0, self.config.jitter)))

    def _unimplemented(self, e: Endpoint, rpc: str) -> None:
        address = e.address
        healthy = self.config.unimplemented == "healthy"
        if e not in self._told_unimplemented:
            self._told_unimplemented.add(e)
            log.warning(
                "no health service",
                extra=fields(
                    cluster=self.health.name,
                    endpoint=address,
                    rpc=rpc,
                    counted_as="healthy" if healthy else "unhealthy",
                ),
            )
        if healthy:
            self.health.check_passed(e, "no health service (UNIMPLEMENTED): counted as healthy")
        else:
            self.health.check_failed(e, "no health service (UNIMPLEMENTED)")

    def _status(self, e: Endpoint, status: int, *, watched: bool = False) -> None:
        if status == _SERVING:
            self.health.check_passed(e, "SERVING", explicit=watched)
        else:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            self.health.check_failed(e, name, explicit=True)

    def _request(self) -> health_pb2.HealthCheckRequest:
        return health_pb2.HealthCheckRequest(service=self.config.service)

    async def _check(self, e: Endpoint) -> None:
        address = e.address
        span = None
        if self.telemetry is not None and self.telemetry.health_checks:
            span = self.telemetry.health_check_span(address)
        stub = health_pb2_grpc.HealthStub(_channel(e))
        code = grpc.StatusCode.CANCELLED
        details: str | None = "health check stopped"
        try:
            response = await stub.Check(self._request(), timeout=self.config.timeout)
            code, details = grpc.StatusCode.OK, None
        except aio.AioRpcError as error:
            code, details = error.code(), error.details()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                self._unimplemented(e, "Check")
            elif code is grpc.StatusCode.NOT_FOUND:  # the server does not know the service
                self.health.check_failed(e, "SERVICE_UNKNOWN", explicit=True)
            else:
                self.health.check_failed(e, f"Check failed: {code.name} {details or ''}")
            return
        finally:
            if span is not None:
                end_span(span, code, details)
        self._status(e, response.status)

    async def _watch(self, e: Endpoint) -> bool:
        """Follow a Watch stream until it ends; False when Watch is unimplemented."""
        stub = health_pb2_grpc.HealthStub(_channel(e))
        call = stub.Watch(self._request())
        try:
            async for response in _responses(call):
                self._status(e, response.status, watched=True)
        except aio.AioRpcError as error:
            code = error.code()
            if code is grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "health Watch unimplemented, polling Check",
                    extra=fields(cluster=self.health.name, endpoint=e.address),
                )
                return False
            self.health.check_failed(e, f"Watch ended: {code.name} {error.details() or ''}")
        finally:
            call.cancel()
        return True

    async def _tcp(self, e: Endpoint) -> None:
        host, port = parse_address(e.address)
        host = host.removeprefix("[").removesuffix("]")  # an IPv6 address, unbracketed
        try:
            async with asyncio.timeout(self.config.timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            self.health.check_failed(e, f"TCP connect failed: {exc!r}")
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        self.health.check_passed(e, "TCP connect")


def _channel(e: Endpoint) -> aio.Channel:
    assert e.backend is not None, "a checked endpoint has a channel"
    return e.backend.channel


async def _responses(call: Any) -> AsyncIterator[health_pb2.HealthCheckResponse]:
    async for response in call:
        yield response


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # no stubs
    """lbgw's own health: ``""`` for the gateway, one service per cluster.

    ``set`` is synchronous, so the decider's listeners can call it; each
    ``Watch`` has its own queue and sees every change, in order.
    """

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": _SERVING}
        self._tracked: dict[str, ClusterHealth] = {}
        self._watchers: dict[str, set[asyncio.Queue[int]]] = {}
        self._draining = False
        #: ``""`` NOT_SERVING by hand (the admin port's ``/healthcheck/fail``), until ``ok``.
        self.failed = False

    def __repr__(self) -> str:
        states = {
            s or '""': health_pb2.HealthCheckResponse.ServingStatus.Name(v)
            for s, v in self._status.items()
        }
        return f"<HealthService {states}>"

    def set(self, service: str, serving: bool) -> None:
        """Set a service's status; after ``drain`` everything stays NOT_SERVING."""
        status = _SERVING if serving and not self._draining else _NOT_SERVING
        if service == "" and self.failed:
            status = _NOT_SERVING
        if self._status.get(service) == status:
            return
        self._status[service] = status
        for queue in self._watchers.get(service, ()):
            queue.put_nowait(status)

    def fail(self, failed: bool) -> None:
        """Turn ``""`` NOT_SERVING by hand (a manual drain), or back to SERVING (Envoy's
        ``/healthcheck/fail`` and ``/healthcheck/ok``); a shutdown's drain still wins."""
        self.failed = failed
        self.set("", True)

    @property
    def serving(self) -> bool:
        """Whether ``""`` is SERVING: not draining, not failed by hand."""
        return bool(self._status.get("") == _SERVING)

    def drain(self) -> None:
        """NOT_SERVING for every service, for good: a drain or shutdown has started."""
        for service in list(self._status):
            self.set(service, False)
        self._draining = True

    def end_watches(self) -> None:
        """End every ``Watch`` stream (with OK), as the server is about to close."""
        for watchers in self._watchers.values():
            for queue in watchers:
                queue.put_nowait(_END)

    def track(self, health: ClusterHealth) -> None:
        """Keep ``health.name``'s status in step with its rotation.

        A cluster tracked again under the same name (rebuilt by a reload)
        replaces the one before: the old one's changes no longer count.
        """
        self._tracked[health.name] = health
        self.set(health.name, health.serving)
        health.on_change(self._changed)

    def _changed(self, health: ClusterHealth) -> None:
        if self._tracked.get(health.name) is health:
            self.set(health.name, health.serving)

    def forget(self, service: str) -> None:
        """A cluster removed by a reload: its service is unknown from now on."""
        self._tracked.pop(service, None)
        if service in self._status and service:
            del self._status[service]
            for queue in self._watchers.get(service, ()):
                queue.put_nowait(_SERVICE_UNKNOWN)

    async def Check(  # noqa: N802 - the method's name in the protocol
        self, request: health_pb2.HealthCheckRequest, context: _Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: _Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        queue: asyncio.Queue[int] = asyncio.Queue()
        watchers = self._watchers.setdefault(service, set())
        watchers.add(queue)
        try:
            last = self._status.get(service, _SERVICE_UNKNOWN)
            yield health_pb2.HealthCheckResponse(status=last)
            while True:
                status = await queue.get()
                if status == _END:
                    return
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
        finally:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[service]
