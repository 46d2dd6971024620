"""HTTP/2 keepalive on the backend channels: a frozen backend's calls end fast.

A backend that stops answering (SIGSTOP, a dead host behind a live
route, a full network partition) leaves its TCP connection open: without
keepalive, a call on it waits for its deadline, or for ever. A keepalive
PING that is not acked within ``keepalive_timeout_ms`` makes gRPC close the
transport, and every call on it ends with ``UNAVAILABLE`` at once.

The values must never draw ``GOAWAY too_many_pings`` from a backend with
gRPC's default server settings. The server's policy, from grpc core 1.85
(``src/core/ext/transport/chttp2/transport/ping_abuse_policy.cc`` and
``writing.cc``):

* a PING that comes sooner than 5 minutes after the previous one
  (``grpc.http2.min_ping_interval_without_data_ms``; 2 hours while the
  connection has no call) is a strike, and the third strike
  (``grpc.http2.max_ping_strikes`` = 2) draws the GOAWAY;
* every time the server *writes* headers, data, trailers or a
  WINDOW_UPDATE, the strikes and the clock start again.

So a PING every ``time`` seconds is safe while the server writes at least
once between two PINGs. The client side (``ping_rate_policy.cc``) sends
keepalive PINGs only while a call is open (``keepalive_permit_without_calls``
stays 0: an idle channel never pings, and the 2-hour rule never applies).

lbgw chooses by the cluster's health check, which runs on the same channel:

* ``grpc`` (``Check``, or ``Watch`` with its liveness ``Check``): a probe
  answered at least every ``interval x (1 + jitter) + timeout`` makes the
  server write, so a PING every ``max(10 s, that)`` has a write before
  it, even beside a call that is silent for hours: never a second strike.
  The timeout is 5 s: with the defaults, a frozen backend's calls end at
  most 15 s after it froze.
* ``tcp`` or ``none``: nothing makes the server write, and a silent call
  (an idle stream) would collect strikes. A PING every 300 s is never
  sooner than the server's 5 minutes; the timeout is gRPC's default, 20 s.

In grpc 1.85 the keepalive timeout alone does not end the transport: the
timer is armed only when one is already armed (``writing.cc``, in
``grpc_chttp2_end_write``), and the PING's own timeout, 1 minute by default,
is what fires. lbgw sets ``grpc.http2.ping_timeout_ms`` to the same value,
which applies to every PING: ``tests/hostile/test_black_holes.py`` fails if
a stream in flight on a frozen backend is not ended.

A cluster's own ``channel_options`` win over these (``backends.py``).
``bench/keepalive.py`` runs lbgw against a default ``grpc.aio`` server for
10 minutes, with and without calls in flight, and counts GOAWAYs.
"""

from __future__ import annotations

import math
from typing import Final

from lbgw.config import HealthCheckConfig

__all__ = ["PING_TIMEOUT", "SAFE_TIME_MS", "keepalive_options"]

#: Internal to chttp2 (``internal_channel_arg_names.h``), so not one a config may set.
PING_TIMEOUT: Final = "grpc.http2.ping_timeout_ms"
#: gRPC's default server minimum between PINGs without data: 5 minutes.
SAFE_TIME_MS: Final = 300_000
_SAFE_TIMEOUT_MS: Final = 20_000  # gRPC's default keepalive timeout
_PROBED_MIN_TIME_MS: Final = 10_000
_PROBED_TIMEOUT_MS: Final = 5_000


def keepalive_options(check: HealthCheckConfig) -> list[tuple[str, int]]:
    """The keepalive channel arguments for a cluster checked with ``check``."""
    if check.mode == "grpc":
        answered = check.interval * (1 + check.jitter) + check.timeout
        time_ms = max(_PROBED_MIN_TIME_MS, math.ceil(answered * 1000))
        timeout_ms = _PROBED_TIMEOUT_MS
    else:
        time_ms, timeout_ms = SAFE_TIME_MS, _SAFE_TIMEOUT_MS
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),
        (PING_TIMEOUT, timeout_ms),
    ]
