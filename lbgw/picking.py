"""Pure-Python twins of the picking kernels in ``_fastpick.pyx``.

Each class here has the same name, constructor, methods and pick sequence as
its compiled counterpart. The twins are the reference the kernels are tested
against (``tests/unit/test_kernels.py`` runs every test on both and checks that
they make identical pick sequences) and the baseline ``bench/pick.py``
measures. Set ``LBGW_NO_EXTENSIONS=1`` to run lbgw on them; see
``lbgw.kernels``.

Rules shared by every kernel:

* Backends are the indices ``0..n-1``. ``pick()`` returns one of them, or
  ``-1`` when none is eligible.
* A backend is in rotation when it is eligible *and* its weight is above 0;
  ``set_eligible`` and ``set_weight`` change that in place (the kernel
  recomputes its arrays then, never on a pick).
* At most ``MAX_BACKENDS`` backends.
* Weights are integers in ``[0, MAX_WEIGHT]``.
* ``started``/``finished`` keep an in-flight count per backend (never below
  0); ``observe`` feeds a latency sample and is a no-op except in PeakEwma.
* Random draws come from splitmix64 (Steele, Lea & Flood, 2014), reduced to a
  range with Lemire's multiply-high, so a seed gives the same draws in C and
  Python.
* Keys and endpoint names are hashed with ``hash64``, xxHash64: the same value
  in every process and on every platform, where Python's ``hash()`` is salted
  per process.
* ``pick_excluding(i)`` is a retry's pick, "any backend but ``i``": it
  advances the kernel as ``pick()`` does but never returns ``i``, and returns
  -1 when no backend but ``i`` is in rotation (changing nothing then, except
  that the hashing kernels draw as their ``pick()`` always does). It changes
  no eligibility and resets nothing of ``i``'s: the old way, taking ``i`` out
  of rotation for one pick, cost two rebuilds and, in SWRR, ``i``'s place in
  the schedule. An ``i`` that is not a backend in rotation (-1, out of range,
  ineligible, weight 0) excludes nothing: the call is ``pick()``. Each kernel
  documents how it keeps ``i``'s share.

The consistent-hashing kernels (RingHash, Maglev) also take each backend's name, and
pick by a key's hash: ``pick_key(key)``, ``pick_hash(h)``; see ``_HashKernel``.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
import os
from collections.abc import Sequence
from typing import ClassVar

__all__ = [
    "EDF_THRESHOLD",
    "MAX_ACTIVE_REQUEST_BIAS",
    "MAX_BACKENDS",
    "MAX_RING_SIZE",
    "MAX_TABLE_SIZE",
    "MAX_WEIGHT",
    "LeastRequest",
    "Maglev",
    "PeakEwma",
    "Random",
    "RingHash",
    "RoundRobin",
    "SmoothWeightedRoundRobin",
    "hash64",
]

#: Most backends a kernel takes: far beyond any cluster, and it keeps indices
#: in 32 bits and the alias tables' products (weight × count) in 64.
MAX_BACKENDS = 1 << 20

#: Largest weight a backend may have. Keeps every product the schedulers
#: form (weight × count, weight × weight) far inside 64 bits.
MAX_WEIGHT = 1 << 24

#: Largest ``active_request_bias``: even 2**63 calls in flight raised to it
#: stay inside a double, so no backend's load-scaled weight reaches 0.
MAX_ACTIVE_REQUEST_BIAS = 10.0

#: Number of backends at and above which SmoothWeightedRoundRobin switches
#: from nginx's O(n) scan to an O(log n) earliest-deadline-first heap.
EDF_THRESHOLD = 64

#: Largest ring RingHash builds, and its default ``max_ring_size``: Envoy's
#: limit (8M points, 96 MiB of C arrays here).
MAX_RING_SIZE = 8_388_608

#: Largest Maglev table: Envoy's limit (a prime; 20 MB of C array here).
MAX_TABLE_SIZE = 5_000_011

_M64 = (1 << 64) - 1
#: Ordinary picks Random.pick_excluding tries before its direct draw.
_REJECT_TRIES = 4
_LOGTAB_SIZE = 256
_LOGTAB = [math.log(k + 1) for k in range(_LOGTAB_SIZE)]


def _log1k(k: int) -> float:
    """``log(k + 1)`` for an in-flight count, from a table while it is small."""
    return _LOGTAB[k] if k < _LOGTAB_SIZE else math.log(k + 1)


def _check_weight(weight: int) -> int:
    w = operator.index(weight)
    if not 0 <= w <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer in [0, {MAX_WEIGHT}], got {w}")
    return w


def _check_count(n: int) -> int:
    if not 0 <= n <= MAX_BACKENDS:
        raise ValueError(f"n must be in [0, {MAX_BACKENDS}], got {n}")
    return n


def _check_index(i: int, n: int) -> int:
    i = operator.index(i)
    if not 0 <= i < n:
        raise IndexError(f"backend index {i} out of range for {n} backends")
    return i


def _excluded(i: int, n: int) -> int:
    """The backend ``pick_excluding`` should skip: ``i`` if it is an index, else -1 (none)."""
    i = operator.index(i)
    return i if 0 <= i < n else -1


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


# --- xxHash64 ---------------------------------------------------------------

_XXH_P1 = 0x9E3779B185EBCA87
_XXH_P2 = 0xC2B2AE3D27D4EB4F
_XXH_P3 = 0x165667B19E3779F9
_XXH_P4 = 0x85EBCA77C2B2AE63
_XXH_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _xxh_round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _XXH_P2) & _M64, 31) * _XXH_P1) & _M64


def _xxh_merge(h: int, v: int) -> int:
    return ((h ^ _xxh_round(0, v)) * _XXH_P1 + _XXH_P4) & _M64


def hash64(data: bytes, seed: int = 0) -> int:
    """xxHash64 of ``data`` (Yann Collet's reference algorithm), an unsigned 64-bit int.

    Stable across processes, machines and versions, which is the point: the
    hashing kernels place endpoints and keys with it, so a key maps to the
    same endpoint in every worker. ``seed`` is taken modulo 2**64.
    ``hash64(b"") == 0xEF46DB3751D8E999``.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"hash64() takes bytes, got {type(data).__name__}")
    seed = operator.index(seed) & _M64
    n = len(data)
    p = 0
    if n >= 32:
        v1 = (seed + _XXH_P1 + _XXH_P2) & _M64
        v2 = (seed + _XXH_P2) & _M64
        v3 = seed
        v4 = (seed - _XXH_P1) & _M64
        while p + 32 <= n:
            v1 = _xxh_round(v1, int.from_bytes(data[p : p + 8], "little"))
            v2 = _xxh_round(v2, int.from_bytes(data[p + 8 : p + 16], "little"))
            v3 = _xxh_round(v3, int.from_bytes(data[p + 16 : p + 24], "little"))
            v4 = _xxh_round(v4, int.from_bytes(data[p + 24 : p + 32], "little"))
            p += 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M64
        for v in (v1, v2, v3, v4):
            h = _xxh_merge(h, v)
    else:
        h = (seed + _XXH_P5) & _M64
    h = (h + n) & _M64
    while p + 8 <= n:
        h ^= _xxh_round(0, int.from_bytes(data[p : p + 8], "little"))
        h = (_rotl(h, 27) * _XXH_P1 + _XXH_P4) & _M64
        p += 8
    if p + 4 <= n:
        h ^= (int.from_bytes(data[p : p + 4], "little") * _XXH_P1) & _M64
        h = (_rotl(h, 23) * _XXH_P2 + _XXH_P3) & _M64
        p += 4
    while p < n:
        h ^= (data[p] * _XXH_P5) & _M64
        h = (_rotl(h, 11) * _XXH_P1) & _M64
        p += 1
    h ^= h >> 33
    h = (h * _XXH_P2) & _M64
    h ^= h >> 29
    h = (h * _XXH_P3) & _M64
    return h ^ (h >> 32)


