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
from collections.abc import Iterable
from typing import Final

from lbgw.balancer import Balancer
from lbgw.config import ClusterConfig
from lbgw.endpoints import Endpoint

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
    """Issues and reads sticky-session tokens for one cluster's endpoints.

    Each endpoint's token is its own (``Endpoint.token``), made once when it
    joins; ``rebuild`` follows a changed endpoint set, so a token for an
    endpoint that has left names nothing and leads to a new pick.
    """

    __slots__ = ("_cluster", "_index", "_secret", "key")

    def __init__(self, cluster: str, key: str, secret: bytes) -> None:
        self.key = key
        self._cluster = cluster
        self._secret = secret
        self._index: dict[str, Endpoint] = {}

    def __repr__(self) -> str:
        return f"<Sticky key={self.key!r} endpoints={len(self._index)}>"

    def rebuild(self, endpoints: Iterable[Endpoint]) -> None:
        """Give each endpoint its token, and read tokens for these endpoints only."""
        index = {}
        for e in endpoints:
            if e.token is None:
                e.token = (self.key, _sign(self._secret, self._cluster, e.address))
            index[e.token[1]] = e
        self._index = index

    def endpoint(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Endpoint | None:
        """The endpoint the call's token names, or None (no token, or not one of ours)."""
        key = self.key
        for k, v in metadata or ():
            if k == key:
                return self._index.get(v) if isinstance(v, str) else None
        return None


def _sign(secret: bytes, cluster: str, address: str) -> str:
    message = b"lbgw-sticky\0" + cluster.encode() + b"\0" + address.encode()
    mac = hmac.new(secret, message, hashlib.sha256).digest()[:_MAC_BYTES]
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(mac).decode("ascii")


class Affinity:
    """A call's sticky token and hash key: what pins it, before the strategy picks.

    ``Cluster.pick`` asks, in this order: the endpoint the sticky token
    names (``pinned``), then the endpoint the hash key leads to (``key``,
    looked up by the balancer), else the strategy's kernel.
    """

    __slots__ = ("balancer", "hash_key", "hash_on", "sticky")

    def __init__(self, config: ClusterConfig, balancer: Balancer, secret: bytes) -> None:
        self.balancer = balancer
        hashing = balancer.hashing is not None
        self.hash_on = config.params.hash_on if hashing else ""
        self.hash_key = config.params.hash_key
        self.sticky = (
            Sticky(config.name, config.sticky.key, secret) if config.sticky.enabled else None
        )
        self.rebuild()

    def __repr__(self) -> str:
        on = f"{self.hash_on}:{self.hash_key}" if self.hash_on == "metadata" else self.hash_on
        return f"<Affinity hash={on or '-'} sticky={self.sticky is not None}>"

    def rebuild(self) -> None:
        """Follow the balancer's endpoint set (``Cluster.update``)."""
        if self.sticky is not None:
            self.sticky.rebuild(self.balancer.endpoints)

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

    def token(
        self, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> tuple[Endpoint | None, bool]:
        """The endpoint the call's sticky token pins it to, if that one is in rotation.

        Also whether the call carried a token of ours at all: one whose
        endpoint is out of rotation leads to a new pick, and a trace says so.
        """
        if self.sticky is None:
            return None, False
        e = self.sticky.endpoint(metadata)
        if e is None:
            return None, False
        if e.index < 0 or not self.balancer.is_eligible(e.index):
            return None, True
        return e, True
