"""Keepalive benchmark: lbgw's backend keepalive never draws GOAWAY too_many_pings.

Run ``python bench/keepalive.py`` (10 minutes; ``--minutes`` to change it,
``--quick`` for a 40 s smoke run). One backend, ``python -m lbgw.testing``:
a ``grpc.aio`` server with gRPC's default settings (5 minutes between PINGs
without data, 2 strikes). In front of it, ``lbgw serve --config`` processes,
one per row: health checks ``watch``, ``check`` and ``tcp`` (lbgw picks its
keepalive by the health mode, ``lbgw/keepalive.py``), each twice:

* **call in flight**: a bidi stream through lbgw that sends one message,
  gets its reply, then stays silent for the whole run, so the backend
  channel always has a call open and the backend writes nothing on it
  but the answers to lbgw's own health probes (no other call goes
  through that gateway): the case where keepalive PINGs could collect
  strikes. At the end the stream sends one more message: it survived if
  that is answered.
* **no call in flight**: the channel is idle but for 3 unary calls every
  30 s (lbgw sends keepalive PINGs only while a call is open).

Two last rows are controls, beside a silent stream: **control** sets
``grpc.keepalive_time_ms = 1000`` and ``grpc.http2.max_pings_without_data =
0`` in its ``channel_options``: the server must answer with too_many_pings
within seconds, which shows that the count below would see one.
**control-10s-unprobed** uses the 10 s that lbgw picks with gRPC health
checks, but with ``tcp`` checks, so nothing makes the backend write between
PINGs: expect a GOAWAY after a few minutes (2 PINGs, then gRPC's client
slows to one a minute; the third strike is the GOAWAY). GOAWAYs are counted from lbgw's
stderr, where gRPC logs "Received a GOAWAY with error code
ENHANCE_YOUR_CALM and debug data equal to \\"too_many_pings\\"".

Everything listens on 127.0.0.1 on ports the OS chose; every process started
here is stopped by its PID. It asserts nothing (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from args import positive
from grpc import aio
from procs import Proc, stopping

from lbgw.config import HealthCheckConfig
from lbgw.keepalive import keepalive_options
from lbgw.pb import echo_pb2, echo_pb2_grpc

START_TIMEOUT = 30.0
KINDS = {
    "/lbgw.echo.v1.Echo/Unary": "unary",
    "/lbgw.echo.v1.Echo/Bidi": "bidi_streaming",
}
GOAWAY_TEXT = "too_many_pings"


@dataclass
class Row:
    name: str
    health: str
    keepalive: str
    in_flight: bool
    goaways: int = 0
    stream: str = "-"
    unary_ok: int = 0
    unary_failed: int = 0
    codes: dict[str, int] = field(default_factory=dict)


def _config(backend: str, health: str, options: dict[str, int]) -> str:
    lines = [
        '[[listeners]]\naddress = "127.0.0.1:0"\n',
        "[clusters.echo]",
        f'endpoints = [{{ address = "{backend}" }}]',
        "methods = { " + ", ".join(f'"{m}" = "{k}"' for m, k in KINDS.items()) + " }",
    ]
    if options:
        lines.append(
            "channel_options = { " + ", ".join(f'"{k}" = {v}' for k, v in options.items()) + " }"
        )
    lines += ["\n[clusters.echo.health_check]", f'mode = "{"grpc" if health != "tcp" else "tcp"}"']
    if health in ("watch", "check"):
        lines.append(f'rpc = "{health}"')
    return "\n".join(lines) + "\n"


def _keepalive(health: str, options: dict[str, int]) -> str:
    mode = "tcp" if health == "tcp" else "grpc"
    chosen = dict(keepalive_options(HealthCheckConfig(mode=mode)))
    chosen.update(options)
    time_s = chosen["grpc.keepalive_time_ms"] / 1000
    timeout_s = chosen.get("grpc.keepalive_timeout_ms", 20000) / 1000
    return f"{time_s:g} s / {timeout_s:g} s"


def _start_lbgw(workdir: Path, name: str, text: str) -> tuple[Proc, str]:
    path = workdir / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    argv = [sys.executable, "-m", "lbgw", "serve", "--config", str(path), "--log-format", "json"]
    proc = Proc(name, argv, workdir)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in proc.err_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return proc, str(event["address"])
        if proc.popen.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen: {proc.stderr_tail()}")


async def _silent_stream(address: str, row: Row, stop: asyncio.Event) -> None:
    async with aio.insecure_channel(address) as channel:
        stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Bidi()
        try:
            await call.write(echo_pb2.EchoRequest(message="first"))
            await call.read()
            ended = asyncio.ensure_future(call.code())
            waiting = asyncio.ensure_future(stop.wait())
            await asyncio.wait({ended, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                row.stream = f"ended {ended.result().name}"
                waiting.cancel()
                return
            ended.cancel()
            await call.write(echo_pb2.EchoRequest(message="last"))
            reply = await asyncio.wait_for(call.read(), 10)
            row.stream = "survived" if reply.message == "last" else "no reply"
            await call.done_writing()
        except aio.AioRpcError as error:
            row.stream = f"ended {error.code().name}"
        finally:
            call.cancel()


async def _bursts(address: str, row: Row, stop: asyncio.Event, every: float) -> None:
    async with aio.insecure_channel(address) as channel:
        stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            for _ in range(3):
                try:
                    await stub.Unary(echo_pb2.EchoRequest(message="m"), timeout=10)
                    row.unary_ok += 1
                except aio.AioRpcError as error:
                    row.unary_failed += 1
                    row.codes[error.code().name] = row.codes.get(error.code().name, 0) + 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)


async def _run(args: argparse.Namespace, workdir: Path, procs: list[Proc]) -> list[Row]:
    backend = Proc("backend", [sys.executable, "-m", "lbgw.testing", "ka"], workdir)
    procs.append(backend)
    address = backend.first_line(START_TIMEOUT)
    setups: list[tuple[str, str, dict[str, int], bool]] = []
    for health in ("watch", "check", "tcp"):
        setups.append((f"{health}-in-flight", health, {}, True))
        setups.append((f"{health}-idle", health, {}, False))
    control = {"grpc.keepalive_time_ms": 1000, "grpc.http2.max_pings_without_data": 0}
    setups.append(("control", "tcp", control, True))
    # grpc mode's 10 s without the probes that make the backend write: strikes.
    setups.append(("control-10s-unprobed", "tcp", {"grpc.keepalive_time_ms": 10_000}, True))
    rows, tasks, gateways = [], [], []
    stop = asyncio.Event()
    for name, health, options, in_flight in setups:
        proc, gateway = _start_lbgw(workdir, name, _config(address, health, options))
        procs.append(proc)
        gateways.append(proc)
        row = Row(name, health, _keepalive(health, options), in_flight)
        rows.append(row)
        if in_flight:
            tasks.append(asyncio.ensure_future(_silent_stream(gateway, row, stop)))
        else:
            tasks.append(asyncio.ensure_future(_bursts(gateway, row, stop, args.burst_every)))
    print(f"running {args.minutes:g} min with {len(rows)} gateways", file=sys.stderr, flush=True)
    await asyncio.sleep(args.minutes * 60)
    stop.set()
    await asyncio.gather(*tasks)
    for row, proc in zip(rows, gateways, strict=True):
        text = proc.err_path.read_text(encoding="utf-8", errors="replace")
        row.goaways = text.count(GOAWAY_TEXT)
    return rows


def _report(args: argparse.Namespace, rows: Sequence[Row]) -> None:
    print(f"\nkeepalive against a default grpc.aio server, {args.minutes:g} minutes\n")
    head = (
        "gateway",
        "keepalive time/timeout",
        "lines with too_many_pings",
        "silent stream",
        "unary ok/failed",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        failed = f"{r.unary_failed}" + (f" {r.codes}" if r.codes else "")
        unary = "-" if r.in_flight else f"{r.unary_ok}/{failed}"
        print(f"| {r.name} | {r.keepalive} | {r.goaways} | {r.stream} | {unary} |")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=positive(float), default=10.0)
    parser.add_argument("--burst-every", type=positive(float), default=30.0, metavar="SECONDS")
    parser.add_argument("--quick", action="store_true", help="40 s, bursts every 10 s")
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.minutes, args.burst_every = 40 / 60, 10.0
    with tempfile.TemporaryDirectory(prefix="lbgw-keepalive-") as tmp, stopping([]) as procs:
        rows = asyncio.run(_run(args, Path(tmp), procs))
    _report(args, rows)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
