"""The balancer of one cluster: a picking kernel over its endpoints. Sync, no I/O.

The balancer holds the cluster's endpoints in the kernels' order
(``endpoints[i].index == i``) and is the one place that turns a kernel's
index into an ``Endpoint``. ``pick()`` returns an endpoint and counts it as
started, or raises ``NoEligibleEndpointError``; ``done()`` ends the call, so
the kernels see in-flight counts and, for ``ewma``, latencies. A retry picks
with ``exclude``: the kernels' ``pick_excluding`` never returns the endpoint
that just failed, and leaves its place in the schedule alone. Rotation
changes (``endpoints.ClusterHealth``) reach the kernel through
``set_eligible`` and slow start through ``set_share``; the hot path never
checks health. ``rebuild()`` lays the kernels out anew for a changed
endpoint set (``Cluster.update``), carrying over what they knew of the
endpoints that stay.

Strategies map onto the kernels of ``lbgw.kernels``:

* ``swrr``: ``SmoothWeightedRoundRobin``, nginx's smooth weighted round robin.
* ``round_robin``: ``RoundRobin``; weights are ignored (nginx/Envoy users
  who want them use ``swrr``).
* ``random``: ``Random``, uniform, or weighted when weights differ.
* ``least_request``: ``LeastRequest``, Envoy's P2C / weighted least request.
* ``ewma``: ``PeakEwma``; ``choice = "p2c"`` (default) compares two random
  candidates, as tower and Linkerd do, so that a burst of calls does not all
  land on the one backend that looked best; ``"best"`` takes the argmin.
* ``ring_hash`` and ``maglev``: ``RingHash`` and ``Maglev``, looked up by a
  call's key (``pick_key``, see ``affinity.py``); calls without a key are
  picked by the ``fallback`` strategy's kernel, which is ``kernel`` here and
  keeps the in-flight counts. Both kernels hear every rotation change.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from lbgw._typing import EwmaKernel, HashKernel, Kernel
from lbgw.config import HASH_STRATEGIES, ClusterConfig
from lbgw.decision import Decision
from lbgw.endpoints import Endpoint
from lbgw.exceptions import NoEligibleEndpointError
from lbgw.kernels import (
    MAX_BACKENDS,
    MAX_WEIGHT,
    LeastRequest,
    Maglev,
    PeakEwma,
    Random,
    RingHash,
    RoundRobin,
    SmoothWeightedRoundRobin,
    hash64,
)

#: The most candidates a trace lists for one pick.
MAX_TRACED_CANDIDATES = 16

#: Slow start scales kernel weights by up to this much, so that a share of
#: a small weight (10% of weight 1) is still a fraction and not rounded away.
_SHARE_SCALE = 1000

__all__ = ["Balancer", "make_kernel"]


_Pick = Callable[[], int]
_PickExcluding = Callable[[int], int]


def make_kernel(
    cluster: ClusterConfig, weights: Sequence[int] | None = None
) -> tuple[Kernel, _Pick, _PickExcluding]:
    """The kernel for ``cluster``, and its bound pick and pick-excluding functions.

    ``weights`` replaces the configured weights (a changed endpoint set, or
    weights scaled for slow start: picks are the same for any common factor).
    """
    if cluster.strategy in HASH_STRATEGIES:  # the kernel of calls without a key
        cluster = dataclasses.replace(cluster, strategy=cluster.params.fallback)
    if weights is None:
        weights = [e.weight for e in cluster.endpoints]
    params = cluster.params
    kernel: Kernel
    if cluster.strategy == "swrr":
        kernel = SmoothWeightedRoundRobin(weights)
    elif cluster.strategy == "round_robin":
        kernel = RoundRobin(len(weights))
    elif cluster.strategy == "random":
        kernel = Random(weights, seed=params.seed)
    elif cluster.strategy == "least_request":
        kernel = LeastRequest(
            weights, active_request_bias=params.active_request_bias, seed=params.seed
        )
    elif cluster.strategy == "ewma":
        ewma = PeakEwma(len(weights), params.decay, params.default_rtt, seed=params.seed)
        for i, w in enumerate(weights):
            ewma.set_weight(i, w)
        if params.choice == "p2c":
            return ewma, ewma.pick_p2c, ewma.pick_p2c_excluding
        return ewma, ewma.pick, ewma.pick_excluding
    else:  # config.py admits only the names above
        raise ValueError(f"unknown strategy {cluster.strategy!r}")
    return kernel, kernel.pick, kernel.pick_excluding


def make_hash_kernel(
    cluster: ClusterConfig, endpoints: Sequence[Endpoint] | None = None
) -> HashKernel | None:
    """The consistent-hashing kernel of a ``ring_hash`` or ``maglev`` cluster, else None."""
    if endpoints is None:
        endpoints = [Endpoint(e.address, e.weight) for e in cluster.endpoints]
    weights = [e.weight for e in endpoints]
    names = [e.address.encode() for e in endpoints]
    params = cluster.params
    if cluster.strategy == "ring_hash":
        return RingHash(
            weights,
            names,
            min_ring_size=params.min_ring_size,
            max_ring_size=params.max_ring_size,
            seed=params.seed,
        )
    if cluster.strategy == "maglev":
        return Maglev(weights, names, table_size=params.table_size, seed=params.seed)
    return None


class Balancer:
    """Picks among one cluster's endpoints and keeps the kernel's load figures."""

    __slots__ = (
        "_config",
        "_pick",
        "_pick_excluding",
        "_scale",
        "endpoints",
        "fallback",
        "hashing",
        "kernel",
        "name",
        "strategy",
    )
    kernel: Kernel
    hashing: HashKernel | None

    def __init__(self, cluster: ClusterConfig, endpoints: Sequence[Endpoint] | None = None) -> None:
        """A balancer over ``endpoints``, or over the configured ones (unit tests)."""
        self._config = cluster
        self.name = cluster.name
        self.strategy = cluster.strategy
        #: The strategy of ``kernel``: the cluster's, or a hashing cluster's fallback.
        self.fallback = cluster.strategy
        if cluster.strategy in HASH_STRATEGIES:
            self.fallback = cluster.params.fallback
        self.endpoints: tuple[Endpoint, ...] = ()
        if endpoints is None:
            endpoints = [Endpoint(e.address, e.weight) for e in cluster.endpoints]
        self.rebuild(endpoints)

    def __repr__(self) -> str:
        k = self.kernel
        eligible = sum(k.is_eligible(i) for i in range(k.n))
        in_flight = sum(k.in_flight(i) for i in range(k.n))
        return (
            f"<Balancer {self.name} {self.strategy} "
            f"[{eligible} eligible, {k.n - eligible} out | in-flight {in_flight}]>"
        )

    def rebuild(self, endpoints: Sequence[Endpoint]) -> None:
        """Lay the kernels out for ``endpoints``, each endpoint's index its place there.

        An endpoint that was here already keeps its calls in flight (and
        with them its load for ``least_request`` and ``ewma``) and its
        latency estimate; every endpoint starts in rotation, at its full
        share, until ``ClusterHealth.rebuilt`` and slow start say otherwise.
        Hash tables are built from names and weights alone, so they move only
        the keys of the endpoints that changed.
        """
        old = self.endpoints
        old_kernel = self.kernel if old else None
        kept = set(old)
        carried = [(e, e.index) for e in endpoints if e in kept]
        weights = [e.weight for e in endpoints]
        self._scale = 1
        if self._config.slow_start.window > 0 and weights:
            self._scale = max(1, min(_SHARE_SCALE, MAX_WEIGHT // max(weights)))
        scale = self._scale
        kernel, self._pick, self._pick_excluding = make_kernel(
            self._config, [w * scale for w in weights]
        )
        self.hashing = make_hash_kernel(self._config, endpoints)
        for i, e in enumerate(endpoints):
            e.index = i
            e.share = 1.0
            e.decision = Decision(e, self.strategy)
        if old_kernel is not None:
            now = time.monotonic_ns()
            ewma = self.fallback == "ewma"
            for e, j in carried:
                i = e.index
                for _ in range(old_kernel.in_flight(j)):
                    kernel.started(i)
                if ewma:  # Peak EWMA: its latency estimate too
                    estimate = cast("EwmaKernel", old_kernel).estimate(j, now)
                    cast("EwmaKernel", kernel).restore_estimate(i, estimate, now)
        self.kernel = kernel
        self.endpoints = tuple(endpoints)

    def refuses(self, endpoints: Sequence[tuple[str, int]]) -> str | None:
        """Why the kernels could not take this endpoint set (address, weight), or None."""
        n = len(endpoints)
        if not 1 <= n <= MAX_BACKENDS:
            return f"1 to {MAX_BACKENDS} endpoints, got {n}"
        if len({a for a, _ in endpoints}) != n:
            return "endpoints with distinct addresses"
        bad = [a for a, w in endpoints if not 1 <= w <= MAX_WEIGHT]
        if bad:
            return f"weights from 1 to {MAX_WEIGHT} ({', '.join(bad)})"
        params = self._config.params
        if self.strategy == "maglev" and n > params.table_size:
            return f"at most table_size ({params.table_size}) endpoints for maglev"
        if self.strategy == "ring_hash" and n > params.max_ring_size:
            return f"at most max_ring_size ({params.max_ring_size}) endpoints for ring_hash"
        return None

    def pick(self, exclude: Endpoint | None = None) -> Endpoint:
        """The endpoint for the next call (never ``exclude``); counts it as started.

        Raises ``NoEligibleEndpointError`` when no endpoint is eligible.
        """
        i = self._pick() if exclude is None else self._pick_excluding(exclude.index)
        if i < 0:
            raise NoEligibleEndpointError(self.name)
        self.kernel.started(i)
        return self.endpoints[i]

    def pick_key(self, key: bytes, exclude: Endpoint | None = None) -> Endpoint:
        """The endpoint that ``key`` hashes to (never ``exclude``); counts it as started.

        Only for hashing clusters. Raises ``NoEligibleEndpointError`` as ``pick`` does.
        """
        hashing = self.hashing
        assert hashing is not None, "pick_key needs a ring_hash or maglev cluster"
        if exclude is None:
            i = hashing.pick_key(key)
        else:
            i = hashing.pick_key_excluding(key, exclude.index)
        if i < 0:  # every endpoint has a point or slot (config.py sees to it): none is in
            raise NoEligibleEndpointError(self.name)
        self.kernel.started(i)
        return self.endpoints[i]

    def peek(self) -> Endpoint | None:
        """The endpoint the next ``pick()`` would return, changing nothing (``/explain``).

        None when no endpoint is in rotation. A drawing kernel draws from a copy
        of its generator, so the next real pick draws the same.
        """
        kernel = self.kernel
        if self.fallback == "ewma" and self._pick == kernel.pick_p2c:  # type: ignore[attr-defined]
            i = kernel.peek_p2c()  # type: ignore[attr-defined]
        else:
            i = kernel.peek()
        return self.endpoints[i] if i >= 0 else None

    def peek_key(self, key: bytes) -> Endpoint | None:
        """The endpoint ``key`` hashes to, not counted as started (``/explain``)."""
        hashing = self.hashing
        assert hashing is not None, "peek_key needs a ring_hash or maglev cluster"
        i = hashing.pick_key(key)
        return self.endpoints[i] if i >= 0 else None

    def started(self, e: Endpoint) -> None:
        """Count a call on ``e`` that was chosen without a pick (a sticky token)."""
        self.kernel.started(e.index)

    def done(self, e: Endpoint, started_ns: int, latency_ns: int | None) -> None:
        """End the call on ``e``; ``latency_ns`` feeds the latency estimate if given."""
        i = e.index
        if i < 0:  # it has left the cluster: its own count, which closes it at zero
            if e.leaving is not None:
                e.leaving.done()
            return
        kernel = self.kernel
        kernel.finished(i)
        if latency_ns is not None:
            kernel.observe(i, latency_ns, started_ns + latency_ns)

    def position(self, key: bytes) -> int:
        """Where ``key`` falls: its ring point or Maglev slot, for traces (-1: no hashing)."""
        if self.hashing is None:
            return -1
        return self.hashing.position(hash64(key))

    def set_eligible(self, i: int, eligible: bool) -> None:
        self.kernel.set_eligible(i, eligible)
        if self.hashing is not None:
            self.hashing.set_eligible(i, eligible)

    def is_eligible(self, i: int) -> bool:
        return self.kernel.is_eligible(i)

    def set_share(self, e: Endpoint, share: float) -> None:
        """Give ``e`` this share (0 to 1) of its configured weight (slow start)."""
        if share == e.share:
            return
        e.share = share
        self.kernel.set_weight(e.index, max(1, round(e.weight * self._scale * share)))

    def draws_two(self) -> bool:
        """Whether the next pick is a power of two choices (``least_request`` with equal
        weights, ``ewma`` with ``choice = "p2c"``), with two endpoints to draw from."""
        kernel = self.kernel
        peek = getattr(kernel, "peek_two", None)
        if peek is None or (self.fallback == "ewma" and self._pick != kernel.pick_p2c):  # type: ignore[attr-defined]
            return False
        a, _ = peek(-1)
        return bool(a >= 0)

    def candidates(
        self, *, exclude: Endpoint | None = None, limit: int = MAX_TRACED_CANDIDATES
    ) -> list[tuple[str, dict[str, float]]]:
        """The endpoints the next pick compares, with the figures it compares, for traces.

        Called just before the pick, so the figures are the ones it sees. A
        power-of-two-choices pick (``least_request`` with equal weights,
        ``ewma`` with ``choice = "p2c"``) compares two endpoints: those two,
        read from a copy of its random generator (``peek_two``), never
        ``exclude``. Other picks consider every endpoint in rotation but
        ``exclude``: at most ``limit`` of them, in index order. Every
        candidate has ``weight`` (as slow start has it now) and ``in_flight``;
        ``swrr`` adds nginx's ``current_weight``, ``ewma`` its ``cost`` (the
        Peak EWMA latency estimate x (in-flight + 1) / weight, in ms). Only
        sampled calls pay for this.
        """
        kernel = self.kernel
        skip = -1 if exclude is None else exclude.index
        strategy = self.fallback
        endpoints = self.endpoints
        indices: Iterable[int] = range(len(endpoints))
        peek = getattr(kernel, "peek_two", None)
        if peek is not None and not (strategy == "ewma" and self._pick != kernel.pick_p2c):  # type: ignore[attr-defined]
            a, b = peek(skip)
            if a >= 0:
                indices = (a, b)
        now = time.monotonic_ns()
        scale = self._scale
        out: list[tuple[str, dict[str, float]]] = []
        for i in indices:
            if i == skip or not kernel.is_eligible(i):
                continue
            e = endpoints[i]
            scores: dict[str, float] = {
                "weight": round(e.weight * e.share, 3),
                "in_flight": kernel.in_flight(i),
            }
            if strategy == "swrr":
                scores["current_weight"] = kernel.current_weight(i) / scale  # type: ignore[attr-defined]
            elif strategy == "ewma":
                scores["cost"] = round(kernel.cost(i, now) / 1e6, 3)  # type: ignore[attr-defined]
            out.append((e.address, scores))
            if len(out) == limit:
                break
        return out
