"""The retry buffer: what it keeps, when it lets go, and a read an attempt's end cannot lose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lbgw.replay import ClientStream, ReplayBuffer


def test_the_buffer_keeps_messages_in_order_up_to_its_limit() -> None:
    buffer = ReplayBuffer(10)
    buffer.record(b"abc")
    buffer.record(b"defg")
    assert (buffer.messages, buffer.size, buffer.replayable) == ([b"abc", b"defg"], 7, True)
    buffer.record(b"hijk")  # 11 bytes: past the limit, nothing is kept any more
    assert (buffer.messages, buffer.replayable) == ([], False)
    buffer.record(b"l")
    assert buffer.messages == []


def test_a_limit_of_exactly_the_stream_keeps_it_and_zero_keeps_nothing() -> None:
    exact = ReplayBuffer(3)
    exact.record(b"abc")
    assert exact.replayable
    none = ReplayBuffer(0)
    assert none.replayable  # nothing read yet: nothing to lose
    none.record(b"a")
    assert not none.replayable


def test_release_drops_everything_for_good() -> None:
    buffer = ReplayBuffer(100)
    buffer.record(b"a")
    buffer.release()
    buffer.record(b"b")
    assert (buffer.messages, buffer.replayable) == ([], False)
    assert "released" in repr(buffer)


async def test_a_read_cut_short_by_a_cancel_is_not_lost() -> None:
    gate = asyncio.Event()

    async def requests() -> AsyncIterator[bytes]:
        yield b"one"
        await gate.wait()
        yield b"two"

    stream = ClientStream(requests(), 100)
    assert await stream.read() == b"one"
    reader = asyncio.ensure_future(stream.read())
    await asyncio.sleep(0.01)
    reader.cancel()  # the attempt ends while the read waits on the client
    await asyncio.gather(reader, return_exceptions=True)
    gate.set()
    assert await stream.read() == b"two"  # the next attempt gets the same read
    assert await stream.read() is None
    assert stream.buffer.messages == [b"one", b"two"]
    assert stream.buffer.ended
    stream.close()
