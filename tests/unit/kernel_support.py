"""Shared by the kernel tests: the twin modules, the kernel factories, pick helpers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TypeVar

from lbgw import _fastpick, picking
from lbgw._typing import EwmaKernel, HashKernel, Kernel, KernelModule

__all__ = ["HashKernel"]  # re-exported for the hashing tests

MS = 1_000_000  # nanoseconds
SECOND = 1_000 * MS
T0 = 1_000_000 * SECOND  # an arbitrary monotonic-clock reading to start from
MAX_WEIGHT = picking.MAX_WEIGHT


Impl = KernelModule

# Also checks, statically, that both modules provide the API above.
PYTHON: Impl = picking
CYTHON: Impl = _fastpick
CLASS_NAMES = [
    "SmoothWeightedRoundRobin",
    "RoundRobin",
    "Random",
    "LeastRequest",
    "PeakEwma",
    "RingHash",
    "Maglev",
]
EWMA_CLASSES = (picking.PeakEwma, _fastpick.PeakEwma)
LEAST_REQUEST_CLASSES = (picking.LeastRequest, _fastpick.LeastRequest)
RING_CLASSES = (picking.RingHash, _fastpick.RingHash)
HASH_CLASSES = (*RING_CLASSES, picking.Maglev, _fastpick.Maglev)
SEEDED_CLASSES = (
    picking.Random,
    _fastpick.Random,
    picking.LeastRequest,
    _fastpick.LeastRequest,
    *EWMA_CLASSES,
    *HASH_CLASSES,
)

K = TypeVar("K", bound=Kernel)


def with_weights(k: K, weights: Sequence[int]) -> K:
    for i, w in enumerate(weights):
        k.set_weight(i, w)
    return k


def names(n: int) -> list[bytes]:
    """Backend addresses for the hashing kernels, as lbgw names endpoints."""
    return [b"10.0.%d.%d:50051" % (i // 256, i % 256) for i in range(n)]


def key_picks(k: HashKernel, keys: Sequence[bytes]) -> list[int]:
    return [k.pick_key(key) for key in keys]


def picks(k: Kernel, count: int) -> list[int]:
    return [k.pick() for _ in range(count)]


def p2c_picks(k: EwmaKernel, count: int) -> list[int]:
    return [k.pick_p2c() for _ in range(count)]


def max_runs(seq: Sequence[int]) -> dict[int, int]:
    """The longest run of consecutive picks of each backend."""
    runs: dict[int, int] = {}
    for i, group in itertools.groupby(seq):
        runs[i] = max(runs.get(i, 0), len(list(group)))
    return runs


# Every kernel, built from a weight list, for the tests that apply to all of them.
Factory = Callable[[Impl, Sequence[int]], Kernel]
FACTORIES: dict[str, Factory] = {
    "swrr": lambda m, ws: m.SmoothWeightedRoundRobin(ws),
    "swrr-edf": lambda m, ws: m.SmoothWeightedRoundRobin(ws, edf_threshold=1),
    "round_robin": lambda m, ws: with_weights(m.RoundRobin(len(ws)), ws),
    "random": lambda m, ws: m.Random(ws, seed=7),
    "least_request": lambda m, ws: m.LeastRequest(ws, seed=7),
    "least_request-bias": lambda m, ws: m.LeastRequest(ws, active_request_bias=0.5, seed=7),
    "ewma": lambda m, ws: with_weights(m.PeakEwma(len(ws), seed=7), ws),
    "ring_hash": lambda m, ws: m.RingHash(ws, names(len(ws)), seed=7),
    # A small table keeps the twin's rebuilds quick; test_hash_kernels.py uses Envoy's.
    "maglev": lambda m, ws: m.Maglev(ws, names(len(ws)), table_size=251, seed=7),
}
#: The kernels that pick by a key's hash.
HASH_KERNELS = ("ring_hash", "maglev")


def all_picks(k: Kernel, count: int) -> list[int]:
    """``count`` picks, and as many p2c picks for PeakEwma."""
    out = picks(k, count)
    if isinstance(k, EWMA_CLASSES):
        out += p2c_picks(k, count)
    return out
