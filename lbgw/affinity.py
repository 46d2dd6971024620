"""Session affinity: which endpoint a call is pinned to, if any. Sync, no I/O.

Two ways, per cluster, that work together:

* **Consistent hashing** (``strategy = "ring_hash"`` or ``"maglev"``): the
  call's key, a request metadata value (``hash_on = "metadata"``, with
  ``hash_key``), the client's IP address (``"peer"``, like NGINX's
  ``ip_hash``) or the full method (``"method"``), is hashed with xxHash64
  and looked up on the ring or the Maglev table. The mapping depends only on
  the endpoint set (addresses, weights and which are in rotation), never on
  the order in the file, the process or the machine, so any number of lbgw
  replicas send a key to the same endpoint without sharing any state. A call
  without the key is picked by the ``fallback`` strategy (``swrr`` by
  default), and its trace says so (``lb.fallback``).
* **Sticky sessions** (``[clusters.NAME.sticky] enabled = true``): each
  response's initial metadata carries a token (key ``lbgw-sticky``) naming
  the endpoint that served it; a call that sends the token back goes to that
  endpoint while it is in rotation, before any hashing. The token is
  ``v1.`` and the first 18 bytes, base64url, of HMAC-SHA256(secret, cluster,
  endpoint address): it reveals nothing about the endpoint, a client cannot
  make one for an endpoint of its choice, and replicas that share the secret
  (``secret`` or ``LBGW_STICKY_SECRET``) honour each other's. A token that
  matches no endpoint (forged, stale, from another cluster) is ignored; a
  token for an endpoint out of rotation leads to a new pick and a new token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Final

from lbgw.balancer import Balancer
from lbgw.config import ClusterConfig

__all__ = ["Affinity", "Sticky", "peer_host"]

_TOKEN_PREFIX: Final = "v1."
_MAC_BYTES: Final = 18  # 144 bits: 24 base64url characters


def peer_host(peer: str) -> str:
    """The client's address without its port: ``ipv4:10.0.0.5:41234`` -> ``10.0.0.5``.

    grpcio percent-encodes IPv6 peers (``ipv6:%5B::1%5D:41234`` -> ``::1``);
    other kinds of peer (``unix:...``) are returned whole.
    """
    scheme, sep, rest = peer.partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return peer
    host, _, _ = urllib.parse.unquote(rest).rpartition(":")
    return host.removeprefix("[").removesuffix("]") or rest


class Sticky:
    """Issues and reads sticky-session tokens for one cluster's endpoints."""

    __slots__ = ("_index", "_tokens", "key")

    def __init__(self, cluster: str, addresses: Sequence[str], key: str, secret: bytes) -> None:
        self.key = key
        self._tokens = [_sign(secret, cluster, address) for address in addresses]
        self._index = {token: i for i, token in enumerate(self._tokens)}

    def __repr__(self) -> str:
        return f"<Sticky key={self.key!r} endpoints={len(self._tokens)}>"

    def token(self, i: int) -> tuple[str, str]:
        """The metadata entry that pins a client to endpoint ``i``."""
        return self.key, self._tokens[i]

    def endpoint(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> int:
        """The endpoint the call's token names, or -1 (no token, or not one of ours)."""
        key = self.key
        for k, v in metadata or ():
            if k == key:
                return self._index.get(v, -1) if isinstance(v, str) else -1
        return -1


def _sign(secret: bytes, cluster: str, address: str) -> str:
    message = b"lbgw-sticky\0" + cluster.encode() + b"\0" + address.encode()
    mac = hmac.new(secret, message, hashlib.sha256).digest()[:_MAC_BYTES]
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(mac).decode("ascii")


class Affinity:
    """Pins a call by its sticky token, then its hash key, else leaves it to the strategy."""

    __slots__ = ("balancer", "hash_key", "hash_on", "sticky")

    def __init__(self, config: ClusterConfig, balancer: Balancer, secret: bytes) -> None:
        self.balancer = balancer
        hashing = balancer.hashing is not None
        self.hash_on = config.params.hash_on if hashing else ""
        self.hash_key = config.params.hash_key
        self.sticky = (
            Sticky(config.name, balancer.addresses, config.sticky.key, secret)
            if config.sticky.enabled
            else None
        )

    def __repr__(self) -> str:
        on = f"{self.hash_on}:{self.hash_key}" if self.hash_on == "metadata" else self.hash_on
        return f"<Affinity hash={on or '-'} sticky={self.sticky is not None}>"

    def key(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str, method: str
    ) -> bytes | None:
        """The call's hash key, or None when the cluster does not hash or the call has none."""
        hash_on = self.hash_on
        if hash_on == "metadata":
            name = self.hash_key
            for k, v in metadata or ():
                if k == name:
                    return v.encode() if isinstance(v, str) else v
            return None
        if hash_on == "peer":
            return peer_host(peer).encode()
        if hash_on == "method":
            return method.encode()
        return None

    def pinned(self, metadata: Iterable[tuple[str, str | bytes]] | None, exclude: int) -> int:
        """The endpoint the call's sticky token names, if it is in rotation; else -1."""
        if self.sticky is None:
            return -1
        i = self.sticky.endpoint(metadata)
        if i < 0 or i == exclude or not self.balancer.is_eligible(i):
            return -1
        return i

    def pick(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        peer: str,
        method: str,
        exclude: int = -1,
    ) -> int:
        """The endpoint for the call (never ``exclude``, for a retry); counts it as started.

        Raises ``NoEligibleEndpointError`` as ``Balancer.pick`` does.
        """
        balancer = self.balancer
        i = self.pinned(metadata, exclude)
        if i >= 0:
            balancer.kernel.started(i)
            return i
        key = self.key(metadata, peer, method)
        if key is not None:
            return balancer.pick_key(key, exclude)
        return balancer.pick() if exclude < 0 else balancer.pick_other(exclude)

    def explain(
        self,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        peer: str,
        method: str,
        exclude: int = -1,
    ) -> dict[str, str | int]:
        """For a trace, before the pick: the key and ring position, or why there is none."""
        if self.pinned(metadata, exclude) >= 0:
            return {"fallback": "", "pinned": "sticky token"}
        out: dict[str, str | int] = {}
        if self.sticky is not None and self.sticky.endpoint(metadata) >= 0:
            out["fallback"] = "sticky endpoint out of rotation"
        if not self.hash_on:
            return out
        key = self.key(metadata, peer, method)
        if key is None:
            out["fallback"] = (
                f"no hash key ({self.hash_key or self.hash_on}): {self.balancer.fallback}"
            )
            return out
        out["hash_key"] = key.decode("utf-8", "backslashreplace")
        out["ring_position"] = self.balancer.position(key)
        return out
