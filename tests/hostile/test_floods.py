"""Header floods and bad framing: the attacker is refused, lbgw stays up, a good client is served.

gRPC's HTTP/2 transport does the refusing here (its header size limits and
frame checks); these tests pin that it does so in front of lbgw, and that
nothing of it reaches the backend or harms a well-behaved client.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

import hpack
import hyperframe.frame

from lbgw.config import Config
from lbgw.testing import EchoBackend
from tests.hostile.rawh2 import RawH2, raw_connect
from tests.integration.support import UNARY, config, echo_backends, request, through

NO_CHECKS = {"health_check": {"mode": "none"}}


def gateway_config(addresses: list[str]) -> Config:
    return config(addresses, cluster=NO_CHECKS)


async def good_call(stub: Any) -> None:
    reply = await stub.Unary(request(message="good"), timeout=10)
    assert reply.message == "good"


async def refused(conn: RawH2, sid: int | None = None, timeout: float = 15.0) -> None:
    """Wait until the server has ended the stream (not OK) or the connection."""
    async with asyncio.timeout(timeout):
        while True:
            if conn.closed.is_set() or conn.goaway is not None:
                return
            if sid is not None:
                stream = conn.streams[sid]
                if stream.reset is not None:
                    return
                if stream.grpc_status is not None:
                    assert stream.grpc_status != 0, stream
                    return
            await asyncio.sleep(0.02)


def _write(conn: RawH2, frame: hyperframe.frame.Frame) -> None:
    with contextlib.suppress(ConnectionError):
        conn.write_raw(frame.serialize())


async def test_a_continuation_flood_is_cut_off() -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS)) as t,
    ):
        async with raw_connect(t.gateway.addresses[0]) as conn:
            block = hpack.Encoder().encode(conn.request_headers(UNARY))
            _write(conn, hyperframe.frame.HeadersFrame(1, block))  # no END_HEADERS
            junk = hpack.Encoder().encode([("x-flood", "v" * 1000)])
            for _ in range(10_000):  # 10 MB of headers that never end
                frame = hyperframe.frame.ContinuationFrame(1, junk)
                _write(conn, frame)
                if conn.closed.is_set() or conn.goaway is not None:
                    break
                await conn.drain()
            await refused(conn)
        assert backend.seen.calls == 0
        await good_call(t.stub)


async def test_ten_thousand_metadata_keys_are_refused() -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS)) as t,
    ):
        async with raw_connect(t.gateway.addresses[0]) as conn:
            metadata = [(f"x-key-{i}", "v") for i in range(10_000)]
            sid = conn.open(UNARY, request(message="m").SerializeToString(), metadata=metadata)
            await conn.drain()
            await refused(conn, sid)
        assert backend.seen.calls == 0
        await good_call(t.stub)


async def test_garbage_after_the_preface_closes_that_connection_only() -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS)) as t,
    ):
        async with raw_connect(t.gateway.addresses[0]) as conn:
            conn.write_raw(b"\x00\x00\x08\xff\x00\x00\x00\x00\x00" + b"not http2" * 100)
            await conn.drain()
            await refused(conn)
        async with raw_connect(t.gateway.addresses[0]) as conn:
            # SETTINGS whose length is not a multiple of 6: FRAME_SIZE_ERROR (RFC 9113, 6.5).
            conn.write_raw(b"\x00\x00\x05\x04\x00" + bytes(4) + b"\x00\x03\x00\x00\x00")
            await conn.drain()
            await refused(conn)
        await good_call(t.stub)


async def test_a_four_gib_length_prefix_is_refused() -> None:
    backend = EchoBackend("a")
    async with (
        echo_backends(backend) as addresses,
        through(config(addresses, cluster=NO_CHECKS)) as t,
    ):
        async with raw_connect(t.gateway.addresses[0]) as conn:
            sid = conn.open(UNARY, end=False)
            conn.conn.send_data(sid, b"\x00" + struct.pack(">I", 2**32 - 1) + b"x" * 100)
            conn.conn.end_stream(sid)
            await conn.drain()
            await refused(conn, sid)
        assert backend.seen.calls == 0
        await good_call(t.stub)
