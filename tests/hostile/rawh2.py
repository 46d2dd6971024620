"""A raw HTTP/2 client for hostile tests: the ``h2`` library over an asyncio socket.

A real gRPC client cannot misbehave on purpose: it always reads, acknowledges
data and frames its messages well. ``RawH2`` speaks HTTP/2 frame by frame,
so a test can open streams and never send WINDOW_UPDATE, reset streams as
soon as it opened them, send HEADERS and nothing more, or write raw bytes
(bad framing, a CONTINUATION flood). ``h2`` does the protocol state; nothing
is parsed by hand but gRPC's 5-byte message prefix.

What the server sends is recorded per stream (``Stream``: response headers,
the bytes of DATA, trailers, the RST_STREAM code) and per connection
(``goaway``: the GOAWAY error code; ``closed``: the socket ended), so a
test asserts on what a client saw. Used by ``tests/hostile/`` and by
``bench/hostile.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

__all__ = ["RawH2", "Stream", "grpc_frame", "raw_connect"]


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: uncompressed flag, 4-byte length, the bytes."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass
class Stream:
    """What the server sent on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    received: int = 0  # DATA bytes
    reset: int | None = None  # the RST_STREAM error code
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def grpc_status(self) -> int | None:
        """The grpc-status the server ended with (trailers, or trailers-only headers)."""
        status = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if status is None else int(status)

    @property
    def grpc_message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))


def _text(pairs: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    def s(x: bytes | str) -> str:
        return x.decode("utf-8", "replace") if isinstance(x, bytes) else x

    return {s(k): s(v) for k, v in pairs}


class RawH2:
    """One client HTTP/2 connection; ``raw_connect`` makes it and closes it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.authority = authority
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, Stream] = {}
        self.goaway: int | None = None  # the error code of the first GOAWAY received
        self.closed = asyncio.Event()  # the server closed the socket
        self._reading: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<RawH2 {self.authority} streams={len(self.streams)} goaway={self.goaway} "
            f"closed={self.closed.is_set()}>"
        )

    # -- sending ------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        """Send what ``h2`` has queued; let the reader run (the server's frames)."""
        self.flush()
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        await asyncio.sleep(0)

    def request_headers(
        self, method: str, metadata: Iterable[tuple[str, str]] = ()
    ) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]

    def open(
        self,
        method: str,
        message: bytes | None = None,
        *,
        end: bool = True,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> int:
        """Open a stream: HEADERS, then one message if given; half-close it if ``end``."""
        sid: int = self.conn.get_next_available_stream_id()
        self.streams[sid] = Stream()
        headers = self.request_headers(method, metadata)
        self.conn.send_headers(sid, headers, end_stream=end and message is None)
        if message is not None:
            self.conn.send_data(sid, grpc_frame(message), end_stream=end)
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        """RST_STREAM CANCEL, as a client's cancel sends it."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(sid, error_code=8)
        self.flush()

    def open_connection_window(self, size: int = 2**30) -> None:
        """Grow the connection's receive window only: each stream keeps its own 64 KiB."""
        self.conn.increment_flow_control_window(size)
        self.flush()

    def write_raw(self, data: bytes) -> None:
        """Bytes straight onto the socket, past ``h2``'s state (bad framing, floods)."""
        self.flush()
        self.writer.write(data)

    # -- receiving ----------------------------------------------------------------

    def start_reading(self, *, acknowledge: bool = False) -> None:
        """Read and record what the server sends; ``acknowledge``: send WINDOW_UPDATEs."""
        self._reading = asyncio.ensure_future(self._read(acknowledge))

    async def _read(self, acknowledge: bool) -> None:
        try:
            while data := await self.reader.read(65536):
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._record(event, acknowledge)
                self.flush()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            for stream in self.streams.values():
                stream.ended.set()

    def _record(self, event: h2.events.Event, acknowledge: bool) -> None:
        sid = getattr(event, "stream_id", 0)
        stream = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = _text(event.headers or ())
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = _text(event.headers or ())
        elif isinstance(event, h2.events.DataReceived) and stream is not None:
            stream.received += len(event.data or b"")
            if acknowledge and event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.reset = int(event.error_code) if event.error_code is not None else 0
        elif isinstance(event, h2.events.ConnectionTerminated) and self.goaway is None:
            self.goaway = int(event.error_code) if event.error_code is not None else 0
        if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset) and stream is not None:
            stream.ended.set()

    async def wait_ended(self, sid: int, timeout: float) -> Stream:
        stream = self.streams[sid]
        async with asyncio.timeout(timeout):
            await stream.ended.wait()
        return stream

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_connect(
    address: str, *, initial_window: int | None = None, read: bool = True, acknowledge: bool = False
) -> AsyncIterator[RawH2]:
    """A client connection to ``address`` (``host:port``), preface and SETTINGS sent.

    ``initial_window`` sets SETTINGS_INITIAL_WINDOW_SIZE (each stream's
    receive window); ``read`` starts recording what the server sends.
    """
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    raw = RawH2(reader, writer, address)
    settings: dict[int, int] = {}
    if initial_window is not None:
        settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window
    raw.conn.initiate_connection()
    if settings:
        raw.conn.update_settings(settings)
    await raw.drain()
    if read:
        raw.start_reading(acknowledge=acknowledge)
    try:
        yield raw
    finally:
        await raw.close()
