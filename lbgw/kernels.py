"""Selects the picking kernels: compiled ``_fastpick`` unless told otherwise.

This is the only module that imports ``_fastpick`` or ``picking``; the rest of
lbgw takes the kernels from here. ``LBGW_NO_EXTENSIONS=1`` (any value but
empty or ``0``) selects the pure-Python twins. If the compiled module is
missing (a source tree that was never built), lbgw warns and runs on the
twins; ``IMPLEMENTATION`` says which is in use.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Final

from lbgw import picking
from lbgw._typing import Hash64

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
    "is_prime",
]


def _select() -> tuple[ModuleType, str]:
    if os.environ.get("LBGW_NO_EXTENSIONS", "") not in ("", "0"):
        return picking, "python"
    try:
        from lbgw import _fastpick  # noqa: PLC0415 - the choice is the point
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(
            f"lbgw._fastpick is not built ({exc}); picking runs on the pure-Python twins, "
            "about 30x slower. Reinstall with `pip install -e .` to compile it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return picking, "python"
    return _fastpick, "cython"


_impl, _name = _select()

#: ``"cython"`` or ``"python"``: which kernels lbgw is running on.
IMPLEMENTATION: Final[str] = _name
MAX_WEIGHT: Final[int] = _impl.MAX_WEIGHT
MAX_ACTIVE_REQUEST_BIAS: Final[float] = _impl.MAX_ACTIVE_REQUEST_BIAS
MAX_BACKENDS: Final[int] = _impl.MAX_BACKENDS
EDF_THRESHOLD: Final[int] = _impl.EDF_THRESHOLD
MAX_RING_SIZE: Final[int] = _impl.MAX_RING_SIZE
MAX_TABLE_SIZE: Final[int] = _impl.MAX_TABLE_SIZE
hash64: Final[Hash64] = _impl.hash64
#: Pure arithmetic, the same for both twins: config checks a Maglev table size with it.
is_prime: Final = picking.is_prime

SmoothWeightedRoundRobin: type[picking.SmoothWeightedRoundRobin] = _impl.SmoothWeightedRoundRobin
RoundRobin: type[picking.RoundRobin] = _impl.RoundRobin
Random: type[picking.Random] = _impl.Random
LeastRequest: type[picking.LeastRequest] = _impl.LeastRequest
PeakEwma: type[picking.PeakEwma] = _impl.PeakEwma
RingHash: type[picking.RingHash] = _impl.RingHash
Maglev: type[picking.Maglev] = _impl.Maglev
