# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, binding=False
"""Compiled picking kernels: the code that runs on every call lbgw forwards.

Each class has a pure-Python twin of the same name and behaviour in
``lbgw.picking``; the algorithms, their sources and the rules every kernel
shares are documented there, once. This module implements them with state in
C arrays owned by the object, rebuilt when rotation or weights change, so
``pick()`` only walks prebuilt arrays: its body is a ``noexcept nogil``
function that touches no Python object, and so is that of ``pick_excluding(i)``,
a retry's pick (the twins' module docstring states its rules).
``pick_many(count)`` runs the pick body in a C loop without the GIL, which
measures the kernel without Python's call overhead. ``hash64`` (xxHash64) is
a ``nogil`` C function on a byte pointer and a length, so a kernel can hash a
key without leaving C.

Floating-point results match the twins bit for bit: the same IEEE operations
in the same order (setup.py turns off FMA contraction) and libm's ``log``,
``exp`` and ``pow``, which Python's ``math`` calls too.
"""

cimport cython
from cpython.object cimport PyObject
from libc.math cimport exp, log, pow
from libc.stdint cimport INT64_MIN, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, qsort
from libc.string cimport memcpy

import operator
import os

MAX_BACKENDS = 1 << 20
MAX_WEIGHT = 1 << 24
MAX_ACTIVE_REQUEST_BIAS = 10.0
EDF_THRESHOLD = 64
MAX_RING_SIZE = 8_388_608
MAX_TABLE_SIZE = 5_000_011

cdef enum:
    _LOGTAB_SIZE = 256
    _REJECT_TRIES = 4  # ordinary picks Random.pick_excluding tries before its direct draw
cdef double _LOGTAB[_LOGTAB_SIZE]
cdef int _k
for _k in range(_LOGTAB_SIZE):
    _LOGTAB[_k] = log(_k + 1.0)


cdef extern from "Python.h":
    Py_ssize_t PyNumber_AsSsize_t(object o, PyObject *exc) except? -1
    # Borrowed references, for pick_key_many's loop over a list of keys.
    PyObject *_list_item "PyList_GET_ITEM"(object lst, Py_ssize_t i)
    bint _is_bytes "PyBytes_CheckExact"(PyObject *o)
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *o)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject *o)


cdef extern from *:
    """
    #include <string.h>
    static inline uint64_t lbgw_mulhi64(uint64_t a, uint64_t b) {
        return (uint64_t)(((unsigned __int128)a * b) >> 64);
    }
    /* ceil(a * b / c), exact; the caller knows the result fits in 64 bits. */
    static inline uint64_t lbgw_ceil_muldiv(uint64_t a, uint64_t b, uint64_t c) {
        return (uint64_t)(((unsigned __int128)a * b + (c - 1)) / c);
    }
    /* Little-endian loads at any alignment, as xxHash64 reads its input. */
    static inline uint64_t lbgw_le64(const unsigned char *p) {
        uint64_t v;
        memcpy(&v, p, sizeof v);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline uint32_t lbgw_le32(const unsigned char *p) {
        uint32_t v;
        memcpy(&v, p, sizeof v);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap32(v);
    #endif
        return v;
    }
    /* xxHash64's primes. */
    #define LBGW_XXH_P1 0x9E3779B185EBCA87ULL
    #define LBGW_XXH_P2 0xC2B2AE3D27D4EB4FULL
    #define LBGW_XXH_P3 0x165667B19E3779F9ULL
    #define LBGW_XXH_P4 0x85EBCA77C2B2AE63ULL
    #define LBGW_XXH_P5 0x27D4EB2F165667C5ULL
    """
    uint64_t lbgw_mulhi64(uint64_t a, uint64_t b) nogil
    uint64_t lbgw_ceil_muldiv(uint64_t a, uint64_t b, uint64_t c) nogil
    uint64_t lbgw_le64(const unsigned char *p) nogil
    uint32_t lbgw_le32(const unsigned char *p) nogil
    uint64_t _XXH_P1 "LBGW_XXH_P1"
    uint64_t _XXH_P2 "LBGW_XXH_P2"
    uint64_t _XXH_P3 "LBGW_XXH_P3"
    uint64_t _XXH_P4 "LBGW_XXH_P4"
    uint64_t _XXH_P5 "LBGW_XXH_P5"


cdef inline uint64_t _next(uint64_t *state) noexcept nogil:
    """splitmix64."""
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _xxh_round(uint64_t acc, uint64_t lane) noexcept nogil:
    return _rotl(acc + lane * _XXH_P2, 31) * _XXH_P1


cdef inline uint64_t _xxh_merge(uint64_t h, uint64_t v) noexcept nogil:
    return (h ^ _xxh_round(0, v)) * _XXH_P1 + _XXH_P4