# --- Kernels ------------------------------------------------------------------


class _Kernel:
    """State and bookkeeping every kernel shares: weights, eligibility, in-flight."""

    name: ClassVar[str] = ""

    def __init__(self, weights: Sequence[int]) -> None:
        self._n = _check_count(len(weights))
        self._w = [_check_weight(w) for w in weights]
        self._elig = [True] * self._n
        self._inflight = [0] * self._n
        # Dense list of the indices in rotation, ascending; rebuilt on change.
        self._dense: list[int] = []

    @property
    def n(self) -> int:
        return self._n

    def _rebuild(self) -> None:
        self._dense = [i for i in range(self._n) if self._elig[i] and self._w[i] > 0]

    def set_eligible(self, i: int, /, eligible: bool) -> None:
        i = _check_index(i, self._n)
        if self._elig[i] != bool(eligible):
            self._elig[i] = bool(eligible)
            self._rebuild()

    def is_eligible(self, i: int, /) -> bool:
        return self._elig[_check_index(i, self._n)]

    def set_weight(self, i: int, /, weight: int) -> None:
        i = _check_index(i, self._n)
        w = _check_weight(weight)
        if self._w[i] != w:
            self._w[i] = w
            self._rebuild()

    def weight(self, i: int, /) -> int:
        return self._w[_check_index(i, self._n)]

    def started(self, i: int, /) -> None:
        self._inflight[_check_index(i, self._n)] += 1

    def finished(self, i: int, /) -> None:
        i = _check_index(i, self._n)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1

    def in_flight(self, i: int, /) -> int:
        return self._inflight[_check_index(i, self._n)]

    def observe(self, i: int, /, rtt_ns: int, now_ns: int) -> None:
        _check_index(i, self._n)

    def pick(self) -> int:
        raise NotImplementedError

    def pick_excluding(self, i: int, /) -> int:
        raise NotImplementedError

    def _rotates(self, i: int) -> bool:
        """Whether ``i`` (an index, or -1) is a backend in rotation."""
        return i >= 0 and self._elig[i] and self._w[i] > 0

    def pick_many(self, count: int) -> int:
        """Make ``count`` picks; return the sum of the picked indices."""
        total = 0
        for _ in range(count):
            total += self.pick()
        return total

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} n={self._n} in-rotation={len(self._dense)} "
            f"in-flight={sum(self._inflight)}>"
        )


