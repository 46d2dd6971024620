"""Property-based fuzzing of request metadata through lbgw (hypothesis), over real gRPC.

The property, from issue 15: random keys and values, ``-bin`` ones
included, are forwarded byte for byte, or the call is refused with a clear
status. A real echo backend and a real ``Gateway`` run on loopback in a
thread of their own (one event loop for the whole file, so each example is
one call, not one gateway); the client is a real ``grpc.aio`` channel. What
the backend saw is compared with what was sent, less what lbgw documents
that it drops (``proxy.HOP_BY_HOP`` and the ``grpc-`` and ``:`` prefixes).

Keys and values are drawn from what gRPC's client library lets out: it
refuses an illegal key or value itself, before lbgw could see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lbgw.pb import echo_pb2_grpc
from lbgw.proxy import HOP_BY_HOP, RESERVED_PREFIXES
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import config, request

T = TypeVar("T")

#: The clear refusal: the request's headers are over a hop's limit (gRPC's
#: default hard limit is 16 KiB, ``grpc.max_metadata_size``).
REFUSALS = {grpc.StatusCode.RESOURCE_EXHAUSTED}

KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
keys = st.one_of(
    st.text(alphabet=KEY_CHARS, min_size=1, max_size=40),
    st.sampled_from([*sorted(HOP_BY_HOP), "grpc-timeout", "grpc-x", "x-b3-traceid"]),
).filter(lambda k: not k.endswith("-bin"))
ascii_values = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], max_size=200)
binary_values = st.binary(max_size=300)
pairs = st.one_of(
    st.tuples(keys, ascii_values),
    st.tuples(keys.map(lambda k: k + "-bin"), binary_values),
)
# Now and then a lot of it, to reach the header size limits.
metadata = st.one_of(
    st.lists(pairs, max_size=12),
    st.lists(
        st.tuples(keys.map(lambda k: k + "-bin"), st.binary(min_size=1000, max_size=4000)),
        min_size=1,
        max_size=20,
    ),
)


class Loop:
    """An event loop in a thread; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Rig:
    backend: EchoBackend
    stub: Any


@pytest.fixture(scope="module")
def rig() -> Iterator[tuple[Loop, Rig]]:
    loop = Loop()
    rig = Rig()
    stack = contextlib.AsyncExitStack()

    async def start() -> None:
        rig.backend = EchoBackend("fuzz")
        address = await stack.enter_async_context(serve(echo_registrar(rig.backend)))
        cfg = config([address], cluster={"health_check": {"mode": "none"}})
        gateway = await stack.enter_async_context(Gateway(cfg))
        channel = await stack.enter_async_context(aio.insecure_channel(gateway.addresses[0]))
        rig.stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]

    try:
        loop.run(start())
        yield loop, rig
    finally:
        with contextlib.suppress(Exception):
            loop.run(stack.aclose())
        loop.close()


def _by_key(pairs: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    """Each key's values, in order: what gRPC preserves (its metadata spec keeps
    the order of one key's values, not the order between keys)."""
    values: dict[str, list[Any]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    return values


def _kept(pairs: Iterable[tuple[str, Any]]) -> dict[str, list[Any]]:
    return _by_key(
        (k, v) for k, v in pairs if k not in HOP_BY_HOP and not k.startswith(RESERVED_PREFIXES)
    )


@settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(metadata)
@example(md=[("big-bin", b"\xff" * 20_000)])
@example(md=[("a", "1"), ("b-bin", b"\x00"), ("a", "2"), ("te", "trailers"), ("a", "3")])
def test_metadata_is_forwarded_byte_for_byte_or_refused_clearly(
    rig: tuple[Loop, Rig], md: list[tuple[str, Any]]
) -> None:
    loop, r = rig
    sent = tuple(md)
    before = len(r.backend.seen.metadata)

    async def call() -> grpc.StatusCode | None:
        try:
            await r.stub.Unary(request(message="md"), metadata=sent, timeout=10)
        except aio.AioRpcError as error:
            assert error.details(), error  # a clear status says why
            return error.code()
        return None

    code = loop.run(call())
    event(f"refused {code.name}" if code is not None else "forwarded")
    if code is not None:
        assert code in REFUSALS, code
        return
    assert len(r.backend.seen.metadata) == before + 1
    seen = _by_key((k, v) for k, v in r.backend.seen.metadata[-1] if k != "user-agent")
    assert seen == _kept(sent)
