"""Hot reload: what a new config changes, decided without I/O, and the proxy switch.

``plan(old, new)`` compares two validated configs and says what a reload
must do, part by part; ``Gateway.reload`` does it (``server.py``):

* a cluster whose config is the same stays as it is;
* a cluster whose only change is its list of endpoints is updated in place
  (``Cluster.update``): endpoints that stay keep their channel, health,
  latency estimate and calls in flight;
* any other change to a cluster (weights and endpoints together are
  "endpoints"; strategy, params, health checks, outlier detection, slow
  start, retries, sticky or DNS settings, channel options, method kinds)
  builds a new cluster that takes the new calls, while the old one finishes
  the calls it has and then closes: a call that started under the old
  config ends under it;
* new routes give a new router and proxy, swapped in at once (``Switch``);
* new listeners, or new limits (server options), restart the server in
  place: the new one binds the ports with ``SO_REUSEPORT`` and serves before
  the old one stops accepting and drains, as NGINX does on reload;
* ``workers`` is the supervisor's (``supervisor.py``), the log level the CLI's.

What a reload does not change is said, not silently ignored: ``tracing``
(the tracer provider lives for the process), ``admin`` (the admin port is
bound once, at start), and ``grace_period`` and ``drain_delay`` apply from
the next drain on. TLS files (issue 14) belong
to the listeners and the clusters: a changed file name is a changed config;
reloading a changed certificate under the same name is the TLS module's.

``config_hash`` names a config in the logs, so that every worker of a
``--workers`` gateway can be seen running the same one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from lbgw.config import ClusterConfig, Config, LogConfig
from lbgw.exceptions import ConfigError, LbgwError
from lbgw.logs import fields

if TYPE_CHECKING:
    from lbgw.proxy import Proxy
    from lbgw.server import Gateway

__all__ = ["Plan", "Reloader", "Switch", "config_hash", "plan"]

log = logging.getLogger("lbgw.reload")

#: Reads and validates the config again: (config, its hash); raises ConfigError.
Loader = Callable[[], tuple[Config, str]]


def config_hash(data: bytes | Config) -> str:
    """A short name for a config: sha256 of the file's bytes (or of the config's repr)."""
    raw = data if isinstance(data, bytes) else repr(data).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload changes; each tuple names clusters."""

    added: tuple[ClusterConfig, ...] = ()
    removed: tuple[str, ...] = ()
    #: Only the endpoints (or their weights) changed: ``Cluster.update`` in place.
    updated: tuple[ClusterConfig, ...] = ()
    #: Anything else changed: a new cluster, the old one drains.
    rebuilt: tuple[ClusterConfig, ...] = ()
    routes: bool = False
    #: The listeners or the server options (limits) changed: a new server.
    listeners: bool = False
    log: bool = False
    workers: bool = False
    #: Changes that apply only from a restart (or the next drain), named for the log.
    later: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.updated
            or self.rebuilt
            or self.routes
            or self.listeners
            or self.log
            or self.workers
        )

    def summary(self) -> dict[str, Any]:
        """The plan as log fields."""
        return {
            "added": [c.name for c in self.added],
            "removed": list(self.removed),
            "updated": [c.name for c in self.updated],
            "rebuilt": [c.name for c in self.rebuilt],
            "routes": self.routes,
            "listeners": self.listeners,
            "log": self.log,
            "workers": self.workers,
            "later": list(self.later),
        }


def _only_endpoints(old: ClusterConfig, new: ClusterConfig) -> bool:
    if old.dns or new.dns:
        return False
    return dataclasses.replace(old, endpoints=()) == dataclasses.replace(new, endpoints=())


def plan(old: Config, new: Config) -> Plan:
    """What turning ``old`` into ``new`` takes (see the module docstring)."""
    before = {c.name: c for c in old.clusters}
    after = {c.name: c for c in new.clusters}
    limits = old.limits != new.limits  # channel options too: every cluster is rebuilt
    added = tuple(c for name, c in after.items() if name not in before)
    removed = tuple(name for name in before if name not in after)
    updated: list[ClusterConfig] = []
    rebuilt: list[ClusterConfig] = []
    for name, c in after.items():
        was = before.get(name)
        if was is None or (was == c and not limits):
            continue
        if not limits and _only_endpoints(was, c):
            updated.append(c)
        else:
            rebuilt.append(c)
    later = tuple(
        name
        for name in ("tracing", "grace_period", "drain_delay", "admin")
        if getattr(old, name) != getattr(new, name)
    )
    return Plan(
        added=added,
        removed=removed,
        updated=tuple(updated),
        rebuilt=tuple(rebuilt),
        routes=old.routes != new.routes,
        listeners=old.listeners != new.listeners or limits,
        log=old.log != new.log,
        workers=old.workers != new.workers,
        later=later,
    )


class Switch(grpc.GenericRpcHandler):
    """The server's one generic handler: the current proxy, swapped whole by a reload.

    A call is routed by the proxy current when it starts, and keeps the
    handler (route, cluster, endpoint) it got for good.
    """

    __slots__ = ("proxy",)

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def __repr__(self) -> str:
        return f"<Switch {self.proxy!r}>"

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.proxy.service(handler_call_details)


class Reloader:
    """The one way in for a reload: SIGHUP (``cli.py``) and, later, an admin ``POST /reload``.

    ``await reloader.reload()`` re-reads and validates the whole config
    (``load``); an invalid one is logged (file, key, expectation) and the
    running config stays; a valid one is applied as a diff
    (``Gateway.reload``), and the log level through ``on_log``. It returns
    what happened, for the caller to show: ``{"ok": ..., "config": hash,
    "error": ..., "plan": ...}``. Never raises for a bad config or a failed
    apply: lbgw keeps serving. One reload at a time; a reload asked for
    while one runs waits for it.
    """

    def __init__(
        self,
        gateway: Gateway,
        load: Loader,
        *,
        config_id: str,
        on_log: Callable[[LogConfig], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self._load = load
        self._on_log = on_log
        self.config_id = config_id  # the hash of the config running now
        self.reloads = 0
        self.failures = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Reloader config={self.config_id} reloads={self.reloads} failures={self.failures}>"

    async def reload(self) -> dict[str, Any]:
        async with self._lock:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        try:
            config, config_id = self._load()
        except ConfigError as exc:
            self.failures += 1
            log.error(
                "reload refused: config invalid, still running the old one",
                extra=fields(source=exc.source, key=exc.key, error=str(exc), config=self.config_id),
            )
            return {"ok": False, "config": self.config_id, "error": str(exc)}
        try:
            change = await self.gateway.reload(config)
        except Exception as exc:  # a port taken, a name that does not resolve: keep serving
            self.failures += 1
            log.error(
                "reload failed, still running the old config",
                extra=fields(error=str(exc), config=self.config_id, refused=config_id),
                exc_info=not isinstance(exc, LbgwError | OSError),
            )
            return {"ok": False, "config": self.config_id, "error": str(exc)}
        if change.log and self._on_log is not None:
            self._on_log(config.log)
        self.config_id = config_id
        self.reloads += 1
        summary = change.summary()
        log.info("reloaded", extra=fields(config=config_id, **summary))
        return {"ok": True, "config": config_id, "error": None, "plan": summary}
