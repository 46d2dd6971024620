# Declarations of the compiled picking kernels; _fastpick.pyx implements them.
# State lives in C arrays owned by each object; pick loops touch no Python object.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


# xxHash64 (Yann Collet) of the n bytes at p: stable across processes and machines.
cdef uint64_t xxh64(const unsigned char *p, size_t n, uint64_t seed) noexcept nogil


ctypedef struct _Slot:
    # One backend's entry in SmoothWeightedRoundRobin's EDF heap. Its deadline
    # is u / 2w; entries compare by u_a * w_b < u_b * w_a, then by index.
    uint32_t u                  # 2k - 1 for this cycle's next pick k: deadline u / 2w
    uint32_t w                  # weight
    int32_t i                   # backend index


ctypedef struct _Due:
    # One backend's entry in LeastRequest's EDF heap, ordered by (deadline, order).
    double deadline
    uint64_t order              # when it was scheduled: unique, breaks ties
    int32_t i                   # backend index


cdef class _Kernel:
    cdef Py_ssize_t _n          # backends, indices 0.._n-1
    cdef Py_ssize_t _m          # backends in rotation
    cdef int64_t *_w            # weight, by index
    cdef uint8_t *_elig         # eligible flag, by index
    cdef int64_t *_inflight     # in-flight calls, by index
    cdef int32_t *_dense        # indices in rotation, ascending, by dense position
    cdef int64_t *_dw           # weight, by dense position

    cdef Py_ssize_t _alloc(self, object count) except -1
    cdef void _rebuild(self) noexcept
    cdef Py_ssize_t _index(self, object i) except -1
    # pick_excluding's i: the index, or -1 (excludes nothing) if it is none.
    cdef Py_ssize_t _excluded(self, object i) except? -2
    cdef bint _rotates(self, Py_ssize_t i) noexcept nogil


cdef class SmoothWeightedRoundRobin(_Kernel):
    cdef bint _edf
    cdef int64_t *_cur          # nginx current weight, by index (kept while out of rotation)
    cdef int64_t *_dcur         # current weight, by dense position (the scan's copy)
    cdef int64_t _total
    cdef _Slot *_heap           # EDF: min-heap of every backend in rotation
    cdef uint32_t *_ui          # EDF: u of each backend's entry, by index (0: none), at rebuilds
    cdef int64_t _t_num         # EDF: the deadline last served, t_num / t_den
    cdef int64_t _t_den

    cdef int _pick(self) noexcept nogil
    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil
    cdef void _rebase_if_due(self) noexcept nogil


cdef class RoundRobin(_Kernel):
    cdef int _last
    cdef Py_ssize_t _next       # dense position of the next turn
    cdef Py_ssize_t _stop       # the position at which a pick wraps (_m), or jumps
    cdef Py_ssize_t _resume     # where it lands: 0, or past the turns served early

    cdef int _pick(self) noexcept nogil
    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil


cdef class _SeededKernel(_Kernel):
    cdef uint64_t _rng          # splitmix64 state


cdef class Random(_SeededKernel):
    cdef bint _uniform
    cdef int64_t _total
    cdef int64_t *_prob         # alias method: threshold, by column
    cdef int32_t *_alias        # alias method: the column's other dense position
    cdef int64_t *_scaled       # alias method: scratch for the rebuild
    cdef int32_t *_small
    cdef int32_t *_large

    cdef int _pick(self) noexcept nogil
    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil


cdef class LeastRequest(_SeededKernel):
    cdef double _bias
    cdef bint _equal
    cdef double _now            # EDF: the deadline last served
    cdef uint64_t _order        # EDF: the next entry's tie-breaking order
    cdef _Due *_heap            # EDF: min-heap of every backend in rotation
    cdef Py_ssize_t _hsize      # EDF: entries in the heap (0 while in P2C mode)
    cdef _Due *_saved           # EDF: each backend's entry, by index, at rebuilds (i = -1: none)

    cdef int _pick(self) noexcept nogil
    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil
    cdef double _eff_weight(self, Py_ssize_t i) noexcept nogil
    cdef _Due _due(self, Py_ssize_t i) noexcept nogil


cdef class PeakEwma(_SeededKernel):
    cdef double _tau            # decay time constant, ns
    cdef double _default        # estimate before any observation, ns
    cdef bint _has_t0
    cdef int64_t _t0            # first observation, ns
    cdef int64_t _latest        # latest observation, ns since t0
    cdef uint8_t *_inrot        # in rotation as of the last rebuild, by index
    cdef double *_ewma          # estimate, ns, by index
    cdef int64_t *_last         # last observation, ns since t0, by index
    cdef double *_score         # log(ewma) + last/tau - log(weight), by index

    cdef void _rescore(self, Py_ssize_t i) noexcept nogil
    cdef int _pick(self) noexcept nogil
    cdef int _pick_excluding(self, Py_ssize_t i) noexcept nogil
    cdef int _pick_p2c(self) noexcept nogil
    cdef int _pick_p2c_excluding(self, Py_ssize_t i) noexcept nogil


ctypedef struct _Point:
    # One point of RingHash's ring while it is built; sorted by (hash, rank, replica).
    uint64_t hash
    uint32_t rank               # the backend's place in name order
    uint32_t replica            # r in hash64(name + b"_" + str(r))
    int32_t i                   # backend index


cdef class _HashKernel(_SeededKernel):
    cdef tuple _names           # bytes, by index
    cdef int32_t *_order        # backend indices in name order: the order builds walk
    cdef uint32_t *_rank        # place in name order, by index
    cdef int64_t *_count        # points or slots owned, by index
    cdef Py_ssize_t _live       # eligible backends owning a point or slot

    cdef Py_ssize_t _alloc_hash(self, Py_ssize_t count) except -1
    cdef int _init_hash(self, list weights, tuple names, object seed) except -1
    cdef int _refresh(self) except -1
    cdef int _build(self) except -1
    cdef int _lookup(self, uint64_t h, Py_ssize_t *pos) noexcept nogil
    # _lookup walking past backend x too; x must be eligible and own a point or slot.
    cdef int _walk_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil
    cdef int _lookup_excluding(self, uint64_t h, Py_ssize_t x) noexcept nogil
    cdef int _pick(self) noexcept nogil


cdef class RingHash(_HashKernel):
    cdef uint64_t _min_ring
    cdef uint64_t _max_ring
    cdef Py_ssize_t _size       # points on the ring
    cdef uint64_t *_hashes      # point hashes, ascending
    cdef int32_t *_owners       # backend index, by point


cdef class Maglev(_HashKernel):
    cdef uint64_t _size         # M, a prime
    cdef int32_t *_table        # backend index, by slot (-1: none in the table)
    cdef uint64_t *_offset      # start of each backend's permutation, by index
    cdef uint64_t *_skip        # its step, by index
    cdef uint64_t *_slot        # build: each backend's next slot in its permutation
    cdef uint64_t *_target      # build: the round weight a backend's next turn needs
    cdef int32_t *_entries      # build: backends with weight > 0, in name order