cdef uint64_t xxh64(const unsigned char *p, size_t n, uint64_t seed) noexcept nogil:
    """xxHash64 (Yann Collet) of the ``n`` bytes at ``p``; the twin ``lbgw.picking.hash64``."""
    cdef const unsigned char *end = p + n
    cdef uint64_t h, v1, v2, v3, v4
    if n >= 32:
        v1 = seed + _XXH_P1 + _XXH_P2
        v2 = seed + _XXH_P2
        v3 = seed
        v4 = seed - _XXH_P1
        while end - p >= 32:
            v1 = _xxh_round(v1, lbgw_le64(p))
            v2 = _xxh_round(v2, lbgw_le64(p + 8))
            v3 = _xxh_round(v3, lbgw_le64(p + 16))
            v4 = _xxh_round(v4, lbgw_le64(p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _xxh_merge(h, v1)
        h = _xxh_merge(h, v2)
        h = _xxh_merge(h, v3)
        h = _xxh_merge(h, v4)
    else:
        h = seed + _XXH_P5
    h += <uint64_t>n
    while end - p >= 8:
        h ^= _xxh_round(0, lbgw_le64(p))
        h = _rotl(h, 27) * _XXH_P1 + _XXH_P4
        p += 8
    if end - p >= 4:
        h ^= <uint64_t>lbgw_le32(p) * _XXH_P1
        h = _rotl(h, 23) * _XXH_P2 + _XXH_P3
        p += 4
    while p < end:
        h ^= <uint64_t>p[0] * _XXH_P5
        h = _rotl(h, 11) * _XXH_P1
        p += 1
    h ^= h >> 33
    h *= _XXH_P2
    h ^= h >> 29
    h *= _XXH_P3
    return h ^ (h >> 32)


def hash64(bytes data not None, seed=0):
    """xxHash64 of ``data``, an unsigned 64-bit int; ``seed`` is taken modulo 2**64."""
    cdef uint64_t s = operator.index(seed) & 0xFFFFFFFFFFFFFFFF
    return xxh64(<const unsigned char *>data, len(data), s)


cdef inline uint64_t _below(uint64_t *state, uint64_t bound) noexcept nogil:
    """A draw in [0, bound) by Lemire's multiply-high."""
    return lbgw_mulhi64(_next(state), bound)


ctypedef fused _Entry:
    _Slot
    _Due


cdef inline bint _before(_Entry *a, _Entry *b) noexcept nogil:
    """Whether heap entry a is due before b. No branches: the sift selects with it."""
    cdef uint64_t lhs, rhs
    if _Entry is _Slot:
        # Deadlines u / 2w, compared exactly; ties to the lower index.
        lhs = <uint64_t>a.u * b.w
        rhs = <uint64_t>b.u * a.w
        return (lhs < rhs) | ((lhs == rhs) & (a.i < b.i))
    else:
        return (a.deadline < b.deadline) | ((a.deadline == b.deadline) & (a.order < b.order))


cdef inline void _sift(_Entry *heap, Py_ssize_t m, Py_ssize_t h) noexcept nogil:
    """Restore the order of a binary min-heap of m entries below position h.

    Both EDF heaps are sifted bottom-up (Floyd; Wegener's "bottom-up
    heapsort"): the entry at h descends along the earlier child to a leaf, one
    comparison a level and chosen without a branch, then climbs back to its
    place, which after a pick is near the bottom. This halves the comparisons
    of the textbook sift and takes the unpredictable branches out of the loop.
    Measured at n = 1,024: 50 ns a pick, against 53 ns for the textbook sift
    without branches, 62 ns for a 4-ary heap without and 85 ns for a 4-ary
    heap with them.
    """
    cdef Py_ssize_t top = h, c, p
    cdef _Entry item = heap[h]
    while True:
        c = 2 * h + 1
        if c >= m:
            break
        if c + 1 < m:
            c += _before(&heap[c + 1], &heap[c])
        heap[h] = heap[c]
        h = c
    while h > top:
        p = (h - 1) // 2
        if not _before(&item, &heap[p]):
            break
        heap[h] = heap[p]
        h = p
    heap[h] = item


cdef inline void _two(uint64_t *state, Py_ssize_t m, Py_ssize_t *a, Py_ssize_t *b) noexcept nogil:
    """Two distinct draws in [0, m), m >= 2: the second skips over the first."""
    a[0] = <Py_ssize_t>_below(state, <uint64_t>m)
    b[0] = <Py_ssize_t>_below(state, <uint64_t>(m - 1))
    if b[0] >= a[0]:
        b[0] += 1


cdef inline void _two_excluding(
    uint64_t *state, Py_ssize_t m, Py_ssize_t p, Py_ssize_t *a, Py_ssize_t *b
) noexcept nogil:
    """Two distinct draws in [0, m) other than p, m >= 3: two in [0, m - 1), moved past p."""
    _two(state, m - 1, a, b)
    a[0] += a[0] >= p
    b[0] += b[0] >= p


cdef inline Py_ssize_t _dense_pos(const int32_t *dense, Py_ssize_t m, Py_ssize_t i) noexcept nogil:
    """Where backend i is in an ascending dense array of m, or would be (binary search)."""
    cdef Py_ssize_t lo = 0, hi = m, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if dense[mid] < i:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef tuple _peek_two(const int32_t *dense, Py_ssize_t m, uint64_t state, Py_ssize_t x, bint p2c):
    """The pair a P2C pick over dense would draw next, skipping backend x (-1: none), from a
    copy of the generator's state; (-1, -1) when it would draw none (p2c false: no P2C)."""
    cdef Py_ssize_t a, b, p = _dense_pos(dense, m, x) if x >= 0 else m
    if p < m and dense[p] == x:
        if m < 3 or not p2c:
            return (-1, -1)
        _two_excluding(&state, m, p, &a, &b)
    else:
        if m < 2 or not p2c:
            return (-1, -1)
        _two(&state, m, &a, &b)
    return (dense[a], dense[b])


cdef inline double _log1k(int64_t k) noexcept nogil:
    return _LOGTAB[k] if k < _LOGTAB_SIZE else log(<double>(k + 1))


cdef uint64_t _seed_value(object seed):
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    return operator.index(seed) & 0xFFFFFFFFFFFFFFFF


cdef int64_t _check_weight(object weight) except -1:
    w = operator.index(weight)
    if not 0 <= w <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer in [0, {MAX_WEIGHT}], got {w}")
    return w


cdef void* _calloc(Py_ssize_t count, size_t size) except NULL:
    cdef void *p = calloc(count if count > 0 else 1, size)
    if p == NULL:
        raise MemoryError()
    return p


cdef class _Kernel:
    """Weights, eligibility, in-flight counts and the dense rotation array."""

    def __dealloc__(self):
        free(self._w)
        free(self._elig)
        free(self._inflight)
        free(self._dense)
        free(self._dw)

    cdef Py_ssize_t _alloc(self, object count) except -1:
        """Allocate the shared arrays for ``count`` backends; return the count.

        The subclass allocates its own arrays next and only then sets ``_n``:
        until every allocation has succeeded the kernel has no backends, so a
        MemoryError half-way leaves an object that is empty, not one that
        reads through a NULL pointer.
        """
        if self._w != NULL:
            raise TypeError(f"{type(self).__name__} is already initialised")
        n = operator.index(count)
        if not 0 <= n <= MAX_BACKENDS:
            raise ValueError(f"n must be in [0, {MAX_BACKENDS}], got {n}")
        self._w = <int64_t *>_calloc(n, sizeof(int64_t))
        self._elig = <uint8_t *>_calloc(n, sizeof(uint8_t))
        self._inflight = <int64_t *>_calloc(n, sizeof(int64_t))
        self._dense = <int32_t *>_calloc(n, sizeof(int32_t))
        self._dw = <int64_t *>_calloc(n, sizeof(int64_t))
        cdef Py_ssize_t i
        for i in range(n):
            self._elig[i] = 1
        return n

    cdef void _rebuild(self) noexcept:
        cdef Py_ssize_t i, m = 0
        for i in range(self._n):
            if self._elig[i] and self._w[i] > 0:
                self._dense[m] = <int32_t>i
                self._dw[m] = self._w[i]
                m += 1
        self._m = m

    cdef Py_ssize_t _index(self, object i) except -1:
        # With no exception type, an index beyond Py_ssize_t saturates (and so
        # fails the range check) instead of raising OverflowError.
        cdef Py_ssize_t j = PyNumber_AsSsize_t(i, NULL)
        if j < 0 or j >= self._n:
            raise IndexError(f"backend index {i} out of range for {self._n} backends")
        return j

    cdef Py_ssize_t _excluded(self, object i) except? -2:
        # An index beyond Py_ssize_t saturates, as in _index, and so excludes nothing.
        cdef Py_ssize_t j = PyNumber_AsSsize_t(i, NULL)
        return j if 0 <= j < self._n else -1

    cdef bint _rotates(self, Py_ssize_t i) noexcept nogil:
        return i >= 0 and self._elig[i] and self._w[i] > 0

    @property
    def n(self):
        return self._n

    def set_eligible(self, index, bint eligible):
        cdef Py_ssize_t i = self._index(index)
        if self._elig[i] != eligible:
            self._elig[i] = eligible
            self._rebuild()

    def is_eligible(self, index):
        cdef Py_ssize_t i = self._index(index)
        return bool(self._elig[i])

    def set_weight(self, index, weight):
        cdef Py_ssize_t i = self._index(index)
        cdef int64_t w = _check_weight(weight)
        if self._w[i] != w:
            self._w[i] = w
            self._rebuild()

    def weight(self, index):
        cdef Py_ssize_t i = self._index(index)
        return self._w[i]

    def started(self, index):
        cdef Py_ssize_t i = self._index(index)
        self._inflight[i] += 1

    def finished(self, index):
        cdef Py_ssize_t i = self._index(index)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1

    def in_flight(self, index):
        cdef Py_ssize_t i = self._index(index)
        return self._inflight[i]

    def observe(self, index, int64_t rtt_ns, int64_t now_ns):
        cdef Py_ssize_t i = self._index(index)

    def __repr__(self):
        cdef int64_t in_flight = 0
        cdef Py_ssize_t i
        for i in range(self._n):
            in_flight += self._inflight[i]
        return (
            f"<{type(self).__name__} {self.name} n={self._n} in-rotation={self._m} "
            f"in-flight={in_flight}>"
        )


@cython.final
cdef class SmoothWeightedRoundRobin(_Kernel):
    """nginx's smooth weighted round-robin; an EDF heap from ``edf_threshold`` backends."""

    name = "swrr"

    def __dealloc__(self):
        free(self._cur)
        free(self._dcur)
        free(self._heap)
        free(self._ui)

    def __init__(self, weights, *, Py_ssize_t edf_threshold=EDF_THRESHOLD):
        ws = [_check_weight(w) for w in weights]
        cdef Py_ssize_t size = self._alloc(len(ws))
        self._cur = <int64_t *>_calloc(size, sizeof(int64_t))
        self._dcur = <int64_t *>_calloc(size, sizeof(int64_t))
        self._heap = <_Slot *>_calloc(size, sizeof(_Slot))
        self._ui = <uint32_t *>_calloc(size, sizeof(uint32_t))
        self._n = size
        self._t_num = 0
        self._t_den = 1
        cdef Py_ssize_t i
        for i in range(self._n):
            self._w[i] = ws[i]
        self._edf = self._n >= edf_threshold
        self._rebuild()

    @property
    def scheduler(self):
        return "edf" if self._edf else "swrr"

    def current_weight(self, i):
        """nginx's current weight of backend ``i`` (the scan's; 0 under the EDF scheduler)."""
        cdef Py_ssize_t j = self._index(i)
        if self._edf:
            return 0
        if not self._rotates(j):
            return self._cur[j]
        # The scan keeps it by dense position; _dense is ascending.
        return self._dcur[_dense_pos(self._dense, self._m, j)]

    cdef void _rebuild(self) noexcept:
        cdef Py_ssize_t i, j, h
        cdef int64_t w, u
        # Keep each backend's current weight across the change, as nginx does,
        # and each EDF entry's deadline (see the twin for why).
        for j in range(self._m):
            self._cur[self._dense[j]] = self._dcur[j]
        if self._edf:
            # An entry scheduled with another weight than the backend's now is
            # dropped, so the backend is rescheduled below.
            for h in range(self._m):
                i = self._heap[h].i
                self._ui[i] = self._heap[h].u if self._heap[h].w == self._w[i] else 0
        _Kernel._rebuild(self)
        self._total = 0
        for j in range(self._m):
            self._dcur[j] = self._cur[self._dense[j]]
            self._total += self._dw[j]
        if not self._edf:
            return
        for i in range(self._n):
            if not (self._elig[i] and self._w[i] > 0):
                self._ui[i] = 0
        for j in range(self._m):
            i = self._dense[j]
            w = self._dw[j]
            if self._ui[i] == 0:
                # The first odd u with u / 2w after t.
                u = (2 * w * self._t_num) // self._t_den + 1
                self._ui[i] = <uint32_t>(u if u % 2 else u + 1)
            self._heap[j].u = self._ui[i]
            self._heap[j].w = <uint32_t>w
            self._heap[j].i = <int32_t>i
        for h in range(self._m // 2 - 1, -1, -1):
            _sift(self._heap, self._m, h)
        self._rebase_if_due()

    cdef void _rebase_if_due(self) noexcept nogil:
        """Once every deadline is at least 1, move them all back by 1."""
        cdef Py_ssize_t h
        if self._m > 0 and self._heap[0].u >= 2 * self._heap[0].w:
            for h in range(self._m):
                self._heap[h].u -= 2 * self._heap[h].w
            self._t_num = self._t_num - self._t_den if self._t_num > self._t_den else 0

    cdef int _pick(self) noexcept nogil:
        cdef Py_ssize_t m = self._m, j, best
        cdef int64_t c, best_cur
        cdef int32_t top
        if m == 0:
            return -1
        if self._edf:
            top = self._heap[0].i
            self._t_num = self._heap[0].u
            self._t_den = 2 * <int64_t>self._heap[0].w
            self._heap[0].u += 2
            _sift(self._heap, m, 0)
            self._rebase_if_due()
            return top
        cdef int64_t *cur = self._dcur
        cdef int64_t *dw = self._dw
        best = 0
        best_cur = cur[0] + dw[0]
        cur[0] = best_cur
        for j in range(1, m):
            c = cur[j] + dw[j]
            cur[j] = c
            if c > best_cur:
                best = j
                best_cur = c
        cur[best] = best_cur - self._total
        return self._dense[best]

    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil:
        """A pick that skips i but keeps its share (nginx's scan, Envoy's EDF; see the twin)."""
        cdef Py_ssize_t m = self._m, j, h, p, best = -1
        cdef int64_t c, best_cur = INT64_MIN
        cdef int32_t top
        if not self._rotates(i):
            return self._pick()
        if m == 1:
            return -1
        if self._edf:
            if self._heap[0].i != i:
                return self._pick()
            # i is due first: serve the earlier of the top's children instead.
            h = 1
            if m > 2:
                h += _before(&self._heap[2], &self._heap[1])
            top = self._heap[h].i
            self._t_num = self._heap[h].u
            self._t_den = 2 * <int64_t>self._heap[h].w
            self._heap[h].u += 2
            _sift(self._heap, m, h)
            self._rebase_if_due()
            return top
        # Every backend accrues, i too; only the choice skips i's dense position.
        cdef int64_t *cur = self._dcur
        cdef int64_t *dw = self._dw
        p = _dense_pos(self._dense, m, i)
        for j in range(m):
            c = cur[j] + dw[j]
            cur[j] = c
            if c > best_cur and j != p:
                best = j
                best_cur = c
        cur[best] = best_cur - self._total
        return self._dense[best]

    def pick(self):
        return self._pick()

    def pick_excluding(self, i):
        return self._pick_excluding(self._excluded(i))

    def pick_many(self, Py_ssize_t count):
        return _pick_many(self, count)

    def peek(self):
        """What the next ``pick()`` returns, without moving the schedule (``/explain``)."""
        cdef Py_ssize_t m = self._m, j, best = 0
        cdef int64_t c, best_cur
        if m == 0:
            return -1
        if self._edf:
            return self._heap[0].i
        best_cur = self._dcur[0] + self._dw[0]
        for j in range(1, m):
            c = self._dcur[j] + self._dw[j]
            if c > best_cur:
                best = j
                best_cur = c
        return self._dense[best]


@cython.final
cdef class RoundRobin(_Kernel):
    """Plain round robin over the backends in rotation, in index order."""

    name = "round_robin"

    def __init__(self, n):
        self._last = -1
        self._next = 0
        self._resume = 0
        cdef Py_ssize_t size = self._alloc(n)
        self._n = size
        cdef Py_ssize_t i
        for i in range(self._n):
            self._w[i] = 1
        self._rebuild()

    cdef void _rebuild(self) noexcept:
        _Kernel._rebuild(self)
        cdef Py_ssize_t pos
        self._next = 0
        self._stop = self._m
        self._resume = 0
        for pos in range(self._m):
            if self._dense[pos] > self._last:
                self._next = pos
                break

    cdef int _pick(self) noexcept nogil:
        if self._m == 0:
            return -1
        cdef int32_t i = self._dense[self._next]
        # One store of _next, the others only at _stop: measured against the old
        # `if _next == _m: _next = 0`, a branch with all three stores or an out-of-line
        # call cost pick_many up to 0.2 ns a pick at n = 3; this, under 0.04.
        cdef Py_ssize_t nxt = self._next + 1
        if nxt == self._stop:  # the end (wrap to _resume, 0), or a jump's origin
            nxt = self._resume
            self._resume = 0
            self._stop = self._m
        self._next = nxt
        self._last = i
        return i

    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil:
        """If i is next, serve the first turn after it not yet taken and keep i next."""
        cdef Py_ssize_t m = self._m, p = self._next, q
        if not self._rotates(i):
            return self._pick()
        if m == 1:
            return -1
        if self._dense[p] != i:
            return self._pick()
        if self._stop != m or self._resume != 0:  # a jump is due: turns after i are taken
            q = self._resume
        else:
            q = p + 1 if p + 1 < m else 0
        if q == p:  # every other backend's turn is taken: an extra turn for the next one
            return self._dense[p + 1 if p + 1 < m else 0]
        self._resume = q + 1 if q + 1 < m else 0
        self._stop = p + 1
        return self._dense[q]

    def pick(self):
        return self._pick()

    def pick_excluding(self, i):
        return self._pick_excluding(self._excluded(i))

    def pick_many(self, Py_ssize_t count):
        return _pick_many(self, count)

    def peek(self):
        """What the next ``pick()`` returns, without taking the turn (``/explain``)."""
        return self._dense[self._next] if self._m > 0 else -1


cdef class _SeededKernel(_Kernel):
    """A kernel that draws random numbers: seeded for reproducible picks, else from urandom."""

    def seed(self, seed):
        self._rng = _seed_value(seed)


@cython.final
cdef class Random(_SeededKernel):
    """Uniform or weighted (alias method) random picks."""

    name = "random"

    def __dealloc__(self):
        free(self._prob)
        free(self._alias)
        free(self._scaled)
        free(self._small)
        free(self._large)

    def __init__(self, weights, *, seed=None):
        ws = [_check_weight(w) for w in weights]
        cdef Py_ssize_t size = self._alloc(len(ws))
        self._prob = <int64_t *>_calloc(size, sizeof(int64_t))
        self._alias = <int32_t *>_calloc(size, sizeof(int32_t))
        self._scaled = <int64_t *>_calloc(size, sizeof(int64_t))
        self._small = <int32_t *>_calloc(size, sizeof(int32_t))
        self._large = <int32_t *>_calloc(size, sizeof(int32_t))
        self._n = size
        cdef Py_ssize_t i
        for i in range(self._n):
            self._w[i] = ws[i]
        self._rng = _seed_value(seed)
        self._rebuild()


    cdef void _rebuild(self) noexcept:
        _Kernel._rebuild(self)
        cdef Py_ssize_t m = self._m, j
        cdef int64_t total = 0
        self._uniform = True
        for j in range(m):
            total += self._dw[j]
            if self._dw[j] != self._dw[0]:
                self._uniform = False
        self._total = total
        # Vose's alias method in integers: column capacity `total`, weights scaled by m.
        cdef int64_t *scaled = self._scaled
        cdef int32_t *small = self._small
        cdef int32_t *large = self._large
        cdef Py_ssize_t ns = 0, nl = 0
        cdef int32_t s, g
        for j in range(m):
            self._prob[j] = total
            self._alias[j] = <int32_t>j
            scaled[j] = self._dw[j] * m
            if scaled[j] < total:
                small[ns] = <int32_t>j
                ns += 1
        for j in range(m):
            if scaled[j] >= total:
                large[nl] = <int32_t>j
                nl += 1
        while ns > 0 and nl > 0:
            ns -= 1
            s = small[ns]
            nl -= 1
            g = large[nl]
            self._prob[s] = scaled[s]
            self._alias[s] = g
            scaled[g] -= total - scaled[s]
            if scaled[g] < total:
                small[ns] = g
                ns += 1
            else:
                large[nl] = g
                nl += 1

    cdef int _pick(self) noexcept nogil:
        cdef Py_ssize_t m = self._m
        if m == 0:
            return -1
        cdef Py_ssize_t col = <Py_ssize_t>_below(&self._rng, <uint64_t>m)
        if self._uniform:
            return self._dense[col]
        if <int64_t>_below(&self._rng, <uint64_t>self._total) < self._prob[col]:
            return self._dense[col]
        return self._dense[self._alias[col]]

    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil:
        """A draw conditioned on "not i": direct when uniform, else rejection, then a walk."""
        cdef Py_ssize_t m = self._m, col, j, t
        cdef int k
        cdef int64_t r
        if not self._rotates(i):
            return self._pick()
        if m == 1:
            return -1
        if self._uniform:
            col = <Py_ssize_t>_below(&self._rng, <uint64_t>(m - 1))
            col += col >= _dense_pos(self._dense, m, i)
            return self._dense[col]
        for t in range(_REJECT_TRIES):
            k = self._pick()
            if k != i:
                return k
        r = <int64_t>_below(&self._rng, <uint64_t>(self._total - self._w[i]))
        for j in range(m):
            if self._dense[j] != i:
                if r < self._dw[j]:
                    return self._dense[j]
                r -= self._dw[j]
        return -1  # unreachable: r < the others' total weight

    def pick(self):
        return self._pick()

    def pick_excluding(self, i):
        return self._pick_excluding(self._excluded(i))

    def pick_many(self, Py_ssize_t count):
        return _pick_many(self, count)

    def peek(self):
        """What the next ``pick()`` returns, from a copy of the generator (``/explain``)."""
        cdef uint64_t state = self._rng
        try:
            return self.pick()
        finally:
            self._rng = state


@cython.final
cdef class LeastRequest(_SeededKernel):
    """Envoy's least_request: P2C on in-flight counts, or EDF on load-scaled weights."""

    name = "least_request"

    def __dealloc__(self):
        free(self._heap)
        free(self._saved)

    def __init__(self, weights, *, double active_request_bias=1.0, seed=None):
        if not 0.0 <= active_request_bias <= MAX_ACTIVE_REQUEST_BIAS:
            raise ValueError(
                f"active_request_bias must be in [0, {MAX_ACTIVE_REQUEST_BIAS}], "
                f"got {active_request_bias!r}"
            )
        ws = [_check_weight(w) for w in weights]
        cdef Py_ssize_t size = self._alloc(len(ws))
        self._heap = <_Due *>_calloc(size, sizeof(_Due))
        self._saved = <_Due *>_calloc(size, sizeof(_Due))
        self._n = size
        cdef Py_ssize_t i
        for i in range(self._n):
            self._w[i] = ws[i]
            self._saved[i].i = -1
        self._bias = active_request_bias
        self._rng = _seed_value(seed)
        self._rebuild()


    cdef double _eff_weight(self, Py_ssize_t i) noexcept nogil:
        cdef double w = <double>self._w[i]
        cdef double active = <double>(self._inflight[i] + 1)
        if self._bias == 1.0:
            return w / active
        if self._bias == 0.0:
            return w
        return w / pow(active, self._bias)

    cdef _Due _due(self, Py_ssize_t i) noexcept nogil:
        """Backend i's next entry: due one load-scaled weight's interval from now."""
        cdef _Due item
        item.deadline = self._now + 1.0 / self._eff_weight(i)
        item.order = self._order
        item.i = <int32_t>i
        self._order += 1
        return item

    cdef void _rebuild(self) noexcept:
        cdef Py_ssize_t i, j
        # Keep the entries of the backends that stay (see the twin for why).
        for j in range(self._hsize):
            self._saved[self._heap[j].i] = self._heap[j]
        _Kernel._rebuild(self)
        for i in range(self._n):
            if not (self._elig[i] and self._w[i] > 0):
                self._saved[i].i = -1
        self._equal = True
        for j in range(self._m):
            if self._dw[j] != self._dw[0]:
                self._equal = False
        self._hsize = 0
        if not self._equal:
            for j in range(self._m):
                i = self._dense[j]
                self._heap[j] = self._due(i) if self._saved[i].i < 0 else self._saved[i]
            self._hsize = self._m
            for j in range(self._m // 2 - 1, -1, -1):
                _sift(self._heap, self._m, j)

    cdef int _pick(self) noexcept nogil:
        cdef Py_ssize_t m = self._m, a, b
        cdef int32_t ia, ib
        if m == 0:
            return -1
        if self._equal:
            if m == 1:
                return self._dense[0]
            _two(&self._rng, m, &a, &b)
            ia = self._dense[a]
            ib = self._dense[b]
            return ib if self._inflight[ib] < self._inflight[ia] else ia
        ia = self._heap[0].i
        self._now = self._heap[0].deadline
        self._heap[0] = self._due(ia)
        _sift(self._heap, m, 0)
        return ia

    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil:
        """P2C among the others, or the earliest EDF entry not i's (see the twin)."""
        cdef Py_ssize_t m = self._m, a, b, p, h
        cdef int32_t ia, ib
        if not self._rotates(i):
            return self._pick()
        if m == 1:
            return -1
        if self._equal:
            p = _dense_pos(self._dense, m, i)
            if m == 2:
                return self._dense[1 - p]
            _two_excluding(&self._rng, m, p, &a, &b)
            ia = self._dense[a]
            ib = self._dense[b]
            return ib if self._inflight[ib] < self._inflight[ia] else ia
        if self._heap[0].i != i:
            return self._pick()
        # i's entry is due first: serve the earlier of the top's children instead.
        h = 1
        if m > 2:
            h += _before(&self._heap[2], &self._heap[1])
        ia = self._heap[h].i
        self._now = self._heap[h].deadline
        self._heap[h] = self._due(ia)
        _sift(self._heap, m, h)
        return ia

    def peek_two(self, exclude=-1):
        """The two backends the next pick compares, drawn from a copy of the generator:
        the next ``pick_excluding(exclude)``'s, or the next ``pick()``'s with no ``exclude``.

        ``(-1, -1)`` when that pick compares no two: fewer than two in rotation
        besides ``exclude``, or unequal weights, where the EDF schedule picks.
        """
        return _peek_two(self._dense, self._m, self._rng, self._excluded(exclude), self._equal)

    def pick(self):
        return self._pick()

    def pick_excluding(self, i):
        return self._pick_excluding(self._excluded(i))

    def pick_many(self, Py_ssize_t count):
        return _pick_many(self, count)

    def peek(self):
        """What the next ``pick()`` returns, without drawing or moving the schedule."""
        cdef uint64_t state = self._rng
        if self._m > 0 and not self._equal:
            return self._heap[0].i
        try:
            return self._pick()
        finally:
            self._rng = state


@cython.final
cdef class PeakEwma(_SeededKernel):
    """Peak EWMA ("least response time"): lowest ewma × (in-flight + 1) / weight."""

    name = "ewma"

    def __dealloc__(self):
        free(self._ewma)
        free(self._last)
        free(self._score)
        free(self._inrot)

    def __init__(self, n, double decay_s=10.0, double default_rtt_s=0.03, *, seed=None):
        if not (decay_s > 0.0 and decay_s != float("inf")):
            raise ValueError(f"decay_s must be a positive number of seconds, got {decay_s!r}")
        if not (default_rtt_s > 0.0 and default_rtt_s != float("inf")):
            raise ValueError(
                f"default_rtt_s must be a positive number of seconds, got {default_rtt_s!r}"
            )
        cdef Py_ssize_t size = self._alloc(n)
        self._ewma = <double *>_calloc(size, sizeof(double))
        self._last = <int64_t *>_calloc(size, sizeof(int64_t))
        self._score = <double *>_calloc(size, sizeof(double))
        self._inrot = <uint8_t *>_calloc(size, sizeof(uint8_t))
        self._n = size
        self._tau = decay_s * 1e9
        self._default = default_rtt_s * 1e9
        self._rng = _seed_value(seed)
        self._has_t0 = False
        self._latest = 0
        cdef Py_ssize_t i
        for i in range(self._n):
            self._w[i] = 1
        self._rebuild()

    cdef void _rebuild(self) noexcept:
        _Kernel._rebuild(self)
        cdef Py_ssize_t i, j
        # A backend entering rotation starts afresh at the default estimate.
        for j in range(self._m):
            i = self._dense[j]
            if not self._inrot[i]:
                self._ewma[i] = self._default
                self._last[i] = self._latest
                self._rescore(i)
        for i in range(self._n):
            self._inrot[i] = 0
        for j in range(self._m):
            self._inrot[self._dense[j]] = 1


    def set_weight(self, index, weight):
        _Kernel.set_weight(self, index, weight)
        self._rescore(self._index(index))

    cdef void _rescore(self, Py_ssize_t i) noexcept nogil:
        cdef double lw = log(<double>self._w[i]) if self._w[i] > 0 else 0.0
        self._score[i] = log(self._ewma[i]) + <double>self._last[i] / self._tau - lw

    def observe(self, index, int64_t rtt_ns, int64_t now_ns):
        cdef Py_ssize_t i = self._index(index)
        if not self._has_t0:
            self._t0 = now_ns
            self._has_t0 = True
        cdef int64_t now = now_ns - self._t0
        if now < self._last[i]:
            now = self._last[i]
        cdef double rtt = <double>rtt_ns if rtt_ns >= 1 else 1.0
        cdef double ewma = self._ewma[i], w
        if rtt > ewma:
            ewma = rtt
        else:
            w = exp(-(<double>(now - self._last[i]) / self._tau))
            ewma = ewma * w + rtt * (1.0 - w)
            if ewma < 1.0:
                ewma = 1.0
        self._ewma[i] = ewma
        self._last[i] = now
        if now > self._latest:
            self._latest = now
        self._rescore(i)

    def cost(self, index, int64_t now_ns):
        """The cost ``pick`` compares, in nanoseconds, as of ``now_ns``."""
        cdef Py_ssize_t i = self._index(index)
        if self._w[i] == 0:
            return float("inf")
        cdef double decay = 1.0
        cdef int64_t age
        if self._has_t0:
            age = now_ns - self._t0 - self._last[i]
            if age > 0:
                decay = exp(-(<double>age / self._tau))
        return self._ewma[i] * decay * <double>(self._inflight[i] + 1) / <double>self._w[i]

    def estimate(self, index, int64_t now_ns):
        """The latency estimate of ``index``, ns, decayed to ``now_ns``: ``cost`` before load.

        With ``restore_estimate``, it carries an estimate over to a kernel
        rebuilt for a changed backend set, which the indices do not survive.
        """
        cdef Py_ssize_t i = self._index(index)
        cdef double decay = 1.0
        cdef int64_t age
        if self._has_t0:
            age = now_ns - self._t0 - self._last[i]
            if age > 0:
                decay = exp(-(<double>age / self._tau))
        return self._ewma[i] * decay

    def restore_estimate(self, index, double ewma_ns, int64_t now_ns):
        """Set the estimate of ``index`` to ``ewma_ns`` as of ``now_ns`` (from ``estimate``)."""
        cdef Py_ssize_t i = self._index(index)
        if not self._has_t0:
            self._t0 = now_ns
            self._has_t0 = True
        cdef int64_t now = now_ns - self._t0
        if now < 0:
            now = 0
        self._ewma[i] = ewma_ns if ewma_ns >= 1.0 else 1.0
        self._last[i] = now
        if now > self._latest:
            self._latest = now
        self._rescore(i)

    cdef int _pick(self) noexcept nogil:
        cdef Py_ssize_t m = self._m, j
        cdef int32_t i, best
        cdef double key, best_key
        if m == 0:
            return -1
        best = self._dense[0]
        best_key = self._score[best] + _log1k(self._inflight[best])
        for j in range(1, m):
            i = self._dense[j]
            key = self._score[i] + _log1k(self._inflight[i])
            if key < best_key:
                best = i
                best_key = key
        return best

    cdef int _pick_p2c(self) noexcept nogil:
        cdef Py_ssize_t m = self._m, a, b
        cdef int32_t ia, ib
        if m == 0:
            return -1
        if m == 1:
            return self._dense[0]
        _two(&self._rng, m, &a, &b)
        ia = self._dense[a]
        ib = self._dense[b]
        if self._score[ib] + _log1k(self._inflight[ib]) < self._score[ia] + _log1k(self._inflight[ia]):
            return ib
        return ia

    cdef int _pick_excluding(self, Py_ssize_t x) noexcept nogil:
        """The lowest cost over the backends in rotation other than x."""
        cdef Py_ssize_t m = self._m, j
        cdef int32_t i, best = -1
        cdef double key, best_key = 0.0
        for j in range(m):
            i = self._dense[j]
            if i != x:
                key = self._score[i] + _log1k(self._inflight[i])
                if best < 0 or key < best_key:
                    best = i
                    best_key = key
        return best

    cdef int _pick_p2c_excluding(self, Py_ssize_t i) noexcept nogil:
        """P2C among the backends in rotation other than i."""
        cdef Py_ssize_t m = self._m, a, b, p
        cdef int32_t ia, ib
        if not self._rotates(i):
            return self._pick_p2c()
        if m == 1:
            return -1
        p = _dense_pos(self._dense, m, i)
        if m == 2:
            return self._dense[1 - p]
        _two_excluding(&self._rng, m, p, &a, &b)
        ia = self._dense[a]
        ib = self._dense[b]
        if self._score[ib] + _log1k(self._inflight[ib]) < self._score[ia] + _log1k(self._inflight[ia]):
            return ib
        return ia

    def pick(self):
        return self._pick()

    def pick_excluding(self, i):
        return self._pick_excluding(self._excluded(i))

    def pick_p2c(self):
        return self._pick_p2c()

    def pick_p2c_excluding(self, i):
        return self._pick_p2c_excluding(self._excluded(i))

    def peek(self):
        """What the next ``pick()`` returns (the argmin draws nothing and changes nothing)."""
        return self._pick()

    def peek_p2c(self):
        """What the next ``pick_p2c()`` returns, from a copy of the generator (``/explain``)."""
        cdef uint64_t state = self._rng
        try:
            return self._pick_p2c()
        finally:
            self._rng = state

    def peek_two(self, exclude=-1):
        """The two backends the next ``pick_p2c`` compares, drawn from a copy of the
        generator: the next ``pick_p2c_excluding(exclude)``'s, with an ``exclude``.

        ``(-1, -1)`` with fewer than two in rotation besides ``exclude``.
        """
        return _peek_two(self._dense, self._m, self._rng, self._excluded(exclude), True)

    def pick_many(self, Py_ssize_t count):
        return _pick_many(self, count)

    def pick_p2c_many(self, Py_ssize_t count):
        cdef int64_t total = 0
        cdef Py_ssize_t r
        with nogil:
            for r in range(count):
                total += self._pick_p2c()
        return total

# --- Consistent hashing: the twins' _HashKernel and RingHash document them ---


cdef tuple _check_names(object names, Py_ssize_t n):
    out = tuple(names)
    if len(out) != n:
        raise ValueError(f"names and weights differ in length: {len(out)} names, {n} weights")
    for name in out:
        if type(name) is not bytes:
            raise TypeError(f"names must be bytes, got {type(name).__name__}")
        if not name:
            raise ValueError("names must not be empty")
    if len(set(out)) != n:
        seen = set()
        for name in out:
            if name in seen:
                raise ValueError(f"duplicate name {name!r}")
            seen.add(name)
    return out


cdef inline uint64_t _as_hash(object h) except? 0:
    """An unsigned 64-bit hash: an integer (not a float, as C's conversion would take) or
    OverflowError, as the twin's ``_check_hash``."""
    if type(h) is not int:
        h = operator.index(h)
    return h


cdef int _cmp_points(const void *a, const void *b) noexcept nogil:
    cdef const _Point *p = <const _Point *>a
    cdef const _Point *q = <const _Point *>b
    if p.hash != q.hash:
        return -1 if p.hash < q.hash else 1
    if p.rank != q.rank:
        return -1 if p.rank < q.rank else 1
    if p.replica != q.replica:
        return -1 if p.replica < q.replica else 1
    return 0


cdef size_t _decimal(uint64_t k, unsigned char *out) noexcept nogil:
    """Write k in decimal at out, as str(k) does; return the digit count."""
    cdef unsigned char digits[20]
    cdef size_t n = 0, j
    while True:
        digits[n] = <unsigned char>(48 + k % 10)
        n += 1
        k //= 10
        if k == 0:
            break
    for j in range(n):
        out[j] = digits[n - 1 - j]
    return n


cdef class _HashKernel(_SeededKernel):
    """Names, name order and owned points or slots; O(1) eligibility; lookups by hash."""

    def __dealloc__(self):
        free(self._order)
        free(self._rank)
        free(self._count)

    cdef Py_ssize_t _alloc_hash(self, Py_ssize_t count) except -1:
        cdef Py_ssize_t size = self._alloc(count)
        self._order = <int32_t *>_calloc(size, sizeof(int32_t))
        self._rank = <uint32_t *>_calloc(size, sizeof(uint32_t))
        self._count = <int64_t *>_calloc(size, sizeof(int64_t))
        return size

    cdef int _init_hash(self, list weights, tuple names, object seed) except -1:
        cdef Py_ssize_t i, r
        for i in range(self._n):
            self._w[i] = weights[i]
        self._names = names
        for r, i in enumerate(sorted(range(self._n), key=names.__getitem__)):
            self._order[r] = <int32_t>i
            self._rank[i] = <uint32_t>r
        self._rng = _seed_value(seed)
        return 0

    cdef int _build(self) except -1:
        return 0

    cdef int _refresh(self) except -1:
        """Rebuild the structure, then the counts of backends in rotation and live."""
        self._build()
        _Kernel._rebuild(self)
        cdef Py_ssize_t i, live = 0
        for i in range(self._n):
            if self._elig[i] and self._count[i] > 0:
                live += 1
        self._live = live
        return 0

    def set_eligible(self, index, bint eligible):
        # O(1): the structure stays; lookups walk past ineligible backends.
        # (_dense is left stale: no hash kernel reads it.)
        cdef Py_ssize_t i = self._index(index)
        cdef Py_ssize_t step
        if self._elig[i] != eligible:
            self._elig[i] = eligible
            step = 1 if eligible else -1
            if self._w[i] > 0:
                self._m += step
            if self._count[i] > 0:
                self._live += step

    def set_weight(self, index, weight):
        cdef Py_ssize_t i = self._index(index)
        cdef int64_t w = _check_weight(weight)
        cdef int64_t old = self._w[i]
        if old != w:
            self._w[i] = w
            try:
                self._refresh()
            except BaseException:
                # _build allocates before it frees: the old structure is intact.
                self._w[i] = old
                raise

    cdef int _lookup(self, uint64_t h, Py_ssize_t *pos) noexcept nogil:
        pos[0] = -1
        return -1

    cdef int _walk_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil:
        return -1

    cdef int _lookup_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil:
        """The backend for h if x were ineligible; nothing is toggled."""
        cdef Py_ssize_t pos
        if x < 0 or not self._elig[x] or self._count[x] == 0:
            return self._lookup(h, &pos)
        if self._live == 1:  # x is the only eligible backend in the structure
            return -1
        return self._walk_excluding(h, x)

    cdef int _pick(self) noexcept nogil:
        cdef Py_ssize_t pos
        return self._lookup(_next(&self._rng), &pos)

    def pick_excluding(self, i):
        cdef Py_ssize_t x = self._excluded(i)
        return self._lookup_excluding(_next(&self._rng), x)

    def pick_hash(self, h):
        cdef Py_ssize_t pos
        return self._lookup(_as_hash(h), &pos)

    def pick_hash_excluding(self, h, i):
        cdef uint64_t hv = _as_hash(h)
        return self._lookup_excluding(hv, self._excluded(i))

    def pick_key(self, bytes key not None):
        cdef Py_ssize_t pos
        return self._lookup(xxh64(<const unsigned char *>key, len(key), 0), &pos)

    def pick_key_excluding(self, bytes key not None, i):
        cdef Py_ssize_t x = self._excluded(i)
        return self._lookup_excluding(xxh64(<const unsigned char *>key, len(key), 0), x)

    def pick_key_many(self, keys):
        cdef list ks = keys if type(keys) is list else list(keys)
        cdef int64_t total = 0
        cdef Py_ssize_t r, pos
        cdef PyObject *key
        for r in range(len(ks)):
            key = _list_item(ks, r)
            if not _is_bytes(key):
                raise TypeError(f"keys must be bytes, got {type(<object>key).__name__}")
            total += self._lookup(
                xxh64(<const unsigned char *>_bytes_data(key), <size_t>_bytes_size(key), 0), &pos
            )
        return total

    def position(self, h):
        cdef Py_ssize_t pos
        self._lookup(_as_hash(h), &pos)
        return pos

    def peek(self):
        """What the next ``pick()`` returns, from a copy of the generator."""
        cdef uint64_t state = self._rng
        try:
            return self.pick()
        finally:
            self._rng = state

    def pick(self):
        return self._pick()

    def pick_many(self, Py_ssize_t count):
        cdef int64_t total = 0
        cdef Py_ssize_t r
        with nogil:
            for r in range(count):
                total += self._pick()
        return total


@cython.final
cdef class RingHash(_HashKernel):
    """Ketama consistent hashing, as Envoy's ``ring_hash``: binary search, then a walk."""

    name = "ring_hash"

    def __dealloc__(self):
        free(self._hashes)
        free(self._owners)

    def __init__(
        self, weights, names, *, min_ring_size=1024, max_ring_size=MAX_RING_SIZE, seed=None
    ):
        lo = operator.index(min_ring_size)
        hi = operator.index(max_ring_size)
        if not 1 <= lo <= hi <= MAX_RING_SIZE:
            raise ValueError(
                "ring sizes must satisfy 1 <= min_ring_size <= max_ring_size <= "
                f"{MAX_RING_SIZE}, got {lo} and {hi}"
            )
        ws = [_check_weight(w) for w in weights]
        cdef tuple ns = _check_names(names, len(ws))
        cdef Py_ssize_t size = self._alloc_hash(len(ws))
        self._n = size
        self._min_ring = lo
        self._max_ring = hi
        self._init_hash(ws, ns, seed)
        self._refresh()

    @property
    def ring_size(self):
        return self._size

    cdef int _build(self) except -1:
        """Envoy's point counts (the twin's ``_ring_counts``, exact), then the sorted ring."""
        cdef Py_ssize_t n = self._n, k, j, r
        cdef int32_t i
        cdef uint64_t total = 0, least = 0, w, per_least, num, den, so_far = 0, done = 0, target
        for k in range(n):
            w = <uint64_t>self._w[k]
            if w > 0:
                total += w
                if least == 0 or w < least:
                    least = w
        for k in range(n):
            self._count[k] = 0
        if total > 0:
            # Below 2**48: least * min_ring <= 2**24 * 2**23, and the ceiling adds < total.
            per_least = (self._min_ring * least + total - 1) // total
            if per_least * total <= self._max_ring * least:
                num, den = per_least, least
            else:
                num, den = self._max_ring, total
            for k in range(n):
                i = self._order[k]
                so_far += <uint64_t>self._w[i]
                target = lbgw_ceil_muldiv(num, so_far, den)
                self._count[i] = <int64_t>(target - done)
                done = target
        cdef Py_ssize_t size = <Py_ssize_t>done
        cdef _Point *points = <_Point *>_calloc(size, sizeof(_Point))
        cdef uint64_t *hashes = NULL
        cdef int32_t *owners = NULL
        cdef unsigned char *key = NULL
        cdef Py_ssize_t longest = 0, length
        cdef const unsigned char *name
        try:
            hashes = <uint64_t *>_calloc(size, sizeof(uint64_t))
            owners = <int32_t *>_calloc(size, sizeof(int32_t))
            for k in range(n):
                longest = max(longest, len(self._names[k]))
            key = <unsigned char *>_calloc(longest + 22, 1)  # name, "_", 20 digits, spare
            j = 0
            for k in range(n):
                i = self._order[k]
                name = <const unsigned char *>(<bytes>self._names[i])
                length = len(self._names[i])
                memcpy(key, name, length)
                key[length] = 95  # "_"
                for r in range(self._count[i]):
                    points[j].hash = xxh64(key, length + 1 + _decimal(r, key + length + 1), 0)
                    points[j].rank = <uint32_t>k
                    points[j].replica = <uint32_t>r
                    points[j].i = i
                    j += 1
            qsort(points, size, sizeof(_Point), _cmp_points)
            for j in range(size):
                hashes[j] = points[j].hash
                owners[j] = points[j].i
        except BaseException:
            free(hashes)
            free(owners)
            raise
        finally:
            free(points)
            free(key)
        free(self._hashes)
        free(self._owners)
        self._hashes = hashes
        self._owners = owners
        self._size = size
        return 0

    cdef int _lookup(self, uint64_t h, Py_ssize_t *pos) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self._size, mid
        if self._live == 0:
            pos[0] = -1
            return -1
        # The first point at or after h, wrapping past the top.
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._hashes[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == self._size:
            lo = 0
        while not self._elig[self._owners[lo]]:
            lo += 1
            if lo == self._size:
                lo = 0
        pos[0] = lo
        return self._owners[lo]

    cdef int _walk_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil:
        cdef Py_ssize_t lo = 0, hi = self._size, mid
        cdef int32_t owner
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._hashes[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        if lo == self._size:
            lo = 0
        owner = self._owners[lo]
        while not self._elig[owner] or owner == x:
            lo += 1
            if lo == self._size:
                lo = 0
            owner = self._owners[lo]
        return owner


cdef bint _is_prime(uint64_t m) noexcept:
    cdef uint64_t d = 2
    if m < 2:
        return False
    while d * d <= m:
        if m % d == 0:
            return False
        d += 1
    return True


@cython.final
cdef class Maglev(_HashKernel):
    """Maglev hashing (Eisenbud et al., NSDI'16), weighted as Envoy's ``maglev``."""

    name = "maglev"

    def __dealloc__(self):
        free(self._table)
        free(self._offset)
        free(self._skip)
        free(self._slot)
        free(self._target)
        free(self._entries)

    def __init__(self, weights, names, *, table_size=65537, seed=None):
        m = operator.index(table_size)
        if not (2 <= m <= MAX_TABLE_SIZE and _is_prime(m)):
            raise ValueError(f"table_size must be a prime up to {MAX_TABLE_SIZE}, got {m}")
        ws = [_check_weight(w) for w in weights]
        cdef tuple ns = _check_names(names, len(ws))
        cdef Py_ssize_t size = self._alloc_hash(len(ws))
        self._table = <int32_t *>_calloc(m, sizeof(int32_t))
        self._offset = <uint64_t *>_calloc(size, sizeof(uint64_t))
        self._skip = <uint64_t *>_calloc(size, sizeof(uint64_t))
        self._slot = <uint64_t *>_calloc(size, sizeof(uint64_t))
        self._target = <uint64_t *>_calloc(size, sizeof(uint64_t))
        self._entries = <int32_t *>_calloc(size, sizeof(int32_t))
        self._n = size
        self._size = m
        self._init_hash(ws, ns, seed)
        cdef Py_ssize_t i
        cdef bytes name
        for i in range(size):
            name = ns[i]
            self._offset[i] = xxh64(<const unsigned char *>name, len(name), 0) % self._size
            self._skip[i] = xxh64(<const unsigned char *>name, len(name), 1) % (self._size - 1) + 1
        self._refresh()

    @property
    def table_size(self):
        return self._size

    cdef int _build(self) except -1:
        """The paper's Listing 1, with Envoy's weighted turns (see the twin)."""
        cdef uint64_t m = self._size, filled = 0, rounds = 0, heaviest = 0, c
        cdef Py_ssize_t k, e = 0, j
        cdef int32_t i
        for c in range(m):
            self._table[c] = -1
        for k in range(self._n):
            i = self._order[k]
            self._count[i] = 0
            self._slot[i] = self._offset[i]
            self._target[i] = 0
            if self._w[i] > 0:
                self._entries[e] = i
                e += 1
                if <uint64_t>self._w[i] > heaviest:
                    heaviest = <uint64_t>self._w[i]
        while e > 0 and filled < m:
            rounds += 1
            for j in range(e):
                i = self._entries[j]
                if rounds * <uint64_t>self._w[i] < self._target[i]:
                    continue
                self._target[i] += heaviest
                c = self._slot[i]
                while self._table[c] >= 0:
                    c += self._skip[i]
                    if c >= m:
                        c -= m
                self._table[c] = i
                c += self._skip[i]
                self._slot[i] = c - m if c >= m else c
                self._count[i] += 1
                filled += 1
                if filled == m:
                    break
        return 0

    cdef int _lookup(self, uint64_t h, Py_ssize_t *pos) noexcept nogil:
        cdef uint64_t slot
        if self._live == 0:
            pos[0] = -1
            return -1
        slot = h % self._size
        while not self._elig[self._table[slot]]:
            slot += 1
            if slot == self._size:
                slot = 0
        pos[0] = <Py_ssize_t>slot
        return self._table[slot]

    cdef int _walk_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil:
        cdef uint64_t slot = h % self._size
        cdef int32_t owner = self._table[slot]
        while not self._elig[owner] or owner == x:
            slot += 1
            if slot == self._size:
                slot = 0
            owner = self._table[slot]
        return owner


ctypedef fused _AnyKernel:
    SmoothWeightedRoundRobin
    RoundRobin
    Random
    LeastRequest
    PeakEwma


cdef int64_t _pick_many(_AnyKernel k, Py_ssize_t count):
    """``count`` picks in a C loop without the GIL; the sum of the picked indices."""
    cdef int64_t total = 0
    cdef Py_ssize_t r
    with nogil:
        for r in range(count):
            total += k._pick()
    return total
