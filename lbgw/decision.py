"""The decision: one object per pick, saying which endpoint and why. Sync, no I/O.

``Cluster.pick`` returns a ``Decision``, and both the proxy (which acts on
it) and tracing (which explains it) read that one value: a pick is never
decided a second time to be explained.

An unexplained pick (a call that is not sampled) gets the endpoint's own
constant ``Decision``, made once when the balancer is built
(``Endpoint.decision``): the hot path allocates nothing for it. An explained
pick (a sampled call, ``/explain``) gets a ``Decision`` of its own, with what
the pick compared (``candidates``: each endpoint and its figures as the pick
saw them), what it left out (``skipped``: each endpoint and why), how a key
or a token decided it, and how long the pick took.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from lbgw.endpoints import Endpoint

__all__ = ["Candidates", "Decision", "Skipped"]

#: The endpoints a pick compared, each with its figures: ``(address, {"weight": 3, ...})``.
Candidates: TypeAlias = tuple[tuple[str, dict[str, float]], ...]
#: The endpoints a pick left out, each with why: ``(address, "ejected")``.
Skipped: TypeAlias = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Which endpoint a pick chose, and how.

    ``strategy`` is the cluster's. ``hash_key`` and ``ring_position`` are set
    when a consistent-hashing lookup decided (the key, and the ring point or
    Maglev slot it fell on); ``pinned`` when a sticky token did. ``fallback``
    says why the usual choice was not taken (no hash key, or a sticky
    endpoint out of rotation), and the strategy's kernel chose instead.
    ``candidates``, ``skipped`` and ``pick_ns`` are filled only when the
    pick was explained (``pick_ns`` is None otherwise).
    """

    endpoint: Endpoint
    strategy: str
    hash_key: str | None = None
    ring_position: int | None = None
    pinned: bool = False
    fallback: str | None = None
    candidates: Candidates = ()
    skipped: Skipped = ()
    pick_ns: int | None = None

    @property
    def address(self) -> str:
        return self.endpoint.address
