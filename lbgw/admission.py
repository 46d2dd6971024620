"""Admission: the limits on client connections and calls that lbgw sets for every listener.

Two halves. ``listener_options`` turns ``[limits]`` into the grpc server's
channel arguments, which gRPC's HTTP/2 transport enforces before lbgw sees a
call:

* ``grpc.max_concurrent_streams`` (1000). gRPC's overload protection
  (``grpc.http.overload_protection``, on by default) counts a stream until
  the server has let go of it, not until it is closed, so a client that
  opens and resets streams (HTTP/2 rapid reset, CVE-2023-44487) is held to
  1000 of them at a time on its connection: the others are refused by the
  transport, in C, and never reach the event loop (20,000 reset streams:
  1,019 reached lbgw's handler, against 8,286 without the limit). NGINX's
  128 refused 584 of 800 calls that one gRPC channel opened at once, before
  it had the server's SETTINGS (docs/limits.md).
* ``grpc.max_connection_idle_ms``, ``grpc.max_connection_age_ms`` and
  ``grpc.max_connection_age_grace_ms``: GOAWAY to idle and old connections
  (gRPC's server keepalive parameters, as ``MAX_CONNECTION_IDLE``,
  ``MAX_CONNECTION_AGE`` and ``MAX_CONNECTION_AGE_GRACE`` in gRFC A9).
* ``FLOW_CONTROL``: a client's request stream is read into a
  fixed 64 KiB window, as a backend's responses are, so a client that
  uploads faster than the backend reads holds one window and one message.
* ``grpc.server.max_pending_requests`` and its hard limit: how many calls
  gRPC core queues for the application before it refuses them, and the
  refusal reaches a client as ``CANCELLED``. They are raised to twice and
  four times the gateway's own cap, so that the core queue never refuses a
  call lbgw would answer, and lbgw answers the excess itself.

``Admission`` is the other half, a decider (synchronous, no I/O): the
gateway-wide cap on calls in flight. Past ``max_calls_in_flight`` a call
gets ``RESOURCE_EXHAUSTED`` with a message that names the limit, so a client
can tell overload from a cancel (``OverloadedError``).
"""

from __future__ import annotations

from typing import Any, Final

from lbgw.config import Limits
from lbgw.exceptions import OverloadedError

__all__ = ["FLOW_CONTROL", "Admission", "listener_options"]

#: Each forwarded stream's receive window on a backend channel: HTTP/2's default,
#: fixed. gRPC core grows a connection's SETTINGS_INITIAL_WINDOW_SIZE with its
#: bandwidth-delay estimate (BDP probing) to at least 4 MiB while memory is not
#: under pressure (chttp2 ``flow_control.cc``, "anything goes" window), and reads
#: that much of every stream from the socket whether or not lbgw has asked for a
#: message. A client that stops reading stops lbgw's relay at its one message in
#: flight, but the backend kept filling that window: 100 unread streams held 0.9 GB
#: of 64 KiB messages. With probing off and the window fixed at 64 KiB, each stream
#: holds one window and the message being read (gRPC widens a stream's window to
#: the message lbgw reads; ``min_progress_size``), and the backend is held back.
#: A cluster that needs more throughput per stream over a long, fat link can set
#: ``grpc.http2.bdp_probe = 1`` in its channel_options, which win. bench/hostile.py.
#: Used for backend channels (``backends.channel_options``) and for listeners.
FLOW_CONTROL: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 65535),
)


#: gRPC core's default soft limit on queued calls (grpc.server.max_pending_requests).
_CORE_PENDING_DEFAULT: Final = 1000


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def listener_options(limits: Limits) -> list[tuple[str, Any]]:
    """The grpc server's channel arguments for ``limits``; 0 seconds: that limit is off."""
    soft = max(_CORE_PENDING_DEFAULT, 2 * limits.max_calls_in_flight)
    options: list[tuple[str, Any]] = [
        *FLOW_CONTROL,
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.server.max_pending_requests", soft),
        ("grpc.server.max_pending_requests_hard_limit", 2 * soft),
    ]
    if limits.max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(limits.max_connection_idle)))
    if limits.max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", _ms(limits.max_connection_age)))
    if limits.max_connection_age_grace is not None:
        options.append(("grpc.max_connection_age_grace_ms", _ms(limits.max_connection_age_grace)))
    return options


class Admission:
    """The gateway-wide cap on calls in flight: ``admit()`` or ``OverloadedError``; ``release()``.

    One per gateway process (with ``--workers N``, each worker has its own).
    ``refused`` counts the calls turned away since start.
    """

    __slots__ = ("error", "in_flight", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refused = 0
        self.error = OverloadedError("max_calls_in_flight", limit)

    def __repr__(self) -> str:
        return f"<Admission in-flight {self.in_flight}/{self.limit} refused={self.refused}>"

    def set_limit(self, limit: int) -> None:
        """A new cap (a reload); the calls in flight stay counted."""
        if limit != self.limit:
            self.limit = limit
            self.error = OverloadedError("max_calls_in_flight", limit)

    def admit(self) -> OverloadedError | None:
        """Count one more call in flight, or return the error that refuses it (counted)."""
        if self.in_flight >= self.limit:
            self.refused += 1
            return self.error
        self.in_flight += 1
        return None

    def release(self) -> None:
        """One admitted call is over."""
        self.in_flight -= 1
