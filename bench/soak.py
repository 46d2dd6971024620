"""Soak: N minutes of mixed load while backends die, flip and freeze; what is lost, and memory.

Run ``python bench/soak.py`` (10 minutes; ``--minutes`` to change it, ``--quick``
for 30 s, the CI smoke run). ``lbgw serve --config`` runs with its default
health and retry settings in front of four echo backends, each a process of
its own (``python bench/health.py backend``: ``lbgw.testing.EchoBackend``
with a health service it can flip):

* ``steady`` is left alone;
* ``killed`` is SIGKILLed every ``--kill-every`` seconds (20) and started
  again on the same port at once;
* ``flipping`` turns NOT_SERVING and back every ``--flip-every`` seconds (10);
* ``frozen`` is SIGSTOPped for ``--freeze-for`` seconds (5) every
  ``--freeze-every`` seconds (60), the first time 30 s in.

``--concurrency`` clients per call kind (4) keep calls going: unary,
server streaming (5 replies), client streaming (5 requests) and bidi
(5 round trips), each with a 10 s deadline. It reports calls made and lost
by kind, with the codes of the lost ones, and p50/p99 of the calls that
succeeded; and lbgw's RSS and open fds (``/proc/<pid>/status`` VmRSS,
``/proc/<pid>/fd``) at the start, after the first minute, at the end and
at the peak. Targets from issue 15: the kinds lbgw retries (unary, and a
server stream before its first reply) lose nothing; RSS at the end is
within 10% of RSS after the first minute.

Everything listens on 127.0.0.1 on ports the OS chose; every process started
here is stopped by its PID (a frozen one gets SIGCONT first). It asserts
nothing (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from args import positive
from grpc import aio
from health import Backend
from procs import Proc, stopping

from lbgw.pb import echo_pb2, echo_pb2_grpc

START_TIMEOUT = 30.0
DEADLINE = 10.0
MESSAGES = 5
KINDS = {
    "unary": "/lbgw.echo.v1.Echo/Unary",
    "server_streaming": "/lbgw.echo.v1.Echo/ServerStream",
    "client_streaming": "/lbgw.echo.v1.Echo/ClientStream",
    "bidi_streaming": "/lbgw.echo.v1.Echo/Bidi",
}


@dataclass
class Kind:
    made: int = 0
    ok: int = 0
    lost: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    #: The lost calls' codes and details, and how many of each.
    why: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: int) -> float | None:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else None
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[q - 1]


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int


def _sample(pid: int, start: float) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Sample(time.monotonic() - start, rss, fds)


def _config(endpoints: Sequence[str]) -> str:
    return "\n".join(
        [
            '[[listeners]]\naddress = "127.0.0.1:0"\n',
            "[clusters.echo]",
            "endpoints = [" + ", ".join(f'{{ address = "{e}" }}' for e in endpoints) + "]",
            "methods = { " + ", ".join(f'"{m}" = "{k}"' for k, m in KINDS.items()) + " }",
        ]
    )


def _start_lbgw(workdir: Path, endpoints: Sequence[str], extra: str) -> tuple[Proc, str]:
    path = workdir / "lbgw.toml"
    path.write_text(_config(endpoints) + "\n" + extra.replace("\\n", "\n") + "\n", "utf-8")
    argv = [sys.executable, "-m", "lbgw", "serve", "--config", str(path), "--log-format", "json"]
    proc = Proc("lbgw", argv, workdir)
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
    raise RuntimeError(f"lbgw did not listen: {proc.stderr_tail()}")


def _requests() -> list[echo_pb2.EchoRequest]:
    return [echo_pb2.EchoRequest(message=f"m{i}") for i in range(MESSAGES)]


async def _requests_stream() -> AsyncIterator[echo_pb2.EchoRequest]:
    for r in _requests():
        yield r


async def _one(stub: Any, kind: str) -> None:
    """One call of ``kind``; raises AioRpcError, or AssertionError on a wrong answer."""
    if kind == "unary":
        reply = await stub.Unary(echo_pb2.EchoRequest(message="u"), timeout=DEADLINE)
        assert reply.message == "u"
    elif kind == "server_streaming":
        request = echo_pb2.EchoRequest(message="s", response_count=MESSAGES)
        got = [r.index async for r in stub.ServerStream(request, timeout=DEADLINE)]
        assert got == list(range(MESSAGES)), got
    elif kind == "client_streaming":
        reply = await stub.ClientStream(_requests_stream(), timeout=DEADLINE)
        assert reply.index == MESSAGES, reply
    else:
        call = stub.Bidi(timeout=DEADLINE)
        for r in _requests():
            await call.write(r)
            assert (await call.read()).message == r.message
        await call.done_writing()
        assert await call.read() is aio.EOF


async def _client(address: str, kind: str, tally: Kind, stop: asyncio.Event) -> None:
    async with aio.insecure_channel(address) as channel:
        stub: Any = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            tally.made += 1
            start = time.perf_counter()
            try:
                await _one(stub, kind)
            except aio.AioRpcError as error:
                name = error.code().name
                tally.lost[name] = tally.lost.get(name, 0) + 1
                why = f"{name}: {(error.details() or '')[:160]}"
                tally.why[why] = tally.why.get(why, 0) + 1
            except AssertionError:
                tally.lost["WRONG_ANSWER"] = tally.lost.get("WRONG_ANSWER", 0) + 1
            else:
                tally.ok += 1
                tally.latencies_ms.append((time.perf_counter() - start) * 1000)


@dataclass
class Faults:
    kills: int = 0
    flips: int = 0
    freezes: int = 0
    log: list[str] = field(default_factory=list)


async def _chaos(  # noqa: PLR0913 - the three faults' backends and timings
    *,
    args: argparse.Namespace,
    workdir: Path,
    procs: list[Proc],
    backends: dict[str, Backend],
    faults: Faults,
    stop: asyncio.Event,
) -> None:
    start = time.monotonic()
    next_kill, next_flip, next_freeze = args.kill_every, args.flip_every, args.first_freeze
    down = False
    while not stop.is_set():
        now = time.monotonic() - start
        if now >= next_kill:
            killed = backends["killed"]
            port = int(killed.address.rsplit(":", 1)[1])
            killed.proc.popen.send_signal(signal.SIGKILL)
            await asyncio.to_thread(killed.proc.popen.wait, 10)
            backends["killed"] = await asyncio.to_thread(Backend, "killed", workdir, (port,))
            procs.append(backends["killed"].proc)
            faults.kills += 1
            next_kill += args.kill_every
        if now >= next_flip:
            down = not down
            await asyncio.to_thread(backends["flipping"].ask, "down" if down else "up")
            faults.flips += 1
            next_flip += args.flip_every
        if now >= next_freeze:
            frozen = backends["frozen"].proc.popen
            frozen.send_signal(signal.SIGSTOP)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.freeze_for)
            finally:
                frozen.send_signal(signal.SIGCONT)
            faults.freezes += 1
            next_freeze += args.freeze_every
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    if down:
        await asyncio.to_thread(backends["flipping"].ask, "up")


async def _run(
    args: argparse.Namespace, workdir: Path, procs: list[Proc]
) -> tuple[dict[str, Kind], list[Sample], Faults]:
    backends: dict[str, Backend] = {}
    for name in ("steady", "killed", "flipping", "frozen"):
        backends[name] = Backend(name, workdir)
        procs.append(backends[name].proc)
    lbgw, address = _start_lbgw(workdir, [b.address for b in backends.values()], args.toml)
    procs.append(lbgw)
    start = time.monotonic()
    samples: list[Sample] = []
    first = _sample(lbgw.pid, start)
    if first is not None:
        samples.append(first)
    stop = asyncio.Event()
    kinds = {kind: Kind() for kind in KINDS}
    clients = [
        asyncio.ensure_future(_client(address, kind, tally, stop))
        for kind, tally in kinds.items()
        for _ in range(args.concurrency)
    ]
    faults = Faults()
    chaos = asyncio.ensure_future(
        _chaos(args=args, workdir=workdir, procs=procs, backends=backends, faults=faults, stop=stop)
    )
    end = start + args.minutes * 60
    while time.monotonic() < end and lbgw.popen.poll() is None and not chaos.done():
        await asyncio.sleep(1.0)
        sample = _sample(lbgw.pid, start)
        if sample is not None:
            samples.append(sample)
    stop.set()
    await asyncio.gather(*clients)
    await chaos  # raises what went wrong in it
    if lbgw.popen.poll() is not None:
        raise RuntimeError(f"lbgw exited during the soak: {lbgw.stderr_tail()}")
    return kinds, samples, faults


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _at(samples: Sequence[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.at - t))


def _report(
    args: argparse.Namespace, kinds: dict[str, Kind], samples: list[Sample], f: Faults
) -> None:
    print(
        f"\nsoak: {args.minutes:g} min, {args.concurrency} clients per kind; "
        f"{f.kills} kills, {f.flips} NOT_SERVING flips, "
        f"{f.freezes} freezes of {args.freeze_for:g} s\n"
    )
    print("| kind | made | ok | lost | lost by code | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for kind, k in kinds.items():
        lost = sum(k.lost.values())
        codes = ", ".join(f"{c} {n}" for c, n in sorted(k.lost.items())) or "-"
        print(
            f"| {kind} | {k.made} | {k.ok} | {lost} | {codes} | "
            f"{_fmt(k.percentile(50))} | {_fmt(k.percentile(99))} |"
        )
    for kind, k in kinds.items():
        for why, n in sorted(k.why.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {kind} lost {n}: {why}")
    if not samples:
        return
    minute = _at(samples, min(60.0, samples[-1].at))
    peak_rss = max(samples, key=lambda s: s.rss_kib)
    peak_fds = max(samples, key=lambda s: s.fds)
    print("\n| lbgw | at s | RSS MiB | open fds |")
    print("|---|---|---|---|")
    for label, s in (
        ("start", samples[0]),
        ("after the first minute", minute),
        ("end", samples[-1]),
        ("peak RSS", peak_rss),
        ("peak fds", peak_fds),
    ):
        print(f"| {label} | {s.at:.0f} | {s.rss_kib / 1024:.1f} | {s.fds} |")
    change = (samples[-1].rss_kib - minute.rss_kib) / minute.rss_kib * 100
    print(f"\nRSS at the end vs after the first minute: {change:+.1f}% (target: within 10%)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=positive(float), default=10.0)
    parser.add_argument("--concurrency", type=int, default=4, help="clients per call kind")
    parser.add_argument("--kill-every", type=positive(float), default=20.0, metavar="S")
    parser.add_argument("--flip-every", type=positive(float), default=10.0, metavar="S")
    parser.add_argument("--freeze-every", type=positive(float), default=60.0, metavar="S")
    parser.add_argument("--freeze-for", type=positive(float), default=5.0, metavar="S")
    parser.add_argument("--first-freeze", type=positive(float), default=30.0, metavar="S")
    parser.add_argument("--quick", action="store_true", help="30 s: one kill, one freeze at 12 s")
    parser.add_argument(
        "--toml",
        default="",
        metavar="TEXT",
        help="appended to lbgw's config (\\n for a new line), e.g. "
        "'[clusters.echo.retries]\\nmin_retry_concurrency = 100'",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.minutes, args.first_freeze = 0.5, 12.0
    with tempfile.TemporaryDirectory(prefix="lbgw-soak-") as tmp, stopping([]) as procs:
        try:
            kinds, samples, faults = asyncio.run(_run(args, Path(tmp), procs))
        finally:
            for proc in procs:  # a frozen backend takes no SIGTERM
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGCONT)
    _report(args, kinds, samples, faults)
    if args.json:
        figures = {
            "kinds": {k: {**v.__dict__, "latencies_ms": None} for k, v in kinds.items()},
            "samples": [s.__dict__ for s in samples],
            "faults": faults.__dict__,
        }
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
