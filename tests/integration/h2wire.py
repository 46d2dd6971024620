"""A TCP relay that reads the HTTP/2 frames a client sends a server.

It sits between lbgw and a backend, forwards every byte unchanged, and
records how each stream ended on the way to the backend: ``END_STREAM``
(the client half-closed: "all my data is sent") or ``RST_STREAM`` (a
cancel). This is what a backend in any language acts on, whatever its gRPC
library makes of it. Frame layout: RFC 9113, section 4.1.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

PREFACE_LENGTH = 24  # "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM = 0, 1, 3
END_STREAM = 0x1


@contextlib.asynccontextmanager
async def frame_relay(backend: str) -> AsyncIterator[tuple[str, dict[int, list[str]]]]:
    """Yield ``(relay address, {stream id: ["END_STREAM" | "RST_STREAM", ...]})``."""
    host, port = backend.rsplit(":", 1)
    events: dict[int, list[str]] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(PREFACE_LENGTH))
        while True:
            header = await reader.readexactly(9)
            body = await reader.readexactly(int.from_bytes(header[:3], "big"))
            writer.write(header + body)
            kind, flags = header[3], header[4]
            stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            if stream and kind == RST_STREAM:
                events.setdefault(stream, []).append("RST_STREAM")
            elif stream and kind in (DATA, HEADERS) and flags & END_STREAM:
                events.setdefault(stream, []).append("END_STREAM")

    async def downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, int(port))
        try:
            await asyncio.gather(upstream(client_r, server_w), downstream(server_r, client_w))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            server_w.close()
            client_w.close()

    def start(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(r, w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", events
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