class _Rng:
    """splitmix64 with Lemire's multiply-high range reduction."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _M64

    def next(self) -> int:
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    def below(self, bound: int) -> int:
        """A draw in ``[0, bound)``; ``bound`` must be positive."""
        return (self.next() * bound) >> 64

    def two(self, m: int) -> tuple[int, int]:
        """Two distinct draws in ``[0, m)``, ``m >= 2``: the second skips over the first."""
        a = self.below(m)
        b = self.below(m - 1)
        return a, b + 1 if b >= a else b

    def two_excluding(self, m: int, p: int) -> tuple[int, int]:
        """Two distinct draws in ``[0, m)`` other than ``p``, ``m >= 3``: two in
        ``[0, m - 1)``, each then moved past ``p``."""
        a, b = self.two(m - 1)
        return a + (a >= p), b + (b >= p)


class _SeededKernel(_Kernel):
    """A kernel that draws random numbers: seeded for reproducible picks, else from urandom."""

    def __init__(self, weights: Sequence[int], seed: int | None) -> None:
        super().__init__(weights)
        self._rng = _Rng(0)
        self.seed(seed)

    def seed(self, seed: int | None) -> None:
        self._rng = _Rng(_random_seed() if seed is None else seed)

    def peek(self) -> int:
        """What the next ``pick()`` returns, drawn from a copy of the generator (``/explain``).

        A pick that draws changes nothing but the generator, so this is the
        pick itself with the generator's state put back.
        """
        state = self._rng.state
        try:
            return self.pick()
        finally:
            self._rng.state = state


def _peek_two(dense: list[int], rng: _Rng, x: int, p2c: bool) -> tuple[int, int]:
    """The pair a P2C pick over ``dense`` would draw next, skipping backend ``x`` (-1: none),
    from a copy of ``rng``; ``(-1, -1)`` when it would draw none (``p2c`` false: no P2C)."""
    m = len(dense)
    p = bisect.bisect_left(dense, x) if x >= 0 else m
    if p < m and dense[p] == x:
        if m < 3 or not p2c:
            return -1, -1
        a, b = _Rng(rng.state).two_excluding(m, p)
    else:
        if m < 2 or not p2c:
            return -1, -1
        a, b = _Rng(rng.state).two(m)
    return dense[a], dense[b]


class SmoothWeightedRoundRobin(_Kernel):
    """nginx's smooth weighted round-robin (``ngx_http_upstream_get_peer``).

    Every pick adds each backend's weight to its current weight and to the
    total; the largest current weight wins (the first on a tie) and loses the
    total. Weights ``[5, 1, 1]`` give ``0, 0, 1, 0, 2, 0, 0``: each cycle of
    ``sum(weights)`` picks gives every backend exactly its weight, spread out
    so no backend of weight ``w`` is picked more than ``w`` times in a row.
    A backend leaving rotation keeps its current weight, as in nginx.

    The scan is O(n). From ``edf_threshold`` backends on, the kernel uses an
    earliest-deadline-first heap instead (the scheduler behind Envoy's
    weighted round robin), in O(log n). Backend ``i``'s ``k``-th pick of a
    cycle is due at ``(k - 1/2) / w_i``: the Sainte-Laguë (Webster) divisors,
    which spread each backend's picks over the cycle, where Envoy's
    ``k / w_i`` makes every backend's last pick due at the same instant and so
    bunches them at the cycle's end (``[5, 1, 1]`` gives ``0, 0, 0, 1, 2, 0, 0``
    here, ``0, 0, 0, 0, 0, 1, 2`` with ``k / w``). Deadlines compare exactly,
    as integers, ties to the lower index. Every deadline of a cycle lies in
    ``(0, 1)``, so a cycle of ``sum(weights)`` picks gives each backend
    exactly its weight, as nginx's does; the order within a cycle differs.
    When the earliest deadline reaches 1, every deadline moves back by 1,
    which keeps their order.

    A change in rotation or weight keeps the schedule going, as nginx keeps
    its current weights: the backends it leaves alone keep their deadlines,
    and a backend that joins, or whose weight changed, is next due at its
    first deadline after the one last served. Restarting the cycle instead
    would serve the same few backends first after every change, and a
    backend flapping faster than a cycle would starve the rest.

    ``pick_excluding(i)`` keeps ``i``'s share whichever scheduler runs. In
    the scan, every backend in rotation, ``i`` included, adds its weight to
    its current weight and to the total, as in a pick; only the choice skips
    ``i``: the largest current weight among the others wins and loses the
    total. So ``i`` keeps what it accrued, stays ahead, and is served on a
    later pick (the one after, if it would have won this one): the sum of
    current weights stays 0 and each backend's share stays its weight's.
    Taking ``i`` out of rotation for the pick instead skipped its accrual,
    so a backend excluded from every tenth pick lost a tenth of its share.
    Under EDF, the entry served is the earliest due that is not ``i``'s: the
    heap's top, or, when ``i`` is at the top, the earlier of the top's two
    children (same exact comparison, same tie rule). That entry moves on to
    its next deadline and sifts down; ``i`` keeps its deadline and, still at
    the top, is served by the next pick.
    """

    name: ClassVar[str] = "swrr"

    def __init__(self, weights: Sequence[int], *, edf_threshold: int = EDF_THRESHOLD) -> None:
        super().__init__(weights)
        self._edf = self._n >= edf_threshold
        self._cur = [0] * self._n
        self._total = 0
        # EDF state, by backend index: the next deadline's numerator u = 2k - 1
        # (0 when not scheduled; the deadline is u / 2w) and the weight it was
        # scheduled with. The heap holds the indices in rotation. The deadline
        # last served, t = t_num / t_den, is the schedule's present.
        self._u = [0] * self._n
        self._uw = [0] * self._n
        self._heap: list[int] = []
        self._t_num = 0
        self._t_den = 1
        self._rebuild()

    @property
    def scheduler(self) -> str:
        return "edf" if self._edf else "swrr"

    def current_weight(self, i: int, /) -> int:
        """nginx's current weight of backend ``i`` (the scan's; 0 under the EDF scheduler)."""
        j = _check_index(i, self._n)
        return self._cur[j] if not self._edf else 0

    def _rebuild(self) -> None:
        super()._rebuild()
        self._total = sum(self._w[i] for i in self._dense)
        if not self._edf:
            return
        rotation = set(self._dense)
        for i in range(self._n):
            w = self._w[i]
            if i not in rotation:
                self._u[i] = 0
            elif self._u[i] == 0 or self._uw[i] != w:
                # The first odd u with u / 2w after t.
                u = (2 * w * self._t_num) // self._t_den + 1
                self._u[i] = u if u % 2 else u + 1
                self._uw[i] = w
        self._heap = list(self._dense)
        for h in range(len(self._heap) // 2 - 1, -1, -1):
            self._sift_down(h)
        self._rebase_if_due()

    def _rebase_if_due(self) -> None:
        """Once every deadline is at least 1, move them all back by 1."""
        if self._heap:
            top = self._heap[0]
            if self._u[top] >= 2 * self._w[top]:
                for i in self._dense:
                    self._u[i] -= 2 * self._w[i]
                self._t_num = max(self._t_num - self._t_den, 0)

    def _before(self, a: int, b: int) -> bool:
        """Whether backend ``a``'s next deadline comes before ``b``'s."""
        lhs = self._u[a] * self._w[b]
        rhs = self._u[b] * self._w[a]
        return lhs < rhs or (lhs == rhs and a < b)

    def _sift_down(self, h: int) -> None:
        heap = self._heap
        m = len(heap)
        item = heap[h]
        while True:
            c = 2 * h + 1
            if c >= m:
                break
            if c + 1 < m and self._before(heap[c + 1], heap[c]):
                c += 1
            if not self._before(heap[c], item):
                break
            heap[h] = heap[c]
            h = c
        heap[h] = item

    def pick(self) -> int:
        dense = self._dense
        if not dense:
            return -1
        if self._edf:
            top = self._heap[0]
            self._t_num = self._u[top]
            self._t_den = 2 * self._w[top]
            self._u[top] += 2
            self._sift_down(0)
            self._rebase_if_due()
            return top
        cur = self._cur
        w = self._w
        best = -1
        best_cur = 0
        for i in dense:
            c = cur[i] + w[i]
            cur[i] = c
            if best < 0 or c > best_cur:
                best = i
                best_cur = c
        cur[best] -= self._total
        return best

    def pick_excluding(self, i: int, /) -> int:
        i = _excluded(i, self._n)
        if not self._rotates(i):
            return self.pick()
        if len(self._dense) == 1:
            return -1
        if self._edf:
            heap = self._heap
            if heap[0] != i:
                return self.pick()
            # i is due first: serve the earlier of the top's children instead.
            h = 2 if len(heap) > 2 and self._before(heap[2], heap[1]) else 1
            top = heap[h]
            self._t_num = self._u[top]
            self._t_den = 2 * self._w[top]
            self._u[top] += 2
            self._sift_down(h)
            self._rebase_if_due()
            return top
        cur = self._cur
        w = self._w
        best = -1
        best_cur = 0
        for j in self._dense:
            c = cur[j] + w[j]
            cur[j] = c
            if j != i and (best < 0 or c > best_cur):
                best = j
                best_cur = c
        cur[best] -= self._total
        return best

    def peek(self) -> int:
        """What the next ``pick()`` returns, without moving the schedule (``/explain``)."""
        dense = self._dense
        if not dense:
            return -1
        if self._edf:
            return self._heap[0]
        cur = self._cur
        w = self._w
        best = -1
        best_cur = 0
        for i in dense:
            c = cur[i] + w[i]
            if best < 0 or c > best_cur:
                best = i
                best_cur = c
        return best


class RoundRobin(_Kernel):
    """Plain round robin over the backends in rotation, in index order.

    After a change in rotation it carries on with the next backend after the
    last one picked. Weights only take a backend out (0) or keep it in (>0).

    ``pick_excluding(i)`` keeps ``i``'s turn. If ``i`` is not next, it is a
    plain pick. If it is, the backend whose turn comes after ``i``'s is served
    now, in place of that turn, and ``i`` stays next: the next pick serves
    ``i`` and then jumps over the turn already taken. With ``[0, 1, 2]`` and
    1 next, ``pick_excluding(1)`` gives 2, then ``1, 0, 1, 2``: each pass
    still serves every backend once, in index order, so shares are kept
    exactly. Excluding ``i`` again while it is still next takes the turn after
    that one, and so on; once every other backend's turn of the pass is taken,
    a further exclusion serves the one after ``i`` as an extra turn. A change
    in rotation forgets the turns taken early and, as always, carries on after
    the last backend ``pick()`` served.

    ``pick()`` keeps its cost: where it compared the position it reached
    with the length of the rotation, to wrap to 0, it compares it with
    ``_stop`` and goes to ``_resume``: the length and 0, unless a jump is due.
    """

    name: ClassVar[str] = "round_robin"

    def __init__(self, n: int) -> None:
        n = _check_count(operator.index(n))
        self._last = -1
        self._next = 0  # dense position of the next turn
        self._stop = 0  # the position at which pick() wraps (the length), or jumps
        self._resume = 0  # where it lands: 0, or past the turns served early
        super().__init__([1] * n)
        self._rebuild()

    def _rebuild(self) -> None:
        super()._rebuild()
        self._next = 0
        self._stop = len(self._dense)
        self._resume = 0
        for pos, i in enumerate(self._dense):
            if i > self._last:
                self._next = pos
                break

    def pick(self) -> int:
        dense = self._dense
        if not dense:
            return -1
        i = dense[self._next]
        nxt = self._next + 1
        if nxt == self._stop:  # the end (wrap to _resume, 0), or a jump's origin
            nxt = self._resume
            self._resume = 0
            self._stop = len(dense)
        self._next = nxt
        self._last = i
        return i

    def pick_excluding(self, i: int, /) -> int:
        i = _excluded(i, self._n)
        if not self._rotates(i):
            return self.pick()
        dense = self._dense
        m = len(dense)
        if m == 1:
            return -1
        p = self._next
        if dense[p] != i:
            return self.pick()
        # i is next: serve the first turn after it not yet taken, and keep i next.
        jump_due = self._stop != m or self._resume != 0  # the turns after i's are taken
        q = self._resume if jump_due else (p + 1 if p + 1 < m else 0)
        if q == p:  # every other backend's turn is taken: an extra turn for the next one
            return dense[p + 1 if p + 1 < m else 0]
        self._resume = q + 1 if q + 1 < m else 0
        self._stop = p + 1
        return dense[q]

    def peek(self) -> int:
        """What the next ``pick()`` returns, without taking the turn (``/explain``)."""
        dense = self._dense
        return dense[self._next] if dense else -1


class Random(_SeededKernel):
    """Random picks: uniform when all weights in rotation are equal, weighted otherwise.

    The weighted draw uses Walker's alias method, built with Vose's integer
    variant on every change so each pick is O(1): one column draw, one
    threshold draw.

    ``pick_excluding(i)`` draws from the distribution conditioned on "not
    ``i``", so every other backend keeps its share relative to the rest.
    Uniform: one draw among the ``m - 1`` others (in dense order, skipping
    ``i``). Weighted: up to ``_REJECT_TRIES`` ordinary picks, the first that
    is not ``i`` taken (rejection sampling: exact, and one pick unless ``i``
    is heavy); if all are ``i``, one draw in ``[0, total - weight(i))`` placed
    by walking the others' weights in dense order, O(n) but exact, so a
    heavy ``i`` costs at most that. The draws come from the same splitmix64
    stream as ``pick()``, the same number in both twins.
    """

    name: ClassVar[str] = "random"

    def __init__(self, weights: Sequence[int], *, seed: int | None = None) -> None:
        super().__init__(weights, seed)
        self._uniform = True
        self._total = 0
        self._prob: list[int] = []
        self._alias: list[int] = []
        self._rebuild()

    def _rebuild(self) -> None:
        super()._rebuild()
        dense = self._dense
        m = len(dense)
        ws = [self._w[i] for i in dense]
        self._uniform = len(set(ws)) <= 1
        total = sum(ws)
        self._total = total
        prob = [total] * m
        alias = list(range(m))
        scaled = [w * m for w in ws]
        small = [j for j in range(m) if scaled[j] < total]
        large = [j for j in range(m) if scaled[j] >= total]
        while small and large:
            s = small.pop()
            g = large.pop()
            prob[s] = scaled[s]
            alias[s] = g
            scaled[g] -= total - scaled[s]
            if scaled[g] < total:
                small.append(g)
            else:
                large.append(g)
        self._prob = prob
        self._alias = alias

    def pick(self) -> int:
        dense = self._dense
        m = len(dense)
        if m == 0:
            return -1
        col = self._rng.below(m)
        if self._uniform:
            return dense[col]
        if self._rng.below(self._total) < self._prob[col]:
            return dense[col]
        return dense[self._alias[col]]

    def pick_excluding(self, i: int, /) -> int:
        i = _excluded(i, self._n)
        if not self._rotates(i):
            return self.pick()
        dense = self._dense
        m = len(dense)
        if m == 1:
            return -1
        if self._uniform:
            col = self._rng.below(m - 1)
            return dense[col + (col >= bisect.bisect_left(dense, i))]
        for _ in range(_REJECT_TRIES):
            j = self.pick()
            if j != i:
                return j
        r = self._rng.below(self._total - self._w[i])
        for j in dense:
            if j != i:
                if r < self._w[j]:
                    return j
                r -= self._w[j]
        raise AssertionError("unreachable: r < the others' total weight")  # pragma: no cover


class LeastRequest(_SeededKernel):
    """Envoy's least_request: fewest in-flight calls wins.

    With equal weights in rotation: power of two choices, two distinct
    backends drawn at random and the one with fewer in-flight calls picked
    (the first draw on a tie). With unequal weights, as Envoy: an
    earliest-deadline-first schedule whose weight is recomputed whenever a
    backend is (re)scheduled, ``weight / (in_flight + 1) ** active_request_bias``,
    with the bias in ``[0, MAX_ACTIVE_REQUEST_BIAS]`` (Envoy's default is 1).
    As in SmoothWeightedRoundRobin, a change in rotation or weight keeps the
    schedule: a backend that stays keeps its entry, one that joins is due
    one interval after the present. (P2C draws two *distinct* backends, as
    tower does; Envoy draws with replacement.)

    ``pick_excluding(i)`` never picks ``i``. P2C draws its two among the
    backends in rotation other than ``i`` (the one other, without a draw,
    when there is only one). EDF serves the earliest entry that is not
    ``i``'s, as SmoothWeightedRoundRobin's EDF does: when ``i``'s is at the
    top, the next earliest moves on and ``i`` keeps its deadline, so it is
    served next. ``peek_two(exclude)`` reads the pair the next
    ``pick_excluding(exclude)`` compares.
    """

    name: ClassVar[str] = "least_request"

    def __init__(
        self, weights: Sequence[int], *, active_request_bias: float = 1.0, seed: int | None = None
    ) -> None:
        bias = float(active_request_bias)
        if not 0.0 <= bias <= MAX_ACTIVE_REQUEST_BIAS:
            raise ValueError(
                f"active_request_bias must be in [0, {MAX_ACTIVE_REQUEST_BIAS}], "
                f"got {active_request_bias!r}"
            )
        super().__init__(weights, seed)
        self._bias = bias
        self._equal = True
        # EDF: the deadline last served, a counter that breaks ties, the heap
        # of (deadline, order, index) and, by index, each entry while the heap
        # is rebuilt (None: not scheduled).
        self._now = 0.0
        self._order = 0
        self._heap: list[tuple[float, int, int]] = []
        self._due: list[tuple[float, int] | None] = [None] * self._n
        self._rebuild()

    def _eff_weight(self, i: int) -> float:
        w = float(self._w[i])
        active = float(self._inflight[i] + 1)
        if self._bias == 1.0:
            return w / active
        if self._bias == 0.0:
            return w
        return w / math.pow(active, self._bias)

    def _entry(self, i: int) -> tuple[float, int, int]:
        """Backend i's next entry: due one load-scaled interval from now."""
        self._order += 1
        return (self._now + 1.0 / self._eff_weight(i), self._order - 1, i)

    def _rebuild(self) -> None:
        for deadline, order, i in self._heap:
            self._due[i] = (deadline, order)
        super()._rebuild()
        rotation = set(self._dense)
        for i in range(self._n):
            if i not in rotation:
                self._due[i] = None
        self._equal = len({self._w[i] for i in self._dense}) <= 1
        self._heap = []
        if not self._equal:
            for i in self._dense:
                due = self._due[i]
                self._heap.append(self._entry(i) if due is None else (due[0], due[1], i))
            heapq.heapify(self._heap)

    def pick(self) -> int:
        dense = self._dense
        m = len(dense)
        if m == 0:
            return -1
        if self._equal:
            if m == 1:
                return dense[0]
            a, b = self._rng.two(m)
            ia = dense[a]
            ib = dense[b]
            return ib if self._inflight[ib] < self._inflight[ia] else ia
        i = self._heap[0][2]
        self._now = self._heap[0][0]
        heapq.heapreplace(self._heap, self._entry(i))
        return i

    def pick_excluding(self, i: int, /) -> int:
        i = _excluded(i, self._n)
        if not self._rotates(i):
            return self.pick()
        dense = self._dense
        m = len(dense)
        if m == 1:
            return -1
        if self._equal:
            p = bisect.bisect_left(dense, i)
            if m == 2:
                return dense[1 - p]
            a, b = self._rng.two_excluding(m, p)
            ia = dense[a]
            ib = dense[b]
            return ib if self._inflight[ib] < self._inflight[ia] else ia
        heap = self._heap
        if heap[0][2] != i:
            return self.pick()
        # i's entry is due first: set it aside, serve the next, put it back.
        own = heapq.heappop(heap)
        j = heap[0][2]
        self._now = heap[0][0]
        heapq.heapreplace(heap, self._entry(j))
        heapq.heappush(heap, own)
        return j

    def peek_two(self, exclude: int = -1) -> tuple[int, int]:
        """The two backends the next pick compares, drawn from a copy of the generator:
        the next ``pick_excluding(exclude)``'s, or the next ``pick()``'s with no ``exclude``.

        ``(-1, -1)`` when that pick compares no two: fewer than two in rotation
        besides ``exclude``, or unequal weights, where the EDF schedule picks.
        """
        return _peek_two(self._dense, self._rng, _excluded(exclude, self._n), self._equal)

    def peek(self) -> int:
        """What the next ``pick()`` returns, without drawing or moving the schedule."""
        if self._equal or not self._dense:
            return super().peek()
        return int(self._heap[0][2])


class PeakEwma(_SeededKernel):
    """Peak EWMA, the "least response time" strategy (Finagle, tower, Linkerd).

    Each backend keeps an estimate of its response time. ``observe`` decays it
    by ``w = exp(-(now - last) / tau)`` and then takes the sample outright if
    it is above the estimate (the peak), or blends it in as
    ``ewma * w + rtt * (1 - w)``. The cost of a backend is
    ``ewma * (in_flight + 1) / weight``. An idle backend's estimate decays
    towards 0 as time passes, so a backend once slow is tried again.
    ``pick()`` takes the lowest cost over all backends in rotation,
    ``pick_p2c()`` the lower of two drawn at random (tower's p2c).

    A backend entering rotation (at construction, or when it becomes
    eligible or its weight leaves 0) starts afresh at ``default_rtt_s``, as
    of the latest observation, as tower gives a new endpoint its default RTT:
    an estimate that has decayed for the whole time a backend was out must
    not flood it with every call when it comes back.

    The estimates live in the log domain, ``log(ewma) + (last - t0) / tau``,
    where the decay to the present is the same ``-(now - t0) / tau`` for
    every backend and cancels out of the comparison: picks need no clock and
    no ``exp``. ``t0`` is the first observation. A tie in that comparison
    goes to the lower index (and to the first draw in p2c); two costs equal
    in exact arithmetic may differ there by a rounding, which can break the
    tie either way. Times are integer nanoseconds from a monotonic clock.

    ``pick_excluding(i)`` is the lowest cost over the backends in rotation
    other than ``i``; ``pick_p2c_excluding(i)`` draws its two among them, as
    LeastRequest's ``pick_excluding`` does, and ``peek_two(exclude)`` reads
    that pair. Neither changes anything of ``i``'s.
    """

    name: ClassVar[str] = "ewma"

    def __init__(
        self,
        n: int,
        decay_s: float = 10.0,
        default_rtt_s: float = 0.03,
        *,
        seed: int | None = None,
    ) -> None:
        n = _check_count(operator.index(n))
        if not decay_s > 0.0 or math.isinf(decay_s):
            raise ValueError(f"decay_s must be a positive number of seconds, got {decay_s!r}")
        if not default_rtt_s > 0.0 or math.isinf(default_rtt_s):
            raise ValueError(
                f"default_rtt_s must be a positive number of seconds, got {default_rtt_s!r}"
            )
        super().__init__([1] * n, seed)
        self._tau = float(decay_s) * 1e9
        self._default = float(default_rtt_s) * 1e9
        self._t0: int | None = None
        self._latest = 0  # latest observation, ns since t0
        self._ewma = [self._default] * n
        self._last = [0] * n  # ns since t0
        self._score = [math.log(self._default)] * n  # log(ewma) + last/tau - log(weight)
        self._rebuild()

    def _rebuild(self) -> None:
        before = set(self._dense)
        super()._rebuild()
        for i in self._dense:
            if i not in before:
                self._ewma[i] = self._default
                self._last[i] = self._latest
                self._rescore(i)

    def set_weight(self, i: int, /, weight: int) -> None:
        super().set_weight(i, weight)
        self._rescore(_check_index(i, self._n))

    def _rescore(self, i: int) -> None:
        w = self._w[i]
        lw = math.log(w) if w > 0 else 0.0
        self._score[i] = math.log(self._ewma[i]) + self._last[i] / self._tau - lw

    def observe(self, i: int, /, rtt_ns: int, now_ns: int) -> None:
        i = _check_index(i, self._n)
        if self._t0 is None:
            self._t0 = now_ns
        now = now_ns - self._t0
        now = max(now, self._last[i])
        rtt = float(rtt_ns) if rtt_ns >= 1 else 1.0
        ewma = self._ewma[i]
        if rtt > ewma:
            ewma = rtt
        else:
            w = math.exp(-((now - self._last[i]) / self._tau))
            ewma = ewma * w + rtt * (1.0 - w)
            ewma = max(ewma, 1.0)
        self._ewma[i] = ewma
        self._last[i] = now
        self._latest = max(self._latest, now)
        self._rescore(i)

    def cost(self, i: int, /, now_ns: int) -> float:
        """The cost ``pick`` compares, in nanoseconds, as of ``now_ns``."""
        i = _check_index(i, self._n)
        w = self._w[i]
        if w == 0:
            return math.inf
        decay = 1.0
        if self._t0 is not None:
            age = now_ns - self._t0 - self._last[i]
            if age > 0:
                decay = math.exp(-(age / self._tau))
        return self._ewma[i] * decay * (self._inflight[i] + 1) / w

    def estimate(self, i: int, /, now_ns: int) -> float:
        """The latency estimate of ``i``, ns, decayed to ``now_ns``: ``cost`` before load.

        With ``restore_estimate``, it carries an estimate over to a kernel
        rebuilt for a changed backend set, which the indices do not survive.
        """
        i = _check_index(i, self._n)
        decay = 1.0
        if self._t0 is not None:
            age = now_ns - self._t0 - self._last[i]
            if age > 0:
                decay = math.exp(-(age / self._tau))
        return self._ewma[i] * decay

    def restore_estimate(self, i: int, /, ewma_ns: float, now_ns: int) -> None:
        """Set the estimate of ``i`` to ``ewma_ns`` as of ``now_ns`` (from ``estimate``)."""
        i = _check_index(i, self._n)
        if self._t0 is None:
            self._t0 = now_ns
        now = max(0, now_ns - self._t0)
        self._ewma[i] = max(float(ewma_ns), 1.0)
        self._last[i] = now
        self._latest = max(self._latest, now)
        self._rescore(i)

    def _key(self, i: int) -> float:
        return self._score[i] + _log1k(self._inflight[i])

    def pick(self) -> int:
        best = -1
        best_key = 0.0
        for i in self._dense:
            k = self._key(i)
            if best < 0 or k < best_key:
                best = i
                best_key = k
        return best

    def pick_excluding(self, i: int, /) -> int:
        x = _excluded(i, self._n)
        best = -1
        best_key = 0.0
        for j in self._dense:
            if j != x:
                k = self._key(j)
                if best < 0 or k < best_key:
                    best = j
                    best_key = k
        return best

    def pick_p2c(self) -> int:
        dense = self._dense
        m = len(dense)
        if m == 0:
            return -1
        if m == 1:
            return dense[0]
        a, b = self._rng.two(m)
        ia = dense[a]
        ib = dense[b]
        return ib if self._key(ib) < self._key(ia) else ia

    def pick_p2c_excluding(self, i: int, /) -> int:
        i = _excluded(i, self._n)
        if not self._rotates(i):
            return self.pick_p2c()
        dense = self._dense
        m = len(dense)
        if m == 1:
            return -1
        p = bisect.bisect_left(dense, i)
        if m == 2:
            return dense[1 - p]
        a, b = self._rng.two_excluding(m, p)
        ia = dense[a]
        ib = dense[b]
        return ib if self._key(ib) < self._key(ia) else ia

    def peek_two(self, exclude: int = -1) -> tuple[int, int]:
        """The two backends the next ``pick_p2c`` compares, drawn from a copy of the
        generator: the next ``pick_p2c_excluding(exclude)``'s, with an ``exclude``.

        ``(-1, -1)`` with fewer than two in rotation besides ``exclude``.
        """
        return _peek_two(self._dense, self._rng, _excluded(exclude, self._n), True)

    def peek_p2c(self) -> int:
        """What the next ``pick_p2c()`` returns, drawn from a copy of the generator."""
        state = self._rng.state
        try:
            return self.pick_p2c()
        finally:
            self._rng.state = state

    def pick_p2c_many(self, count: int) -> int:
        total = 0
        for _ in range(count):
            total += self.pick_p2c()
        return total


# --- Consistent hashing -------------------------------------------------------


def _check_names(names: Sequence[bytes], n: int) -> tuple[bytes, ...]:
    out = tuple(names)
    if len(out) != n:
        raise ValueError(f"names and weights differ in length: {len(out)} names, {n} weights")
    for name in out:
        if not isinstance(name, bytes):
            raise TypeError(f"names must be bytes, got {type(name).__name__}")
        if not name:
            raise ValueError("names must not be empty")
    if len(set(out)) != n:
        seen: set[bytes] = set()
        for name in out:
            if name in seen:
                raise ValueError(f"duplicate name {name!r}")
            seen.add(name)
    return out


def _check_hash(h: int) -> int:
    h = operator.index(h)
    if not 0 <= h <= _M64:
        raise OverflowError(f"a hash is an unsigned 64-bit integer, got {h}")
    return h


class _HashKernel(_SeededKernel):
    """Consistent hashing for session affinity: a key's hash picks its backend.

    Each backend has a name (its address, as bytes: ``b"10.0.0.7:50051"``),
    and the structure that maps hashes to backends (a ring, a table) is built
    from the names and weights alone, walking the backends in name order, so
    it is the same whatever order they are given in and in every process.
    Weights change it (``set_weight`` rebuilds it; weight 0 takes a backend
    out of it). Eligibility does not: ``set_eligible`` is O(1), and a lookup
    that lands on an ineligible backend walks on to the next eligible one, so
    while a backend is out only its own keys move, and they come back to it
    when it returns.

    ``pick_key(key)`` is ``pick_hash(hash64(key))``; ``pick_hash(h)`` returns
    the backend for an unsigned 64-bit hash, or -1 when no backend in the
    structure is eligible; ``position(h)`` says where in the structure ``h``
    was served, for traces. ``pick()`` hashes a splitmix64 draw, so a seeded
    kernel spreads keyless calls reproducibly. ``pick_key_many(keys)`` sums
    the picks of a list of keys, in a C loop in the compiled kernel.

    ``pick_hash_excluding(h, i)`` and ``pick_key_excluding(key, i)`` are a
    retry's lookup: the walk goes past ``i``'s points or slots exactly as it
    goes past an ineligible backend's, so the answer is the backend the key
    would move to if ``i`` went out, and -1 when no backend but ``i`` is
    eligible. Nothing is toggled, so they are O(1) in ``n`` as a lookup is.
    ``pick_excluding(i)`` is the same walk from a keyless pick's draw.
    """

    def __init__(self, weights: Sequence[int], names: Sequence[bytes], seed: int | None) -> None:
        super().__init__(weights, seed)
        self._names = _check_names(names, self._n)
        # The canonical order every build walks: backend indices by name.
        self._order = sorted(range(self._n), key=self._names.__getitem__)
        self._rank = [0] * self._n
        for r, i in enumerate(self._order):
            self._rank[i] = r
        self._count = [0] * self._n  # points or slots each backend owns
        self._m = 0  # in rotation: eligible and weight > 0
        self._live = 0  # eligible and owning a point or slot: lookups find one

    def _build(self) -> None:
        raise NotImplementedError

    def _rebuild(self) -> None:
        super()._rebuild()
        self._build()
        self._m = len(self._dense)
        self._live = sum(1 for i in range(self._n) if self._elig[i] and self._count[i])

    def set_eligible(self, i: int, /, eligible: bool) -> None:
        # O(1): the structure stays; lookups walk past ineligible backends.
        i = _check_index(i, self._n)
        e = bool(eligible)
        if self._elig[i] != e:
            self._elig[i] = e
            step = 1 if e else -1
            if self._w[i] > 0:
                self._m += step
            if self._count[i] > 0:
                self._live += step

    def _locate(self, h: int) -> int:
        raise NotImplementedError

    def _owner(self, pos: int) -> int:
        raise NotImplementedError

    def _locate_excluding(self, h: int, x: int) -> int:
        """``_locate``, walking past backend ``x`` as past an ineligible one."""
        raise NotImplementedError

    def _excluding(self, h: int, x: int) -> int:
        if x < 0 or not self._elig[x] or self._count[x] == 0:
            pos = self._locate(h)
        elif self._live == 1:  # x is the only eligible backend in the structure
            pos = -1
        else:
            pos = self._locate_excluding(h, x)
        return -1 if pos < 0 else self._owner(pos)

    def pick_hash(self, h: int, /) -> int:
        pos = self._locate(_check_hash(h))
        return -1 if pos < 0 else self._owner(pos)

    def pick_hash_excluding(self, h: int, i: int, /) -> int:
        h = _check_hash(h)
        return self._excluding(h, _excluded(i, self._n))

    def pick_key(self, key: bytes, /) -> int:
        return self.pick_hash(hash64(key))

    def pick_key_excluding(self, key: bytes, i: int, /) -> int:
        return self.pick_hash_excluding(hash64(key), i)

    def pick_key_many(self, keys: Sequence[bytes], /) -> int:
        """Pick for every key in ``keys``; return the sum of the picked indices."""
        total = 0
        for key in keys:
            total += self.pick_key(key)
        return total

    def position(self, h: int, /) -> int:
        return self._locate(_check_hash(h))

    def pick(self) -> int:
        pos = self._locate(self._rng.next())
        return -1 if pos < 0 else self._owner(pos)

    def pick_excluding(self, i: int, /) -> int:
        x = _excluded(i, self._n)
        return self._excluding(self._rng.next(), x)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} n={self._n} in-rotation={self._m} "
            f"in-flight={sum(self._inflight)}>"
        )


