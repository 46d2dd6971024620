"""A frozen backend (SIGSTOP): out of rotation within 10 s, its calls end fast.

Two echo backends, each ``python -m lbgw.testing`` in a process of its own,
behind the real ``lbgw serve`` with lbgw's default health config but for
``--health-rpc``. One is SIGSTOPped: its TCP connections stay open and
nothing on them is answered, the black hole that a hung host or a partition
makes. The tests assert what a user notices: the log line that takes it out
comes within 10 s of the SIGSTOP, a stream that was in flight on it ends with
``UNAVAILABLE`` long before its deadline, a well-behaved client beside it
gets OK for every call once it is out, lbgw stays up, and after SIGCONT the
backend comes back. Processes are stopped by PID (SIGCONT first), always.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import grpc
import pytest
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from tests.integration.support import ALL_KINDS, LbgwProcess, lbgw_process, request

#: The issue's target: a frozen backend is out within this many seconds.
OUT_WITHIN = 10.0


@contextlib.contextmanager
def backend_process(name: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -m lbgw.testing NAME``; yields it and its address. SIGCONT + SIGKILL at exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "lbgw.testing", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()  # bounded by the test timeout
        assert address.startswith("127.0.0.1:"), address
        yield process, address
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGKILL)
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


async def _state_line(lbgw: LbgwProcess, address: str, states: set[str], after: float) -> Any:
    """The first ``endpoint state`` line for ``address`` into one of ``states`` after ``after``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in list(lbgw.lines):
            if (
                line.get("event") == "endpoint state"
                and line.get("endpoint") == address
                and line.get("state") in states
                and _wall(line) >= after - 0.001
            ):
                return line
        assert lbgw.process.poll() is None, "lbgw exited"
        await asyncio.sleep(0.05)
    seen = [ln for ln in lbgw.lines if ln.get("endpoint") == address]
    raise AssertionError(f"{address} did not turn {states} within 60 s: {seen}")


#: The deadline of the stream in flight on the frozen backend. Under gRPC's
#: 1-minute PING timeout, so that only keepalive can end it with UNAVAILABLE.
STREAM_DEADLINE = 50.0


async def _stream_on(stub: Any, backend: str) -> Any:
    """A bidi stream through lbgw whose first reply came from ``backend``."""
    async with asyncio.timeout(30):
        while True:
            call = stub.Bidi(timeout=STREAM_DEADLINE)
            await call.write(request(message="first"))
            reply = await call.read()
            if reply.backend == backend:
                return call
            call.cancel()


@pytest.mark.parametrize("rpc", ["watch", "check"])
async def test_a_sigstopped_backend_leaves_rotation_and_its_calls_fail_fast(  # noqa: PLR0915
    rpc: str,
) -> None:
    methods = [arg for m, kind in ALL_KINDS.items() for arg in ("--method", f"{m}={kind}")]
    with (
        backend_process("frozen") as (frozen, frozen_addr),
        backend_process("steady") as (
            _,
            steady_addr,
        ),
    ):
        args = ["--listen", "127.0.0.1:0", "--backend", frozen_addr, "--backend", steady_addr]
        async with lbgw_process(*args, "--health-rpc", rpc, *methods) as lbgw:  # noqa: SIM117 - the inner context needs the outer
            async with aio.insecure_channel(lbgw.address) as channel:
                stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                # Both in rotation: the first checks have passed.
                async with asyncio.timeout(30):
                    while {(await stub.Unary(request(), timeout=5)).backend for _ in range(4)} != {
                        "frozen",
                        "steady",
                    }:
                        await asyncio.sleep(0.1)
                on_frozen = await _stream_on(stub, "frozen")
                on_steady = await _stream_on(stub, "steady")

                # A well-behaved client keeps calling, one call at a time.
                outcomes: list[tuple[float, str, str]] = []  # (end time, code, backend)
                stop = asyncio.Event()

                async def well_behaved() -> None:
                    while not stop.is_set():
                        try:
                            reply = await stub.Unary(request(message="m"), timeout=3)
                            outcomes.append((time.time(), "OK", reply.backend))
                        except aio.AioRpcError as error:
                            outcomes.append((time.time(), error.code().name, ""))
                        await asyncio.sleep(0.05)

                client = asyncio.ensure_future(well_behaved())
                frozen_at = time.time()
                frozen.send_signal(signal.SIGSTOP)
                try:
                    # The stream in flight on the frozen backend ends with UNAVAILABLE
                    # (keepalive), not at its deadline with DEADLINE_EXCEEDED.
                    await on_frozen.write(request(message="into the hole"))
                    with pytest.raises(aio.AioRpcError) as ended:
                        await on_frozen.read()
                    assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
                    stream_ended_after = time.time() - frozen_at

                    out = await _state_line(
                        lbgw, frozen_addr, {"not_serving", "ejected"}, frozen_at
                    )
                    out_after = _wall(out) - frozen_at
                    assert out_after < OUT_WITHIN, out

                    # Calls that started once it was out all succeed, on the steady backend.
                    async with asyncio.timeout(30):
                        while sum(1 for t, _, _ in outcomes if t > _wall(out) + 3.5) < 10:
                            await asyncio.sleep(0.1)
                finally:
                    frozen.send_signal(signal.SIGCONT)
                    thawed_at = time.time()
                    stop.set()
                    await client
                after_out = [(c, b) for t, c, b in outcomes if t > _wall(out) + 3.5]
                states = [ln for ln in lbgw.lines if ln.get("event") == "endpoint state"]
                assert after_out and set(after_out) == {("OK", "steady")}, (frozen_at, states)
                # Before it was out, the client saw OK or a deadline; nothing else.
                assert {c for _, c, _ in outcomes} <= {"OK", "DEADLINE_EXCEEDED"}

                # The stream on the steady backend never noticed.
                await on_steady.write(request(message="still there"))
                assert (await on_steady.read()).message == "still there"
                await on_steady.done_writing()
                assert await on_steady.code() is grpc.StatusCode.OK

                # Thawed, it comes back into rotation.
                await _state_line(lbgw, frozen_addr, {"serving"}, thawed_at)
                assert lbgw.process.poll() is None
    print(f"{rpc}: out after {out_after:.1f} s, stream ended after {stream_ended_after:.1f} s")
