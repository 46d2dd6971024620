"""The balancer of one cluster: a picking kernel over its endpoints. Sync, no I/O.

``pick()`` returns an endpoint index or raises ``NoEligibleEndpointError``;
``started``/``done`` bracket every call so the kernels see in-flight counts
and, for ``ewma``, latencies. Rotation changes (``endpoints.ClusterHealth``)
reach the kernel through ``set_eligible`` and slow start through
``set_share``; the hot path never checks health. ``pick_other`` picks for a
retry, never the endpoint that just failed.

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
from collections.abc import Callable, Iterable

from lbgw._typing import HashKernel, Kernel
from lbgw.config import HASH_STRATEGIES, ClusterConfig
from lbgw.exceptions import NoEligibleEndpointError
from lbgw.kernels import (
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


def make_kernel(cluster: ClusterConfig, scale: int = 1) -> tuple[Kernel, Callable[[], int]]:
    """The kernel for ``cluster`` and the bound pick function to call.

    ``scale`` multiplies every weight (picks are the same for any common
    factor); slow start uses it to ramp weights in fine steps.
    """
    if cluster.strategy in HASH_STRATEGIES:  # the kernel of calls without a key
        cluster = dataclasses.replace(cluster, strategy=cluster.params.fallback)
    weights = [e.weight * scale for e in cluster.endpoints]
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
        return ewma, ewma.pick_p2c if params.choice == "p2c" else ewma.pick
    else:  # config.py admits only the names above
        raise ValueError(f"unknown strategy {cluster.strategy!r}")
    return kernel, kernel.pick


def make_hash_kernel(cluster: ClusterConfig) -> HashKernel | None:
    """The consistent-hashing kernel of a ``ring_hash`` or ``maglev`` cluster, else None."""
    weights = [e.weight for e in cluster.endpoints]
    names = [e.address.encode() for e in cluster.endpoints]
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
        "_pick",
        "_scale",
        "_shares",
        "addresses",
        "fallback",
        "hashing",
        "kernel",
        "name",
        "strategy",
        "weights",
    )

    def __init__(self, cluster: ClusterConfig) -> None:
        self.name = cluster.name
        self.strategy = cluster.strategy
        #: The strategy of ``kernel``: the cluster's, or a hashing cluster's fallback.
        self.fallback = cluster.strategy
        self.hashing = make_hash_kernel(cluster)
        if self.hashing is not None:
            self.fallback = cluster.params.fallback
        self.addresses = tuple(e.address for e in cluster.endpoints)
        self.weights = tuple(e.weight for e in cluster.endpoints)
        self._scale = 1
        if cluster.slow_start.window > 0:
            self._scale = max(1, min(_SHARE_SCALE, MAX_WEIGHT // max(self.weights)))
        self._shares = [1.0] * len(self.weights)
        self.kernel, self._pick = make_kernel(cluster, self._scale)

    def __repr__(self) -> str:
        k = self.kernel
        eligible = sum(k.is_eligible(i) for i in range(k.n))
        in_flight = sum(k.in_flight(i) for i in range(k.n))
        return (
            f"<Balancer {self.name} {self.strategy} "
            f"[{eligible} eligible, {k.n - eligible} out | in-flight {in_flight}]>"
        )

    def pick(self) -> int:
        """The index of the endpoint for the next call; counts it as started."""
        i = self._pick()
        if i < 0:
            raise NoEligibleEndpointError(self.name)
        self.kernel.started(i)
        return i

    def done(self, i: int, started_ns: int, latency_ns: int | None) -> None:
        """End the call on ``i``; ``latency_ns`` feeds the latency estimate if given."""
        kernel = self.kernel
        kernel.finished(i)
        if latency_ns is not None:
            kernel.observe(i, latency_ns, started_ns + latency_ns)

    def pick_other(self, exclude: int) -> int:
        """Like ``pick``, but never ``exclude`` (the endpoint a retry moves away from).

        The excluded endpoint leaves rotation for this one pick, which is
        synchronous, so no other call sees it out. Raises
        ``NoEligibleEndpointError`` when no other endpoint is eligible.
        """
        kernel = self.kernel
        if not kernel.is_eligible(exclude):
            return self.pick()
        kernel.set_eligible(exclude, False)
        try:
            i = self._pick()
        finally:
            kernel.set_eligible(exclude, True)
        if i < 0:
            raise NoEligibleEndpointError(self.name)
        kernel.started(i)
        return i

    def pick_key(self, key: bytes, exclude: int = -1) -> int:
        """The endpoint that ``key`` hashes to (never ``exclude``); counts it as started.

        Only for hashing clusters. Raises ``NoEligibleEndpointError`` as ``pick`` does.
        """
        hashing = self.hashing
        assert hashing is not None, "pick_key needs a ring_hash or maglev cluster"
        if exclude >= 0 and hashing.is_eligible(exclude):
            hashing.set_eligible(exclude, False)
            try:
                i = hashing.pick_key(key)
            finally:
                hashing.set_eligible(exclude, True)
        else:
            i = hashing.pick_key(key)
        if i < 0:  # every endpoint has a point or slot (config.py sees to it): none is in
            raise NoEligibleEndpointError(self.name)
        self.kernel.started(i)
        return i

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

    def set_share(self, i: int, share: float) -> None:
        """Give endpoint ``i`` this share (0 to 1) of its configured weight (slow start)."""
        if share == self._shares[i]:
            return
        self._shares[i] = share
        self.kernel.set_weight(i, max(1, round(self.weights[i] * self._scale * share)))

    def share(self, i: int) -> float:
        return self._shares[i]

    def candidates(
        self, *, exclude: int = -1, limit: int = MAX_TRACED_CANDIDATES
    ) -> list[tuple[str, dict[str, float]]]:
        """The endpoints the next pick compares, with the figures it compares, for traces.

        Called just before the pick, so the figures are the ones it sees. A
        power-of-two-choices pick (``least_request`` with equal weights,
        ``ewma`` with ``choice = "p2c"``) compares two endpoints: those two,
        read from a copy of its random generator. Other picks consider every
        endpoint in rotation: at most ``limit`` of them, in index order.
        Every candidate has ``weight`` (as slow start has it now) and
        ``in_flight``; ``swrr`` adds nginx's ``current_weight``, ``ewma`` its
        ``cost`` (the Peak EWMA latency estimate x (in-flight + 1) / weight,
        in ms). For a retry,
        ``exclude`` is out of rotation meanwhile, as it is for ``pick_other``.
        Only sampled calls pay for this.
        """
        kernel = self.kernel
        if exclude >= 0 and kernel.is_eligible(exclude):
            kernel.set_eligible(exclude, False)
            try:
                return self.candidates(limit=limit)
            finally:
                kernel.set_eligible(exclude, True)
        strategy = self.fallback
        indices: Iterable[int] = range(len(self.addresses))
        peek = getattr(kernel, "peek_two", None)
        if peek is not None and not (strategy == "ewma" and self._pick != kernel.pick_p2c):  # type: ignore[attr-defined]
            a, b = peek()
            if a >= 0:
                indices = (a, b)
        now = time.monotonic_ns()
        scale = self._scale
        out: list[tuple[str, dict[str, float]]] = []
        for i in indices:
            if not kernel.is_eligible(i):
                continue
            scores: dict[str, float] = {
                "weight": round(self.weights[i] * self._shares[i], 3),
                "in_flight": kernel.in_flight(i),
            }
            if strategy == "swrr":
                scores["current_weight"] = kernel.current_weight(i) / scale  # type: ignore[attr-defined]
            elif strategy == "ewma":
                scores["cost"] = round(kernel.cost(i, now) / 1e6, 3)  # type: ignore[attr-defined]
            out.append((self.addresses[i], scores))
            if len(out) == limit:
                break
        return out
