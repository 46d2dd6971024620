"""DNS discovery: a cluster's endpoints are what a DNS name resolves to, kept in step.

As Envoy's ``STRICT_DNS`` cluster: every ``refresh_interval`` seconds (5 by
default, Envoy's ``dns_refresh_rate``) the name is resolved again, and every
A and AAAA record is an endpoint of weight 1. With ``type = "srv"`` the SRV
records give the targets, ports and weights (RFC 2782; only the records of
the lowest priority are used, as a client must try those first; a weight 0
counts as 1, since lbgw's weights start at 1). A change reaches the cluster
through ``Cluster.update``: a new endpoint gets its channel, health check
and method kinds, a removed one drains.

What DNS does wrong does not reach the cluster:

* a failed resolution, or an empty answer, keeps the last good set; it is
  logged and counted (``failures``, ``empty``), and the next attempt backs
  off: ``refresh_interval`` x 2 per consecutive failure, at most 10x (as
  Envoy's ``dns_failure_refresh_rate`` does by default), plus up to 10%
  jitter;
* an answer the kernels cannot take (more endpoints than a Maglev table)
  keeps the last good set too, and is counted as refused.

As gRPC's own DNS resolver does, a connection failure re-resolves early: an
endpoint whose channel fails (``TRANSIENT_FAILURE``) when the cluster's
rotation changes pokes the loop, at most once per ``refresh_interval / 5``.
With ``respect_ttl``, the next refresh comes when the answer's shortest TTL
runs out, but not sooner than ``refresh_interval / 5`` nor later than
``refresh_interval``.

The resolver is dnspython's asyncio resolver (``dns.asyncresolver``): pure
Python, typed, reads ``/etc/resolv.conf`` when no nameservers are given,
and takes a port per nameserver. aiodns (c-ares) was the alternative; for
one query every few seconds per cluster, its lower CPU per query does not
matter (``bench/resolvers.py`` measures both), and dnspython needs no C library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import grpc

from lbgw.config import DnsConfig, EndpointConfig, parse_address
from lbgw.kernels import MAX_WEIGHT
from lbgw.logs import fields

if TYPE_CHECKING:
    from lbgw.cluster import Cluster
    from lbgw.endpoints import ClusterHealth

__all__ = ["DnsDiscovery", "Resolution", "ResolveError", "resolve", "resolve_all"]

log = logging.getLogger("lbgw.discovery")

#: A failed resolution's retry waits at most this many refresh intervals (Envoy: 10x).
MAX_BACKOFF_FACTOR: Final = 10
#: Early re-resolutions and TTL-driven refreshes: at most one per refresh_interval / this.
EARLY_DIVISOR: Final = 5
#: One resolution may take at most this long (all nameservers, retries included).
MAX_LIFETIME: Final = 5.0


class ResolveError(Exception):
    """A resolution that gave nothing usable: why, in words for the log.

    ``empty``: the name answered, with no records (or does not exist).
    """

    def __init__(self, message: str, *, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


@dataclass(frozen=True, slots=True)
class Resolution:
    """One good answer: the endpoints (sorted by address) and its shortest TTL."""

    endpoints: tuple[EndpointConfig, ...]
    ttl: float


def _resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    if not config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=True)  # /etc/resolv.conf
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for text in config.nameservers:
            host, port = parse_address(text)
            servers.append(dns.nameserver.Do53Nameserver(host.strip("[]"), port))
        resolver.nameservers = servers
    resolver.lifetime = min(MAX_LIFETIME, config.refresh_interval)
    resolver.timeout = resolver.lifetime / 2  # per nameserver try: a second try fits
    resolver.cache = None  # lbgw decides when to ask again
    return resolver


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def _addresses(
    resolver: dns.asyncresolver.Resolver, name: str
) -> tuple[list[str], float | None]:
    """A and AAAA records of ``name`` (either may be missing) and their shortest TTL."""
    found: list[str] = []
    ttls: list[float] = []
    errors: list[str] = []
    answers = await asyncio.gather(
        *(
            resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ),
        return_exceptions=True,
    )
    for answer in answers:
        if isinstance(answer, dns.resolver.NXDOMAIN):
            errors.append(f"{name}: no such name")
        elif isinstance(answer, BaseException):
            if not isinstance(answer, dns.exception.DNSException):
                raise answer
            errors.append(f"{name}: {answer.__class__.__name__}: {answer}")
        elif answer.rrset is not None:
            ttls.append(answer.rrset.ttl)
            found.extend(_host(rr.to_text()) for rr in answer.rrset)
    if not found and errors:
        nxdomain = all(e.endswith("no such name") for e in errors)
        raise ResolveError("; ".join(dict.fromkeys(errors)), empty=nxdomain)
    return found, min(ttls) if ttls else None


async def resolve(resolver: dns.asyncresolver.Resolver, config: DnsConfig) -> Resolution:
    """Resolve ``config.name`` once; raises ``ResolveError`` for a failure or an empty answer."""
    try:
        if config.type == "a":
            found, ttl = await _addresses(resolver, config.name)
            weighted = {f"{host}:{config.port}": 1 for host in found}
        else:
            weighted, ttl = await _srv(resolver, config.name)
    except dns.resolver.NXDOMAIN:
        raise ResolveError(f"{config.name}: no such name", empty=True) from None
    except dns.exception.DNSException as exc:
        raise ResolveError(f"{exc.__class__.__name__}: {exc}") from None
    if not weighted:
        raise ResolveError(f"{config.name}: no {config.type.upper()} records", empty=True)
    endpoints = tuple(EndpointConfig(a, w) for a, w in sorted(weighted.items()))
    return Resolution(endpoints, float(ttl if ttl is not None else 0))


async def _srv(
    resolver: dns.asyncresolver.Resolver, name: str
) -> tuple[dict[str, int], float | None]:
    answer = await resolver.resolve(name, dns.rdatatype.SRV, search=False)
    assert answer.rrset is not None  # raise_on_no_answer: an empty answer raised
    records = list(answer.rrset)
    if not records:
        return {}, None
    best = min(rr.priority for rr in records)  # RFC 2782: the lowest priority first
    chosen = [rr for rr in records if rr.priority == best]
    targets = {rr.target.to_text() for rr in chosen}
    looked_up = await asyncio.gather(*(_addresses(resolver, t) for t in targets))
    hosts = dict(zip(targets, looked_up, strict=True))
    ttls = [answer.rrset.ttl, *(ttl for _, ttl in looked_up if ttl is not None)]
    weighted: dict[str, int] = {}
    for rr in chosen:
        for host in hosts[rr.target.to_text()][0]:
            address = f"{host}:{rr.port}"
            weight = min(MAX_WEIGHT, max(1, rr.weight))
            weighted[address] = weighted.get(address, 0) + weight
    return weighted, min(ttls)


async def resolve_all(
    sources: Sequence[tuple[dns.asyncresolver.Resolver, DnsConfig]],
) -> Resolution:
    """Resolve every name of a cluster; the endpoints merged, the shortest TTL.

    All or nothing: if one name fails, the whole answer does (the last good
    set is kept), so that a name's outage never shrinks the cluster to the
    others. An address given by two names keeps the larger weight.
    """
    answers = await asyncio.gather(*(resolve(r, c) for r, c in sources))
    if len(answers) == 1:
        return answers[0]
    merged: dict[str, int] = {}
    for answer in answers:
        for e in answer.endpoints:
            merged[e.address] = max(e.weight, merged.get(e.address, 0))
    endpoints = tuple(EndpointConfig(a, w) for a, w in sorted(merged.items()))
    return Resolution(endpoints, min(a.ttl for a in answers))


class DnsDiscovery:
    """Keeps one cluster's endpoints in step with DNS names (see the module docstring).

    Several names (``[[clusters.NAME.dns]]``, or ``--backend-dns`` given
    more than once) are resolved together and their endpoints merged; the
    shortest ``refresh_interval`` of them is the cluster's, and
    ``respect_ttl`` holds if every name asks for it.

    ``first()`` resolves until a good answer comes (the cluster needs one to
    start, as Envoy warms a cluster before serving); ``start(cluster)`` runs
    the refresh loop; ``stop()`` ends it. The counts are plain attributes
    for the operator's view: ``resolutions`` (good answers), ``failures``,
    ``empty`` (empty answers, also counted in ``failures``), ``refused``
    (answers the kernels could not take), ``changes`` (updates applied),
    ``early`` (early re-resolutions after a connection failure).
    """

    def __init__(
        self,
        cluster: str,
        configs: Sequence[DnsConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster_name = cluster
        self.configs = tuple(configs)
        self.names = [c.name for c in self.configs]
        self.refresh_interval = min(c.refresh_interval for c in self.configs)
        self.respect_ttl = all(c.respect_ttl for c in self.configs)
        self._sources = [(_resolver(c), c) for c in self.configs]
        self._clock = clock
        self.endpoints: tuple[EndpointConfig, ...] = ()
        self.resolutions = 0
        self.failures = 0
        self.empty = 0
        self.refused = 0
        self.changes = 0
        self.early = 0
        self.last_error: str | None = None
        self._consecutive = 0
        self._last_attempt = -float("inf")
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._cluster: Cluster | None = None

    def __repr__(self) -> str:
        state = "running" if self._task is not None and not self._task.done() else "idle"
        return (
            f"<DnsDiscovery {self.cluster_name} {','.join(self.names)} "
            f"{state} endpoints={len(self.endpoints)} resolutions={self.resolutions} "
            f"failures={self.failures} changes={self.changes}>"
        )

    @property
    def min_interval(self) -> float:
        """The shortest time between two resolutions outside the refresh schedule."""
        return self.refresh_interval / EARLY_DIVISOR

    async def resolve_once(self) -> Resolution | None:
        """One attempt: the answer, or None (logged and counted) for a failure or empty one."""
        self._last_attempt = self._clock()
        try:
            found = await resolve_all(self._sources)
        except ResolveError as exc:
            self.failures += 1
            self.empty += exc.empty
            self._consecutive += 1
            self.last_error = str(exc)
            log.warning(
                "dns resolution failed",
                extra=fields(
                    cluster=self.cluster_name,
                    names=self.names,
                    error=str(exc),
                    kept=[e.address for e in self.endpoints],
                    retry_in=round(self._delay(None), 3),
                ),
            )
            return None
        self.resolutions += 1
        self._consecutive = 0
        self.last_error = None
        return found

    async def first(self) -> tuple[EndpointConfig, ...]:
        """Resolve until an answer has endpoints; backs off between attempts."""
        while True:
            found = await self.resolve_once()
            if found is not None:
                self.endpoints = found.endpoints
                log.info(
                    "dns resolved",
                    extra=fields(
                        cluster=self.cluster_name,
                        names=self.names,
                        endpoints=[f"{e.address}={e.weight}" for e in found.endpoints],
                    ),
                )
                return found.endpoints
            await asyncio.sleep(self._delay(None))

    def start(self, cluster: Cluster) -> None:
        """Follow the name from now on, applying changes to ``cluster``."""
        self._cluster = cluster
        if not self.endpoints:
            self.endpoints = tuple(EndpointConfig(e.address, e.weight) for e in cluster.endpoints)
        cluster.health.on_change(self._rotation_changed)
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poke(self) -> bool:
        """Re-resolve early (a connection failed); at most once per ``min_interval``."""
        if self._task is None or self._poke.is_set():
            return False
        self._poke.set()
        self.early += 1
        return True

    def _rotation_changed(self, health: ClusterHealth) -> None:
        if self._task is None:
            return
        failing = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        for e in health.endpoints:
            backend = e.backend
            if backend is not None and backend.channel.get_state(False) is failing:
                self.poke()
                return

    def _delay(self, found: Resolution | None) -> float:
        interval = self.refresh_interval
        if self._consecutive:
            factor = min(MAX_BACKOFF_FACTOR, 1 << min(self._consecutive - 1, 8))
            jitter: float = 1 + 0.1 * random.random()
            return interval * factor * jitter
        if found is not None and self.respect_ttl:
            return min(interval, max(self.min_interval, found.ttl))
        return interval

    async def _run(self) -> None:
        delay = self.refresh_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), delay)
            if self._poke.is_set():  # early: not sooner than min_interval after the last
                wait = self._last_attempt + self.min_interval - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._poke.clear()
            found = await self.resolve_once()
            if found is not None:
                self._apply(found.endpoints)
            delay = self._delay(found)

    def _apply(self, endpoints: Sequence[EndpointConfig]) -> None:
        cluster = self._cluster
        assert cluster is not None
        current = {(e.address, e.weight) for e in cluster.endpoints}
        if current == {(e.address, e.weight) for e in endpoints}:
            self.endpoints = tuple(endpoints)
            return
        try:
            cluster.update(endpoints)
        except (ValueError, RuntimeError) as exc:
            self.refused += 1
            log.warning(
                "dns answer refused",
                extra=fields(
                    cluster=self.cluster_name,
                    error=str(exc),
                    kept=[e.address for e in self.endpoints],
                ),
            )
            return
        self.endpoints = tuple(endpoints)
        self.changes += 1
