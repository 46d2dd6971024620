"""The retry buffer of a streamed request: what the client sent, kept so a retry can send it again.

A call whose request is a stream (a method of unknown kind, forwarded as
``stream_stream``; client streaming; bidi) is read from the client while it
is sent to the backend, so once lbgw has read a message, a retry on another
endpoint needs that message again. Envoy solves this with a per-request
buffer (``per_request_buffer_limit_bytes``, 1 MiB by default, and "the
request will not be retried if the request buffer limit is exceeded"), and
it stops buffering when the upstream's response headers arrive, after which
a request is not retried. lbgw does the same:

* ``ReplayBuffer`` keeps each message read from the client, up to
  ``retry_buffer_bytes`` per call (``RetryConfig``; 1 MiB, Envoy's default);
* past the limit, it drops what it held and the call can no longer be
  retried;
* at the backend's first response header it drops what it held, and the call
  is no longer retried; long streams so cost nothing. grpc.aio shows lbgw a
  response's headers when they carry metadata, or with the first message
  (empty headers and a Trailers-Only error look the same from grpc.aio);
* a retry replays what it held, in order, on the new endpoint, then carries
  on with the live stream.

``ClientStream`` reads the client's stream for the attempts in turn. A read
that an ending attempt interrupts must not lose its message (a cancelled
grpc.aio read drops what arrives), so each read runs in its own task that
the attempt's cancel does not reach: the next attempt takes the same read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

__all__ = ["ClientStream", "ReplayBuffer"]


class ReplayBuffer:
    """The messages of one call's request stream, while a retry could still replay them."""

    __slots__ = ("ended", "limit", "messages", "released", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[bytes] = []
        self.size = 0
        #: Dropped: past the limit, or at the response headers. No replay from here on.
        self.released = False
        #: The client half-closed after the messages held.
        self.ended = False

    def __repr__(self) -> str:
        state = "released" if self.released else f"{len(self.messages)} messages"
        return f"<ReplayBuffer {state} {self.size}/{self.limit} bytes ended={self.ended}>"

    @property
    def replayable(self) -> bool:
        """Whether it holds everything the client has sent (so a retry can resend it)."""
        return not self.released

    def record(self, message: bytes) -> None:
        """Keep ``message``; past the limit, drop everything."""
        if self.released:
            return
        self.size += len(message)
        if self.size > self.limit:
            self.release()
        else:
            self.messages.append(message)

    def release(self) -> None:
        """Drop what is held; from here on, nothing is kept and nothing replayed."""
        self.released = True
        self.messages = []


async def _next(requests: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return None


class ClientStream:
    """The client's request stream, read once for every attempt, each message kept in ``buffer``."""

    __slots__ = ("_pending", "_requests", "buffer")

    def __init__(self, requests: AsyncIterator[bytes], limit: int) -> None:
        self._requests = requests
        self._pending: asyncio.Future[bytes | None] | None = None
        self.buffer = ReplayBuffer(limit)

    def __repr__(self) -> str:
        return f"<ClientStream reading={self._pending is not None} {self.buffer!r}>"

    async def read(self) -> bytes | None:
        """The client's next message, kept in ``buffer``; None at the end of its stream.

        A cancel of the caller leaves the read running; the next ``read``
        returns its message.
        """
        pending = self._pending
        if pending is None:
            pending = self._pending = asyncio.ensure_future(_next(self._requests))
        message = await asyncio.shield(pending)
        self._pending = None
        if message is None:
            self.buffer.ended = True
        else:
            self.buffer.record(message)
        return message

    def close(self) -> None:
        """The call is over: stop a read still waiting on the client."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
