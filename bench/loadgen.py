"""The proxy benchmark's grpcio load generator: fixed concurrency, raw bytes, one process.

``bench/proxy.py`` runs it in processes of its own, so the load generator's
CPU is never the proxy's. Two commands:

* ``probe TARGET``: retry a short unary call until one succeeds or
  ``--timeout`` passes, then one server-streaming call; print one JSON line
  ``{"unary": bool, "stream_msgs": int, "error": str}`` and exit 0 when the
  unary call succeeded.
* ``load TARGET``: open ``--channels`` channels, keep ``--concurrency`` calls
  in flight for ``--warmup`` seconds, print ``ready``, wait for a line on
  stdin, keep the calls in flight for ``--duration`` seconds more, let the
  calls in flight finish, and print one JSON line: calls, messages, errors,
  the elapsed seconds and (unary) every call's latency in microseconds.

Every channel takes ``grpc.use_local_subchannel_pool``, so each opens a
connection of its own: with several channels the kernel's SO_REUSEPORT hash
can spread them over the workers of ``lbgw --workers N``. No serializers:
requests and responses stay ``bytes``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import grpc
from grpc import aio

UNARY = "/lbgw.echo.v1.Echo/Unary"
SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"

#: A call slower than this counts as an error; the proxies answer in milliseconds.
CALL_TIMEOUT = 10.0
#: Stop early when this many calls fail in one phase: the target is broken.
MAX_ERRORS = 100

_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)

if TYPE_CHECKING:
    Unary: TypeAlias = aio.UnaryUnaryMultiCallable[bytes, bytes]
    Stream: TypeAlias = aio.UnaryStreamMultiCallable[bytes, bytes]


@dataclass
class _Phase:
    """What the workers did between two instants."""

    end: float
    calls: int = 0
    msgs: int = 0
    errors: int = 0
    first_error: str = ""
    latencies_us: list[int] = field(default_factory=list)

    def failed(self, err: grpc.RpcError) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{err.code()}: {err.details()}"


async def _unary_worker(call: Unary, payload: bytes, phase: _Phase) -> None:
    lat = phase.latencies_us
    clock = time.perf_counter_ns
    loop_time = asyncio.get_running_loop().time
    while loop_time() < phase.end and phase.errors < MAX_ERRORS:
        t0 = clock()
        try:
            await call(payload, timeout=CALL_TIMEOUT)
        except grpc.RpcError as err:
            phase.failed(err)
            continue
        lat.append((clock() - t0) // 1000)
        phase.calls += 1


async def _stream_worker(call: Stream, payload: bytes, phase: _Phase) -> None:
    loop_time = asyncio.get_running_loop().time
    while loop_time() < phase.end and phase.errors < MAX_ERRORS:
        msgs = 0
        try:
            async for _ in call(payload, timeout=CALL_TIMEOUT):
                msgs += 1
        except grpc.RpcError as err:
            phase.failed(err)
        else:
            phase.calls += 1
        phase.msgs += msgs


async def _phase(
    channels: Sequence[aio.Channel], kind: str, concurrency: int, payload: bytes, seconds: float
) -> _Phase:
    phase = _Phase(end=asyncio.get_running_loop().time() + seconds)
    workers = []
    for i in range(concurrency):
        ch = channels[i % len(channels)]
        if kind == "unary":
            unary: Unary = ch.unary_unary(UNARY)
            workers.append(_unary_worker(unary, payload, phase))
        else:
            stream: Stream = ch.unary_stream(SERVER_STREAM)
            workers.append(_stream_worker(stream, payload, phase))
    await asyncio.gather(*workers)
    return phase


def _channel(args: argparse.Namespace) -> aio.Channel:
    """A channel to the target: TLS verified against ``--ca`` when given, else plaintext."""
    if not args.ca:
        return aio.insecure_channel(args.target, options=_OPTIONS)
    with open(args.ca, "rb") as f:
        credentials = grpc.ssl_channel_credentials(f.read())
    return aio.secure_channel(args.target, credentials, options=_OPTIONS)


async def _load(args: argparse.Namespace) -> int:
    payload = b"x" * args.payload
    channels = [_channel(args) for _ in range(args.channels)]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), timeout=CALL_TIMEOUT)
        warm = await _phase(channels, args.kind, args.concurrency, payload, args.warmup)
        if warm.errors >= MAX_ERRORS:
            print(json.dumps({"error": f"warm-up failed: {warm.first_error}"}), flush=True)
            return 1
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        t0 = time.perf_counter()
        phase = await _phase(channels, args.kind, args.concurrency, payload, args.duration)
        elapsed = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close()
    result = {
        "calls": phase.calls,
        "msgs": phase.msgs,
        "errors": phase.errors,
        "error": phase.first_error,
        "elapsed": elapsed,
        "latencies_us": phase.latencies_us,
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


async def _probe(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    result: dict[str, object] = {"unary": False, "stream_msgs": 0, "error": ""}
    async with _channel(args) as ch:
        unary: Unary = ch.unary_unary(UNARY)
        while True:
            try:
                await unary(b"probe", timeout=1.0)
            except grpc.RpcError as err:
                result["error"] = f"unary: {err.code()}: {err.details()}"
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.1)
                continue
            result["unary"], result["error"] = True, ""
            break
        if result["unary"] and args.stream:
            stream: Stream = ch.unary_stream(SERVER_STREAM)
            msgs = 0
            try:
                async for _ in stream(b"probe", timeout=CALL_TIMEOUT):
                    msgs += 1
            except grpc.RpcError as err:
                result["error"] = f"stream: {err.code()}: {err.details()}"
            result["stream_msgs"] = msgs
    print(json.dumps(result), flush=True)
    return 0 if result["unary"] else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/loadgen.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="wait until TARGET answers a unary call")
    probe.add_argument("target")
    probe.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS")
    probe.add_argument("--stream", action="store_true", help="then try one streaming call")
    probe.add_argument("--ca", default="", metavar="FILE", help="TLS, verified against this CA")
    load = sub.add_parser("load", help="measure TARGET under a fixed concurrency")
    load.add_argument("target")
    load.add_argument("--kind", choices=("unary", "stream"), default="unary")
    load.add_argument("--concurrency", type=int, default=32)
    load.add_argument("--channels", type=int, default=4)
    load.add_argument("--payload", type=int, default=100, metavar="BYTES")
    load.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS")
    load.add_argument("--duration", type=float, default=5.0, metavar="SECONDS")
    load.add_argument("--ca", default="", metavar="FILE", help="TLS, verified against this CA")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return asyncio.run(_load(args) if args.command == "load" else _probe(args))


if __name__ == "__main__":
    sys.exit(main())
