"""The ``lbgw`` command as a user runs it: serve, graceful drain, workers, demo.

Each test starts the real command as a subprocess on 127.0.0.1, and stops
it by its PID (SIGTERM as a user would; SIGKILL in ``finally`` if it hangs).
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest
from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.testing import EchoBackend
from tests.integration.support import UNARY, echo_backends, lbgw_process, request


def _stub(channel: aio.Channel) -> object:
    return echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]


async def test_serve_quick_form_forwards_with_weights() -> None:
    a, b = EchoBackend("a"), EchoBackend("b")
    async with echo_backends(a, b) as (addr_a, addr_b):
        args = ["--listen", "127.0.0.1:0", "--backend", addr_a, "--backend", f"{addr_b}=3"]
        async with lbgw_process(*args, "--method", f"{UNARY}=unary") as lbgw:
            async with aio.insecure_channel(lbgw.address) as channel:
                stub: object = _stub(channel)
                got = collections.Counter(
                    [(await stub.Unary(request(), timeout=5)).backend for _ in range(40)]  # type: ignore[attr-defined]
                )
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 15) == 0
    assert got == {"a": 10, "b": 30}


async def test_sigterm_drains_calls_in_flight_then_exits_0() -> None:
    backend = EchoBackend("slow", delay=1.0)
    async with echo_backends(backend) as (addr,):  # noqa: SIM117 - the inner context needs the outer
        async with lbgw_process(
            "--listen", "127.0.0.1:0", "--backend", addr, "--grace", "10"
        ) as lbgw:
            async with aio.insecure_channel(lbgw.address) as channel:
                stub = _stub(channel)
                in_flight = asyncio.ensure_future(stub.Unary(request(message="m"), timeout=10))  # type: ignore[attr-defined]
                async with asyncio.timeout(5):
                    while backend.seen.calls == 0:
                        await asyncio.sleep(0.01)
                lbgw.process.send_signal(signal.SIGTERM)
                reply = await asyncio.wait_for(in_flight, 10)
                assert reply.backend == "slow"
                code = await asyncio.to_thread(lbgw.wait, 15)
    assert code == 0
    events = [line["event"] for line in lbgw.lines]
    assert "draining" in events and events[-1] == "stopped"


async def test_sigterm_past_the_grace_period_cancels_the_rest_and_exits_0() -> None:
    backend = EchoBackend("stuck", delay=30.0)
    async with echo_backends(backend) as (addr,):
        async with (
            lbgw_process("--listen", "127.0.0.1:0", "--backend", addr, "--grace", "0.5") as lbgw,
            aio.insecure_channel(lbgw.address) as channel,
        ):
            stub = _stub(channel)
            call = stub.Unary(request(), timeout=20)  # type: ignore[attr-defined]
            async with asyncio.timeout(5):
                while backend.seen.calls == 0:
                    await asyncio.sleep(0.01)
            lbgw.process.send_signal(signal.SIGTERM)
            with pytest.raises(aio.AioRpcError) as info:
                await asyncio.wait_for(call, 10)
            assert info.value.code() in (
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.UNAVAILABLE,
            )
            assert await asyncio.to_thread(lbgw.wait, 15) == 0
        async with asyncio.timeout(5):
            await backend.cancel_seen.wait()  # the backend's call was cancelled too


async def test_workers_share_the_port_and_all_stop_on_sigterm() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,):  # noqa: SIM117 - the inner context needs the outer
        async with lbgw_process(
            "--listen", "127.0.0.1:0", "--backend", addr, "--workers", "2"
        ) as lbgw:
            pids: set[int] = set()
            async with asyncio.timeout(10):
                while len([e for e in lbgw.lines if e["event"] == "listening"]) < 2:
                    await asyncio.sleep(0.05)
            workers = next(e for e in lbgw.lines if e["event"] == "workers")["pids"]
            assert len(workers) == 2
            for e in lbgw.lines:
                if e["event"] == "listening":
                    assert e["address"] == lbgw.address  # one port, shared
                    pids.add(e["pid"])
            assert pids == set(workers)
            for _ in range(8):  # separate connections, spread by the kernel
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with aio.insecure_channel(lbgw.address, options) as channel:
                    reply = await _stub(channel).Unary(request(), timeout=5)  # type: ignore[attr-defined]
                    assert reply.backend == "a"
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 20) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_runs_the_gateway_before_two_backends_and_calls_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lbgw", "demo", "--listen", "127.0.0.1:0", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if "answered by" in line]
    assert len(answers) == 8
    assert sum("backend-2" in line for line in answers) == 6  # weight 3 of 4


async def _black_hole() -> tuple[asyncio.AbstractServer, str]:
    """A TCP server that accepts connections and never answers: a hung backend."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the peer goes away
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_while_starting_exits_0(workers: str) -> None:
    # Reflection against a backend that never answers holds start-up for up
    # to 5 s; a SIGTERM then must still be a clean, quick stop.
    server, hole = await _black_hole()
    async with server:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lbgw",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                hole,
                "--reflection",
                "--workers",
                workers,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            await asyncio.sleep(1.0)
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 15)
            err = process.stderr.read() if process.stderr else ""
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            if process.stderr is not None:
                process.stderr.close()
        assert code == 0, err


def test_a_port_in_use_exits_1_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lbgw",
                "serve",
                "--listen",
                address,
                "--backend",
                "127.0.0.1:1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on {address}" in result.stderr


async def test_workers_stop_when_their_supervisor_is_killed() -> None:
    a = EchoBackend("a")
    async with (
        echo_backends(a) as (addr,),
        lbgw_process("--listen", "127.0.0.1:0", "--backend", addr, "--workers", "2") as lbgw,
    ):
        async with asyncio.timeout(10):
            while len([e for e in lbgw.lines if e["event"] == "listening"]) < 2:
                await asyncio.sleep(0.05)
        workers = next(e for e in lbgw.lines if e["event"] == "workers")["pids"]
        lbgw.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(lbgw.process.wait, 10)
        async with asyncio.timeout(15):
            while any(_alive(pid) for pid in workers):
                await asyncio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_demo_serves_until_ctrl_c_then_exits_0() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "lbgw", "demo", "--listen", "127.0.0.1:0", "--calls", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # bounded by the test timeout
            if line.startswith("serving until Ctrl-C"):
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()
