"""Black-hole benchmark: how long a frozen (SIGSTOPped) backend stays in rotation, at what cost.

Run ``python bench/blackhole.py`` (``--quick``: one run of each case).
Two echo backends (``python -m lbgw.testing``) behind ``lbgw serve
--config``; ``--concurrency`` clients (8) keep unary calls going with a
``--deadline`` (2 s), and one bidi stream is open on the backend about to
freeze, with a 30 s deadline. Then that backend is SIGSTOPped for
``--window`` seconds (20). It reports, per case (health ``rpc`` and
``interval``), medians of ``--runs`` runs (3):

* **out after**: from the SIGSTOP to lbgw's log line that takes it out
  (``not_serving`` or ``ejected``); "never" if none came in the window;
* **calls failed**: unary calls that failed in the window, and the share;
* **stream ended**: when the stream in flight on it ended, and its code
  (``DEADLINE_EXCEEDED`` at 30 s means nothing noticed).

``--src DIR`` runs lbgw (and the backends) from another checkout, e.g. an
export of ``main``, so before and after are measured the same way, runs
interleaved. Everything listens on 127.0.0.1 on ports the OS chose; every
process started here is stopped by its PID (SIGCONT first). It asserts
nothing (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from args import positive
from grpc import aio
from procs import Proc, stopping

from lbgw.pb import echo_pb2, echo_pb2_grpc

START_TIMEOUT = 30.0
STREAM_DEADLINE = 30.0
CASES = (("watch", 5.0), ("check", 5.0), ("watch", 0.5))


@dataclass
class Run:
    version: str
    rpc: str
    interval: float
    out_after: float | None
    calls: int
    failed: int
    stream_after: float
    stream_code: str


def _proc(name: str, argv: list[str], workdir: Path, src: Path | None) -> Proc:
    """``argv`` as a Proc; with ``src``, run from that tree (``env`` execs, same PID)."""
    if src is not None:
        # An export has no built extension: the pure-Python twin picks.
        argv = ["env", "-C", str(src), f"PYTHONPATH={src}", "LBGW_NO_EXTENSIONS=1", *argv]
    return Proc(name, argv, workdir)


def _lines(proc: Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.err_path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _wall(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


def _wait_listening(proc: Proc) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for event in _lines(proc):
            if event.get("event") == "listening":
                return str(event["address"])
        time.sleep(0.05)
    raise RuntimeError(f"lbgw did not listen: {proc.stderr_tail()}")


async def _one(  # noqa: PLR0913, PLR0915 - one run, inline
    *,
    args: argparse.Namespace,
    workdir: Path,
    procs: list[Proc],
    version: str,
    src: Path | None,
    rpc: str,
    interval: float,
) -> Run:
    py = sys.executable
    stamp = time.monotonic_ns()
    frozen = _proc(f"frozen-{stamp}", [py, "-m", "lbgw.testing", "frozen"], workdir, src)
    steady = _proc(f"steady-{stamp}", [py, "-m", "lbgw.testing", "steady"], workdir, src)
    procs += [frozen, steady]
    frozen_addr, steady_addr = frozen.first_line(START_TIMEOUT), steady.first_line(START_TIMEOUT)
    config = workdir / f"lbgw-{stamp}.toml"
    config.write_text(
        '[[listeners]]\naddress = "127.0.0.1:0"\n\n[clusters.echo]\n'
        f'endpoints = ["{frozen_addr}", "{steady_addr}"]\n'
        'methods = { "/lbgw.echo.v1.Echo/Unary" = "unary", '
        '"/lbgw.echo.v1.Echo/Bidi" = "bidi_streaming" }\n'
        f'[clusters.echo.health_check]\nmode = "grpc"\nrpc = "{rpc}"\ninterval = {interval}\n',
        encoding="utf-8",
    )
    argv = [py, "-m", "lbgw", "serve", "--config", str(config), "--log-format", "json"]
    lbgw = _proc(f"lbgw-{stamp}", argv, workdir, src)
    procs.append(lbgw)
    try:
        address = _wait_listening(lbgw)
        async with aio.insecure_channel(address) as channel:
            stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
            async with asyncio.timeout(30):
                while True:  # both in rotation, and a stream on the one to freeze
                    seen = {(await stub.Unary(echo_pb2.EchoRequest(), timeout=5)).backend}
                    seen.add((await stub.Unary(echo_pb2.EchoRequest(), timeout=5)).backend)
                    stream = stub.Bidi(timeout=STREAM_DEADLINE)
                    await stream.write(echo_pb2.EchoRequest(message="a"))
                    if (await stream.read()).backend == "frozen" and len(seen) == 2:
                        break
                    stream.cancel()
            calls = failed = 0
            stop = asyncio.Event()

            async def client() -> None:
                nonlocal calls, failed
                while not stop.is_set():
                    calls += 1
                    try:
                        await stub.Unary(echo_pb2.EchoRequest(), timeout=args.deadline)
                    except aio.AioRpcError:
                        failed += 1

            async def watch_stream() -> tuple[float, str]:
                await stream.write(echo_pb2.EchoRequest(message="b"))
                try:
                    await stream.read()
                    code = "OK"
                except aio.AioRpcError as error:
                    code = error.code().name
                return time.time() - frozen_at, code

            frozen_at = time.time()
            frozen.popen.send_signal(signal.SIGSTOP)
            try:
                clients = [asyncio.ensure_future(client()) for _ in range(args.concurrency)]
                ended = asyncio.ensure_future(watch_stream())
                await asyncio.sleep(args.window)
                stop.set()
                await asyncio.gather(*clients)
                stream_after, stream_code = await ended
            finally:
                frozen.popen.send_signal(signal.SIGCONT)
        outs = [
            _wall(e) - frozen_at
            for e in _lines(lbgw)
            if e.get("event") == "endpoint state"
            and e.get("endpoint") == frozen_addr
            and e.get("state") in ("not_serving", "ejected")
            and _wall(e) >= frozen_at
        ]
        out_after = min(outs) if outs and min(outs) <= args.window else None
        return Run(version, rpc, interval, out_after, calls, failed, stream_after, stream_code)
    finally:
        for proc in (lbgw, frozen, steady):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
            proc.stop()


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _report(args: argparse.Namespace, runs: list[Run]) -> None:
    print(f"\nfrozen backend for {args.window:g} s; medians of {args.runs} run(s)\n")
    print("| version | rpc | interval s | out after s | calls failed | stream ended |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(r.rpc, r.interval, r.version) for r in runs}, key=lambda k: (k[0], -k[1]))
    for rpc, interval, version in keys:
        rs = [r for r in runs if (r.rpc, r.interval, r.version) == (rpc, interval, version)]
        outs = [r.out_after for r in rs]
        out = (
            "never"
            if all(o is None for o in outs)
            else f"{_median([o if o is not None else float('inf') for o in outs]):.1f}"
            + (f" ({sum(o is None for o in outs)} never)" if None in outs else "")
        )
        failed = _median([r.failed for r in rs])
        share = _median([r.failed / max(r.calls, 1) * 100 for r in rs])
        codes = "/".join(sorted({r.stream_code for r in rs}))
        stream = f"{_median([r.stream_after for r in rs]):.1f} s {codes}"
        print(
            f"| {version} | {rpc} | {interval:g} | {out} | {failed:.0f} ({share:.0f}%) | {stream} |"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=positive(float), default=20.0, metavar="S")
    parser.add_argument("--deadline", type=positive(float), default=2.0, metavar="S")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--src", type=Path, help="run lbgw from this source tree (as 'before')")
    parser.add_argument("--quick", action="store_true", help="one run of each case")
    parser.add_argument("--json", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.runs = 1
    versions: list[tuple[str, Path | None]] = [("this", None)]
    if args.src is not None:
        versions.insert(0, ("--src", args.src.resolve()))
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="lbgw-blackhole-") as tmp, stopping([]) as procs:
        for _ in range(args.runs):
            for rpc, interval in CASES:
                for version, src in versions:
                    run = asyncio.run(
                        _one(
                            args=args,
                            workdir=Path(tmp),
                            procs=procs,
                            version=version,
                            src=src,
                            rpc=rpc,
                            interval=interval,
                        )
                    )
                    print(run, file=sys.stderr, flush=True)
                    runs.append(run)
    _report(args, runs)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