def _ring_counts(weights: Sequence[int], min_ring_size: int, max_ring_size: int) -> list[int]:
    """Points on the ring for each weight, as Envoy's ``RingHashLoadBalancer::Ring``.

    Envoy scales the ring so the least-weighted backend gets a whole number
    of points, ``ceil(min_ring_size * least / total)``, and every other one
    proportionally more, unless that exceeds ``max_ring_size``, in which case
    the ring is ``max_ring_size`` points shared by weight. Backends get points
    by running sums (``current_hashes < target_hashes``), so fractions carry
    over to the next backend. Envoy does this in doubles; here it is exact,
    in integers, so both twins and every platform agree: the target after
    backend k is ``scale * weight_so_far / total``, and backend k gets the
    points up to its ceiling.
    """
    positive = [w for w in weights if w > 0]
    if not positive:
        return [0] * len(weights)
    total = sum(positive)
    least = min(positive)
    per_least = -(-min_ring_size * least // total)  # points of the least-weighted backend
    if per_least * total <= max_ring_size * least:  # scale = per_least * total / least
        num, den = per_least, least
    else:  # scale = max_ring_size
        num, den = max_ring_size, total
    counts = []
    so_far = done = 0
    for w in weights:
        so_far += w
        target = -(-num * so_far // den)
        counts.append(target - done)
        done = target
    return counts


class RingHash(_HashKernel):
    """Ketama consistent hashing, as Envoy's ``ring_hash`` load balancer.

    Karger et al.'s consistent hashing (STOC'97) in the form of libketama and
    Envoy's ``ring_hash_lb.cc``: every backend puts points on a ring of 64-bit
    hashes, the point of replica ``r`` at ``hash64(name + b"_" + str(r))``,
    and a key is served by the first point at or after its hash, clockwise,
    wrapping past the top. Points per backend follow weight, with Envoy's
    scaling (``_ring_counts``): between ``min_ring_size`` and ``max_ring_size``
    points in all, default 1,024 and 8M as Envoy. Points sort by (hash, name),
    so equal hashes are ordered by name, not by input order. A lookup is a
    binary search, then a walk past the points of ineligible backends.

    Adding or removing a backend moves only its own keys as long as the others
    keep their points. Envoy's scaling gives them more points when the ring
    would fall below ``min_ring_size`` (fewer backends, or a larger least
    weight), and the keys those new points take move too: with 10 equal
    backends at the defaults, dropping one moves about 10% of the others'
    keys as well. Taking a backend out with ``set_eligible`` never does.
    """

    name: ClassVar[str] = "ring_hash"

    def __init__(
        self,
        weights: Sequence[int],
        names: Sequence[bytes],
        *,
        min_ring_size: int = 1024,
        max_ring_size: int = MAX_RING_SIZE,
        seed: int | None = None,
    ) -> None:
        lo = operator.index(min_ring_size)
        hi = operator.index(max_ring_size)
        if not 1 <= lo <= hi <= MAX_RING_SIZE:
            raise ValueError(
                "ring sizes must satisfy 1 <= min_ring_size <= max_ring_size <= "
                f"{MAX_RING_SIZE}, got {lo} and {hi}"
            )
        super().__init__(weights, names, seed)
        self._min_ring = lo
        self._max_ring = hi
        self._hashes: list[int] = []  # point hashes, ascending
        self._owners: list[int] = []  # backend index, by point
        self._rebuild()

    @property
    def ring_size(self) -> int:
        return len(self._hashes)

    def _build(self) -> None:
        weights = [self._w[i] for i in self._order]
        counts = _ring_counts(weights, self._min_ring, self._max_ring)
        points: list[tuple[int, int, int, int]] = []
        for rank, i in enumerate(self._order):
            name = self._names[i]
            self._count[i] = counts[rank]
            for r in range(counts[rank]):
                points.append((hash64(b"%s_%d" % (name, r)), rank, r, i))
        points.sort()
        self._hashes = [p[0] for p in points]
        self._owners = [p[3] for p in points]

    def _locate(self, h: int) -> int:
        if self._live == 0:
            return -1
        size = len(self._hashes)
        pos = bisect.bisect_left(self._hashes, h)
        if pos == size:
            pos = 0
        while not self._elig[self._owners[pos]]:
            pos += 1
            if pos == size:
                pos = 0
        return pos

    def _locate_excluding(self, h: int, x: int) -> int:
        owners = self._owners
        size = len(self._hashes)
        pos = bisect.bisect_left(self._hashes, h)
        if pos == size:
            pos = 0
        while not self._elig[owners[pos]] or owners[pos] == x:
            pos += 1
            if pos == size:
                pos = 0
        return pos

    def _owner(self, pos: int) -> int:
        return self._owners[pos]


def is_prime(m: int) -> bool:
    """Whether ``m`` is prime, as a Maglev table's size must be.

    Arithmetic, not a kernel: it stays out of ``__all__`` (the compiled
    twin's API) and reaches config through ``lbgw.kernels.is_prime``.
    """
    if m < 2:
        return False
    d = 2
    while d * d <= m:
        if m % d == 0:
            return False
        d += 1
    return True


_is_prime = is_prime  # the name Maglev calls it by


class Maglev(_HashKernel):
    """Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
    Network Load Balancer", NSDI'16, section 3.4), as Envoy's ``maglev`` load
    balancer.

    A lookup table of ``table_size`` slots (a prime, default 65,537 as the
    paper recommends and Envoy uses) maps ``h % table_size`` to a backend.
    Every backend has a permutation of the slots, ``offset + j * skip`` with
    ``offset = hash64(name, 0) % M`` and ``skip = hash64(name, 1) % (M - 1) + 1``
    (Envoy's seeds), and the backends take turns claiming their next free
    slot until the table is full (the paper's Listing 1). Weights work as in
    Envoy's ``maglev_lb.cc``: a backend takes its turn in round ``k`` only when
    ``k * weight >= target``, and its target then grows by the largest weight,
    so the heaviest backend takes a turn every round and one of half its
    weight every other round. Envoy compares normalized weights in doubles;
    here the same comparison is exact, in integers. The backends take their
    turns in name order, which Envoy also sorts by, so the table does not
    depend on the order they are given in.

    Every backend gets close to its share of slots (1 / M apart), and a lookup
    is one modulo and one load. When a backend leaves the table (weight 0, or
    a new kernel without it), its slots go to others and a few other slots
    change hands too: Maglev trades strict minimal disruption for balance,
    and with M much larger than the backend count that extra is well under
    1% of the keys. A backend out by ``set_eligible`` keeps its slots; the
    lookup walks to the next slot whose backend is eligible, so only its own
    keys move.
    """

    name: ClassVar[str] = "maglev"

    def __init__(
        self,
        weights: Sequence[int],
        names: Sequence[bytes],
        *,
        table_size: int = 65537,
        seed: int | None = None,
    ) -> None:
        m = operator.index(table_size)
        if not (2 <= m <= MAX_TABLE_SIZE and _is_prime(m)):
            raise ValueError(f"table_size must be a prime up to {MAX_TABLE_SIZE}, got {m}")
        super().__init__(weights, names, seed)
        self._size = m
        self._offset = [hash64(name, 0) % m for name in self._names]
        self._skip = [hash64(name, 1) % (m - 1) + 1 for name in self._names]
        self._table = [-1] * m  # backend index, by slot
        self._rebuild()

    @property
    def table_size(self) -> int:
        return self._size

    def _build(self) -> None:
        m = self._size
        w = self._w
        skip = self._skip
        table = [-1] * m
        count = [0] * self._n
        entries = [i for i in self._order if w[i] > 0]
        heaviest = max((w[i] for i in entries), default=0)
        slot = list(self._offset)  # each backend's next slot in its permutation
        target = [0] * self._n
        filled = 0
        rounds = 0
        while entries and filled < m:
            rounds += 1
            for i in entries:
                if rounds * w[i] < target[i]:
                    continue
                target[i] += heaviest
                c = slot[i]
                while table[c] >= 0:
                    c += skip[i]
                    if c >= m:
                        c -= m
                table[c] = i
                c += skip[i]
                slot[i] = c - m if c >= m else c
                count[i] += 1
                filled += 1
                if filled == m:
                    break
        self._table = table
        self._count = count

    def _locate(self, h: int) -> int:
        if self._live == 0:
            return -1
        m = self._size
        pos = h % m
        while not self._elig[self._table[pos]]:
            pos += 1
            if pos == m:
                pos = 0
        return pos

    def _locate_excluding(self, h: int, x: int) -> int:
        table = self._table
        m = self._size
        pos = h % m
        while not self._elig[table[pos]] or table[pos] == x:
            pos += 1
            if pos == m:
                pos = 0
        return pos

    def _owner(self, pos: int) -> int:
        return self._table[pos]
