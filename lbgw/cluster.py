"""A cluster at run time: its endpoints, balancer, health, affinity, method kinds, retries.

``build_cluster`` makes a ``Cluster`` from a ``ClusterConfig``: one
``Endpoint`` per configured endpoint, each with its channel, a balancer over
them, their health (the decider and the active checks), session affinity
when the cluster has any, the method kinds (the config's, then the
descriptor sets', then server reflection's: ``KindLearner``) and the retry
budget. ``Gateway`` calls it once per cluster.

``Cluster.pick`` chooses the endpoint for a call and returns a ``Decision``;
``Cluster.decide`` is the same pick with its explanation (for traces). Both
run one piece of logic: a sticky token first, then the hash key, else the
strategy's kernel.

``Cluster.update`` replaces the endpoint set while calls flow, matching
endpoints by address. An endpoint that stays keeps its channel, health
state, latency estimate and calls in flight; a new one gets its channel, its
health check and, with reflection on, its method kinds are asked for
(whatever called ``update``: a test, DNS discovery, a reload); a
removed one leaves rotation at once, its calls in flight finish on it (and
their ``done`` reaches its own count), and its channel closes when the last
one ends, or after the grace period. The kernels are rebuilt for the new
set; hash tables move only the keys they must.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from lbgw.affinity import Affinity
from lbgw.backends import Backend, channel_options
from lbgw.balancer import Balancer
from lbgw.breakers import CircuitBreaker
from lbgw.config import (
    STICKY_SECRET_ENV,
    ClusterConfig,
    EndpointConfig,
    Limits,
    MethodKind,
    RetryConfig,
    RouteConfig,
)
from lbgw.decision import Decision
from lbgw.descriptors import DescriptorSetError, kinds_from_descriptor_sets
from lbgw.endpoints import ClusterHealth, Endpoint, Leaving
from lbgw.exceptions import NoEligibleEndpointError, StartError
from lbgw.health import HealthChecker
from lbgw.logs import fields
from lbgw.reflection import KindLearner
from lbgw.telemetry import Telemetry

if TYPE_CHECKING:
    from grpc import aio

    from lbgw.tls import ClientTls

    _Context: TypeAlias = aio.ServicerContext[Any, Any]

__all__ = ["KIND_SOURCES", "Cluster", "RetryBudget", "Target", "build_cluster"]

log = logging.getLogger("lbgw.cluster")

_Metadata: TypeAlias = Iterable[tuple[str, str | bytes]] | None
#: Where a cluster's method kinds come from, in precedence order.
KIND_SOURCES = ("config", "descriptor_sets", "reflection")


class RetryBudget:
    """Envoy's retry budget: retries in flight stay within a share of the calls in flight.

    A retry may start while the retries in flight are fewer than
    ``budget_percent`` of the cluster's calls in flight, or than
    ``min_retry_concurrency``, whichever is larger; so retries cannot
    multiply an outage. ``active`` and ``retrying`` are kept by the proxy.
    """

    __slots__ = ("active", "config", "over_budget", "retrying", "sent")

    def __init__(self, config: RetryConfig) -> None:
        self.config = config
        self.active = 0  # client calls in flight
        self.retrying = 0  # calls in flight that have been retried
        self.sent = 0  # retries sent, since start
        self.over_budget = 0  # retries refused by the budget, since start

    def __repr__(self) -> str:
        return (
            f"<RetryBudget active={self.active} retrying={self.retrying} "
            f"sent={self.sent} over_budget={self.over_budget}>"
        )

    def may_retry(self) -> bool:
        """Whether the budget has room for one more retry now (a refusal is counted)."""
        config = self.config
        allowed = max(config.min_retry_concurrency, self.active * config.budget_percent / 100)
        if self.retrying < allowed:
            return True
        self.over_budget += 1
        return False


class Cluster:
    """A cluster at run time: its endpoints and everything that picks among them."""

    __slots__ = (
        "_closed",
        "_closing",
        "_credentials",
        "_grace",
        "_kind_listeners",
        "_leaving",
        "_options",
        "affinity",
        "balancer",
        "breaker",
        "budget",
        "checker",
        "config",
        "health",
        "kind_sources",
        "kinds",
        "learner",
        "name",
        "retries",
        "strategy",
        "tls",
    )

    def __init__(  # noqa: PLR0913 - its parts, made by build_cluster (or offline_cluster)
        self,
        config: ClusterConfig,
        balancer: Balancer,
        health: ClusterHealth,
        checker: HealthChecker,
        *,
        affinity: Affinity | None = None,
        options: Sequence[tuple[str, Any]] = (),
        grace: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.strategy = config.strategy
        self.balancer = balancer
        self.health = health
        self.checker = checker
        self.affinity = affinity
        #: Method kinds: the config's, then the descriptor sets', then what
        #: reflection adds (``learn_kinds``, and later ``KindLearner``'s answers).
        self.kinds: dict[str, MethodKind] = {}
        #: How many of ``kinds`` came from each of ``KIND_SOURCES``.
        self.kind_sources: dict[str, int] = dict.fromkeys(KIND_SOURCES, 0)
        self._kind_listeners: list[Callable[[Cluster, list[str]], None]] = []
        self._add_kinds(dict(config.methods), "config")
        try:
            described = kinds_from_descriptor_sets(config.descriptor_sets)
        except DescriptorSetError as exc:  # read at load time; changed since
            raise StartError(f"cluster {config.name!r}: {exc}") from None
        self._add_kinds(described, "descriptor_sets")
        self.learner = KindLearner(self.name, self._reflected)
        self.retries = config.retries
        self.budget = RetryBudget(config.retries)
        self.breaker = CircuitBreaker(config.name, config.circuit_breakers)
        self._options = list(options)
        self._credentials = credentials  # TLS to the endpoints; None: plaintext
        #: The TLS files behind ``_credentials`` (the gateway watches them); None: plaintext.
        self.tls: ClientTls | None = None
        self._grace = grace
        self._leaving: set[Endpoint] = set()  # removed, with calls still in flight
        self._closing: set[asyncio.Task[None]] = set()  # channels of removed endpoints
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<Cluster {self.name} {self.balancer!r} methods={len(self.kinds)} "
            f"asking={len(self.learner.asking)} "
            f"active={self.budget.active} retrying={self.budget.retrying}>"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints in the cluster now, in the kernels' order."""
        return self.balancer.endpoints

    @property
    def retry_stats(self) -> dict[str, int]:
        """Counts since start: retries sent, and retries the budget refused."""
        return {"sent": self.budget.sent, "over_budget": self.budget.over_budget}

    # -- picking (sync, no I/O) ----------------------------------------------------------

    def pick(self, context: _Context, method: str, exclude: Endpoint | None = None) -> Decision:
        """The endpoint for a call (never ``exclude``, for a retry); counts it as started.

        The call path: unexplained, so the endpoint's own constant decision.
        Raises ``NoEligibleEndpointError`` when no endpoint is in rotation.
        """
        if self.affinity is None:
            return self.balancer.pick(exclude).decision
        return self.decide(context.invocation_metadata(), context.peer(), method, exclude)

    def decide(  # noqa: PLR0913 - the call's parts, then how to decide
        self,
        metadata: _Metadata,
        peer: str,
        method: str,
        exclude: Endpoint | None = None,
        *,
        explain: bool = False,
        dry_run: bool = False,
    ) -> Decision:
        """Pick by the call's sticky token, then its hash key, else by the strategy.

        With ``explain``, the decision also says what the pick compared and
        left out, how a key or token decided it and how long it took (for
        a sampled call's trace); this costs a few µs, so only then. Counts
        the endpoint as started. Raises ``NoEligibleEndpointError`` (with
        ``skipped`` when explaining). With ``dry_run`` (``/explain``, which
        implies ``explain``), nothing changes: the kernels peek, the endpoint
        is not counted, and the next real pick of the same call is this one.
        """
        pinned: Endpoint | None = None
        token_seen = False
        key: bytes | None = None
        affinity = self.affinity
        if affinity is not None:
            pinned, token_seen = affinity.token(metadata)
            if pinned is exclude:
                pinned = None
            if pinned is None:
                key = affinity.key(metadata, peer, method)
        if not (explain or dry_run):
            return self._choose(pinned, key, exclude).decision
        return self._explained(pinned, token_seen, key, exclude, dry_run=dry_run)

    def _choose(
        self, pinned: Endpoint | None, key: bytes | None, exclude: Endpoint | None
    ) -> Endpoint:
        """The token's endpoint, else the key's, else the strategy's; counted as started."""
        balancer = self.balancer
        if pinned is not None:
            balancer.started(pinned)
            return pinned
        if key is not None:
            return balancer.pick_key(key, exclude)
        return balancer.pick(exclude)

    def _peek(self, pinned: Endpoint | None, key: bytes | None) -> Endpoint:
        """What ``_choose`` would return now, changing nothing (``/explain``)."""
        if pinned is not None:
            return pinned
        balancer = self.balancer
        e = balancer.peek() if key is None else balancer.peek_key(key)
        if e is None:
            raise NoEligibleEndpointError(self.name)
        return e

    def _explained(
        self,
        pinned: Endpoint | None,
        token_seen: bool,
        key: bytes | None,
        exclude: Endpoint | None,
        *,
        dry_run: bool = False,
    ) -> Decision:
        """``_choose``, with what it compared and left out, and why, read just before."""
        balancer = self.balancer
        affinity = self.affinity
        fallback: str | None = None
        hash_key: str | None = None
        position: int | None = None
        if pinned is None and affinity is not None:
            if token_seen:
                fallback = "sticky endpoint out of rotation"
            if affinity.hash_on and key is None:
                reason = affinity.hash_key or affinity.hash_on
                fallback = f"no hash key ({reason}): {balancer.fallback}"
            elif key is not None:
                hash_key = key.decode("utf-8", "backslashreplace")
                position = balancer.position(key)
        # The key or the token decides, not the scores; else what the pick compares.
        keyed = pinned is not None or position is not None
        candidates = () if keyed else tuple(balancer.candidates(exclude=exclude))
        skipped = tuple(self.health.skipped(exclude))
        started = time.perf_counter_ns()
        try:
            e = self._peek(pinned, key) if dry_run else self._choose(pinned, key, exclude)
        except NoEligibleEndpointError as exc:
            exc.skipped = skipped
            raise
        took = time.perf_counter_ns() - started
        return Decision(
            e,
            self.strategy,
            hash_key=hash_key,
            ring_position=position,
            pinned=pinned is not None,
            fallback=fallback,
            candidates=candidates,
            skipped=skipped,
            pick_ns=took,
        )

    # -- a changing endpoint set ------------------------------------------------------------

    def update(self, endpoints: Sequence[EndpointConfig]) -> None:
        """Replace the endpoint set while calls flow: add, remove, reweight, by address.

        Raises ``ValueError`` (and changes nothing) for a set the kernels
        cannot take, and ``RuntimeError`` once the cluster is closed. A removed
        endpoint's calls in flight finish on it; any still running after the
        grace period end when its channel closes (``CANCELLED``).
        """
        if self._closed:
            raise RuntimeError(f"cluster {self.name!r} is closed")
        refused = self.balancer.refuses([(ec.address, ec.weight) for ec in endpoints])
        if refused is not None:  # checked before anything changes
            raise ValueError(f"cluster {self.name!r}: an update needs {refused}")
        current = {e.address: e for e in self.balancer.endpoints}
        chosen: list[tuple[Endpoint, int]] = []
        added: list[Endpoint] = []
        for ec in endpoints:
            e = current.pop(ec.address, None)
            if e is None:
                e = self._endpoint(ec.address, ec.weight)
                added.append(e)
            chosen.append((e, ec.weight))
        removed = list(current.values())
        reweighted = [e.address for e, w in chosen if e.weight != w]
        kernel = self.balancer.kernel
        for e in removed:  # out at once; the new set's rotation is pushed once, below
            e.leaving = Leaving(kernel.in_flight(e.index), functools.partial(self._release, e))
        self.health.leave(removed, "removed from the cluster")
        for e, weight in chosen:
            e.weight = weight
        self.balancer.rebuild([e for e, _ in chosen])
        if self.affinity is not None:
            self.affinity.rebuild()
        self.health.rebuilt()
        loop = asyncio.get_running_loop()
        self.learner.forget(removed)
        for e in removed:
            self.checker.remove(e)
            e.index = -1
            self._leaving.add(e)
            if e.leaving is not None and e.leaving.active == 0:
                self._release(e)
            else:
                loop.call_later(self._grace, self._release, e)
        for e in added:
            self.checker.add(e)
        if added and self.config.reflection:
            self.learner.ask(added)
        log.info(
            "cluster updated",
            extra=fields(
                cluster=self.name,
                added=[e.address for e in added],
                removed=[e.address for e in removed],
                reweighted=reweighted,
                endpoints=len(chosen),
            ),
        )

    def _endpoint(self, address: str, weight: int) -> Endpoint:
        return _connected(self.name, address, weight, self._options, self._credentials)

    def renew_channels(self, credentials: grpc.ChannelCredentials) -> None:
        """New TLS credentials (files changed): every endpoint gets a new channel.

        Calls start on the new channels at once; those in flight finish on
        the old ones, which close after the grace period. The health checks
        restart on the new channels. Endpoints leaving keep theirs.
        """
        if self._closed:
            return
        self._credentials = credentials
        for e in self.endpoints:
            old = e.backend
            backend = Backend(self.name, e.address, self._options, credentials)
            backend.connect()
            e.backend = backend
            e.calls.clear()
            self.checker.remove(e)
            self.checker.add(e)
            if old is not None:
                task = asyncio.ensure_future(old.close(self._grace))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        log.info("channels renewed", extra=fields(cluster=self.name, reason="TLS files changed"))

    def _release(self, e: Endpoint) -> None:
        """A removed endpoint's last call ended, or its grace period did: close its channel."""
        if e not in self._leaving:
            return
        self._leaving.discard(e)
        e.leaving = None
        if e.backend is not None:
            task = asyncio.ensure_future(e.backend.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- method kinds ------------------------------------------------------------------------

    async def learn_kinds(self, timeout: float | None = None) -> None:
        """Ask the endpoints for their method kinds, with ``reflection`` on (start-up).

        Every endpoint is asked at once, all within ``timeout`` (5 s); one
        that could not be asked is asked again in the background.
        """
        if self.config.reflection:
            await self.learner.ask_now(self.endpoints, timeout)

    def on_kinds(self, listener: Callable[[Cluster, list[str]], None]) -> None:
        """Call ``listener(cluster, methods)`` whenever methods' kinds become known."""
        self._kind_listeners.append(listener)

    def off_kinds(self, listener: Callable[[Cluster, list[str]], None]) -> None:
        """Stop calling ``listener`` (a proxy a reload replaced)."""
        with contextlib.suppress(ValueError):
            self._kind_listeners.remove(listener)

    def _add_kinds(self, found: dict[str, MethodKind], source: str) -> list[str]:
        """Add the kinds not known already (an earlier source wins); the methods added."""
        kinds = self.kinds
        added = [method for method in found if method not in kinds]
        for method in added:
            kinds[method] = found[method]
        self.kind_sources[source] += len(added)
        return added

    def _reflected(self, found: dict[str, MethodKind], address: str) -> None:
        """An endpoint's reflection answered: keep the new kinds, tell the listeners."""
        added = self._add_kinds(found, "reflection")
        log.info(
            "method kinds",
            extra=fields(
                cluster=self.name, endpoint=address, new=len(added), known=self.kind_sources
            ),
        )
        if added:
            for listener in self._kind_listeners:
                listener(self, added)

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the checks and close every channel, of removed endpoints too (once)."""
        if self._closed:
            return
        self._closed = True
        await self.checker.stop()
        self.health.drain()
        self._kind_listeners.clear()
        await self.learner.close()
        # Channels already closing finish closing: a close cut short may leak the core channel.
        await asyncio.gather(*self._closing, return_exceptions=True)
        backends = [e.backend for e in (*self.endpoints, *self._leaving) if e.backend is not None]
        self._leaving.clear()
        for backend in backends:
            await backend.close()


class Target:
    """What a route leads to: a cluster, and the codes retried on its calls.

    ``route`` names the route for traces: ``method /p.S/M``, ``service
    p.S``, ``package p`` or ``default``.
    """

    __slots__ = ("cluster", "retry_on", "route")

    def __init__(
        self, cluster: Cluster, retry_on: Iterable[grpc.StatusCode], route: str = "default"
    ) -> None:
        self.cluster = cluster
        self.retry_on = frozenset(retry_on)
        self.route = route

    def __repr__(self) -> str:
        codes = ",".join(sorted(c.name for c in self.retry_on)) or "-"
        return f"<Target {self.cluster.name} route={self.route!r} retry_on={codes}>"

    @classmethod
    def of(cls, route: RouteConfig, clusters: dict[str, Cluster]) -> Target:
        """The target of ``route``, among ``clusters``."""
        name = f"{route.match} {route.value}" if route.value else route.match
        return cls(clusters[route.cluster], route.retry_on, name)


def sticky_secret(cluster: ClusterConfig) -> bytes:
    """The secret that signs the cluster's sticky tokens; random if none was given."""
    if not cluster.sticky.enabled:
        return b""
    if cluster.sticky.secret:
        return cluster.sticky.secret.encode()
    log.warning(
        "sticky tokens without a secret",
        extra=fields(
            cluster=cluster.name,
            consequence="a random secret: only this process honours its tokens",
            fix=f"set clusters.{cluster.name}.sticky.secret or {STICKY_SECRET_ENV}",
        ),
    )
    return secrets.token_bytes(32)


def _connected(
    cluster: str,
    address: str,
    weight: int,
    options: Sequence[tuple[str, Any]],
    credentials: grpc.ChannelCredentials | None = None,
) -> Endpoint:
    """An endpoint with its channel, connecting from now on, not from its first call."""
    backend = Backend(cluster, address, options, credentials)
    backend.connect()
    return Endpoint(address, weight, backend)


def build_cluster(
    config: ClusterConfig,
    limits: Limits,
    *,
    telemetry: Telemetry | None = None,
    grace: float = 10.0,
    tls: ClientTls | None = None,
) -> Cluster:
    """The cluster ``config`` describes, its channels connecting and its checks started.

    Its method kinds are the config's and the descriptor sets' until
    ``learn_kinds`` has asked the endpoints (with ``reflection`` on). Call it
    from the event loop.
    """
    loop = asyncio.get_running_loop()
    options = channel_options(config, limits)
    credentials = None
    if tls is not None:  # TLS to the endpoints (issue 14): the name verified, the credentials
        options += tls.options
        credentials = tls.credentials
    endpoints = [
        _connected(config.name, e.address, e.weight, options, credentials) for e in config.endpoints
    ]
    balancer = Balancer(config, endpoints)
    health = ClusterHealth(config, balancer, clock=loop.time, call_later=loop.call_later)
    checker = HealthChecker(health, config.health_check, telemetry)
    affinity = None
    if balancer.hashing is not None or config.sticky.enabled:
        affinity = Affinity(config, balancer, sticky_secret(config))
    cluster = Cluster(
        config,
        balancer,
        health,
        checker,
        affinity=affinity,
        options=options,
        grace=grace,
        credentials=credentials,
    )
    cluster.tls = tls
    checker.start()
    return cluster
