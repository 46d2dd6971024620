"""lbgw: a gRPC load-balancing gateway with Cython picking kernels."""

from lbgw.kernels import (
    EDF_THRESHOLD,
    IMPLEMENTATION,
    MAX_ACTIVE_REQUEST_BIAS,
    MAX_BACKENDS,
    MAX_WEIGHT,
    LeastRequest,
    PeakEwma,
    Random,
    RoundRobin,
    SmoothWeightedRoundRobin,
)

__all__ = [
    "EDF_THRESHOLD",
    "IMPLEMENTATION",
    "MAX_ACTIVE_REQUEST_BIAS",
    "MAX_BACKENDS",
    "MAX_WEIGHT",
    "LeastRequest",
    "PeakEwma",
    "Random",
    "RoundRobin",
    "SmoothWeightedRoundRobin",
]
__version__ = "0.1.0"
