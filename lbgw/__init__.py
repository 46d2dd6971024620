"""lbgw: a gRPC load-balancing gateway with Cython picking kernels."""

from lbgw.kernels import (
    EDF_THRESHOLD,
    IMPLEMENTATION,
    MAX_ACTIVE_REQUEST_BIAS,
    MAX_BACKENDS,
    MAX_RING_SIZE,
    MAX_TABLE_SIZE,
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

__all__ = [
    "EDF_THRESHOLD",
    "IMPLEMENTATION",
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
__version__ = "0.1.0"
