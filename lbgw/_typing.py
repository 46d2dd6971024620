"""Protocols that connect lbgw's parts.

``Kernel`` is what the balancer needs of a picking kernel; both the compiled
kernels (``lbgw._fastpick``) and their pure-Python twins (``lbgw.picking``)
provide it, and ``KernelModule`` is either module. ``Hash64`` is the stable
key hash both modules provide. mypy checks that both
modules conform (``tests/unit/kernel_support.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol


class Hash64(Protocol):
    """xxHash64 of some bytes: the same unsigned 64-bit value in every process."""

    def __call__(self, data: bytes, /, seed: int = 0) -> int: ...


class Kernel(Protocol):
    """Picks a backend index; rotation, weights and load change in place."""

    #: The strategy's name in config and traces: ``swrr``, ``ewma``, ...
    name: ClassVar[str]

    @property
    def n(self) -> int: ...
    def pick(self) -> int: ...
    def pick_excluding(self, i: int, /) -> int:
        """A retry's pick: as ``pick()``, but never ``i`` (-1 if only ``i`` is in rotation)."""
        ...

    def pick_many(self, count: int) -> int: ...
    def set_eligible(self, i: int, /, eligible: bool) -> None: ...
    def is_eligible(self, i: int, /) -> bool: ...
    def set_weight(self, i: int, /, weight: int) -> None: ...
    def weight(self, i: int, /) -> int: ...
    def started(self, i: int, /) -> None: ...
    def finished(self, i: int, /) -> None: ...
    def in_flight(self, i: int, /) -> int: ...
    def observe(self, i: int, /, rtt_ns: int, now_ns: int) -> None: ...
    def peek(self) -> int:
        """What the next ``pick()`` returns, changing nothing (``/explain``'s dry run)."""
        ...


class SeededKernel(Kernel, Protocol):
    """A kernel that draws random numbers, reproducibly once seeded."""

    def seed(self, seed: int | None) -> None: ...


class EwmaKernel(SeededKernel, Protocol):
    """Peak EWMA: also the power-of-two-choices pick and the cost it compares."""

    def pick_p2c(self) -> int: ...
    def pick_p2c_excluding(self, i: int, /) -> int: ...
    def pick_p2c_many(self, count: int) -> int: ...
    def peek_p2c(self) -> int: ...
    def cost(self, i: int, /, now_ns: int) -> float: ...
    def estimate(self, i: int, /, now_ns: int) -> float: ...
    def restore_estimate(self, i: int, /, ewma_ns: float, now_ns: int) -> None: ...
    def peek_two(self, exclude: int = -1) -> tuple[int, int]: ...


class LeastRequestKernel(SeededKernel, Protocol):
    """Least request: also the two backends its next power-of-two-choices pick compares."""

    def peek_two(self, exclude: int = -1) -> tuple[int, int]: ...


class HashKernel(SeededKernel, Protocol):
    """Consistent hashing: picks by a key's hash, the same backend for the same key."""

    def pick_hash(self, h: int, /) -> int: ...
    def pick_hash_excluding(self, h: int, i: int, /) -> int:
        """``pick_hash(h)`` as if ``i`` were ineligible; nothing is toggled."""
        ...

    def pick_key(self, key: bytes, /) -> int: ...
    def pick_key_excluding(self, key: bytes, i: int, /) -> int: ...
    def pick_key_many(self, keys: Sequence[bytes], /) -> int: ...
    def position(self, h: int, /) -> int: ...


class RingHashKernel(HashKernel, Protocol):
    """Ketama ring hash, which says how many points its ring has."""

    @property
    def ring_size(self) -> int: ...


class MaglevKernel(HashKernel, Protocol):
    """Maglev hashing, which says how many slots its table has."""

    @property
    def table_size(self) -> int: ...


class SwrrKernel(Kernel, Protocol):
    """Smooth weighted round-robin, which says which scheduler it runs."""

    @property
    def scheduler(self) -> str: ...
    def current_weight(self, i: int, /) -> int: ...


class KernelModule(Protocol):
    """A module of kernels: ``lbgw._fastpick`` or its twin ``lbgw.picking``."""

    @property
    def MAX_WEIGHT(self) -> int: ...  # noqa: N802 - a module constant
    @property
    def MAX_BACKENDS(self) -> int: ...  # noqa: N802
    @property
    def MAX_ACTIVE_REQUEST_BIAS(self) -> float: ...  # noqa: N802
    @property
    def EDF_THRESHOLD(self) -> int: ...  # noqa: N802
    @property
    def MAX_RING_SIZE(self) -> int: ...  # noqa: N802
    @property
    def MAX_TABLE_SIZE(self) -> int: ...  # noqa: N802
    @property
    def hash64(self) -> Hash64: ...
    @property
    def SmoothWeightedRoundRobin(self) -> Callable[..., SwrrKernel]: ...  # noqa: N802 - a class
    @property
    def RoundRobin(self) -> Callable[..., Kernel]: ...  # noqa: N802
    @property
    def Random(self) -> Callable[..., SeededKernel]: ...  # noqa: N802
    @property
    def LeastRequest(self) -> Callable[..., LeastRequestKernel]: ...  # noqa: N802
    @property
    def PeakEwma(self) -> Callable[..., EwmaKernel]: ...  # noqa: N802
    @property
    def RingHash(self) -> Callable[..., RingHashKernel]: ...  # noqa: N802
    @property
    def Maglev(self) -> Callable[..., MaglevKernel]: ...  # noqa: N802
