"""Hostile clients against a real lbgw process: what they cost it, and what a good client sees.

Run ``python bench/hostile.py`` from the repository (``--help`` lists the
knobs). Each scenario starts ``bench/backend.py`` and an ``lbgw serve`` (or
any command given with ``--lbgw``, e.g. another checkout's; a token
``limits.KEY=VALUE`` in it sets that key of ``[limits]``) in their own
processes on 127.0.0.1, attacks with the raw HTTP/2 client of
``tests/hostile/rawh2.py``, and prints a table:

* ``slow``: ``--streams`` server streams (10 per connection) whose client
  never sends WINDOW_UPDATE, so each reads its first 64 KiB and stops; the
  backend would send without end, messages of 64 KiB and of 1 MiB. Reports
  lbgw's peak RSS while attacked, its RSS after the clients left, over
  ``--rounds`` attacks, and a good client's p50 during the attack.
* ``reset``: CVE-2023-44487. ``--resets`` HEADERS + RST_STREAM on one
  connection as fast as it can send them, while a good client on its own
  connection makes unary calls one after another. Reports the good client's
  failed calls, its p50 and p99 against its baseline (the same client, just
  before), and whether the attacker got GOAWAY.
* ``flood``: ``--flood`` concurrent unary calls that each take
  ``--flood-seconds`` at the backend; reports the status codes they get.

RSS is ``VmRSS`` of ``/proc/<pid>/status``, sampled every 0.1 s. Figures
vary with the machine's load: compare runs made side by side (``--repeat``
runs the whole table again and prints each figure's median).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procs import Proc, free_port, stopping

from lbgw.pb import echo_pb2
from tests.hostile.rawh2 import raw_connect

UNARY = "/lbgw.echo.v1.Echo/Unary"
SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"
HERE = Path(__file__).resolve().parent
_PING = echo_pb2.EchoRequest(message="ping", payload=b"x" * 100).SerializeToString()


def rss_mb(pid: int) -> float:
    """The resident set of ``pid`` in MB (VmRSS), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler:
    """Samples a process's RSS every 0.1 s in a task; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.1)

    def reset(self) -> None:
        self.peak = rss_mb(self.pid)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def running(
    lbgw: Sequence[str],
    extra: Sequence[str],
    *,
    stream_count: int = 1,
    stream_size: int = 10,
    echo: bool = False,
) -> AsyncIterator[tuple[str, Proc]]:
    """A backend and an lbgw before it; yields lbgw's address and its process.

    The backend is ``bench/backend.py`` (raw bytes, a server stream of
    ``stream_count`` messages of ``stream_size`` bytes), or with ``echo``
    lbgw's ``EchoBackend``, which honours a request's ``delay_ms``.
    """
    with tempfile.TemporaryDirectory(prefix="lbgw-hostile-") as tmp, stopping([]) as procs:
        work = Path(tmp)
        if echo:
            argv = [sys.executable, "-m", "lbgw.testing", "flood"]
        else:
            argv = [sys.executable, str(HERE / "backend.py")]
            argv += ["--stream-count", str(stream_count), "--stream-size", str(stream_size)]
        backend = Proc("backend", argv, work)
        procs.append(backend)
        port = backend.first_line(20).rsplit(":", 1)[-1]
        listen = f"127.0.0.1:{free_port()}"
        limits = [a.removeprefix("limits.") for a in lbgw if a.startswith("limits.")]
        lbgw = [a for a in lbgw if not a.startswith("limits.")]
        if limits:  # a config file: the quick form has no flags for [limits]
            toml = work / "lbgw.toml"
            toml.write_text(
                f'[[listeners]]\naddress = "{listen}"\n[limits]\n'
                + "".join(f"{kv}\n" for kv in limits)
                + f'[clusters.c]\nendpoints = ["127.0.0.1:{port}"]\n'
                + f'methods = {{ "{UNARY}" = "unary", "{SERVER_STREAM}" = "server_streaming" }}\n'
                + '[clusters.c.health_check]\nmode = "none"\n'
            )
            form = ["--config", str(toml)]
        else:
            form = ["--listen", listen, "--backend", f"127.0.0.1:{port}", "--health-check", "none"]
            form += ["--method", f"{UNARY}=unary", "--method", f"{SERVER_STREAM}=server_streaming"]
        argv = [*lbgw, "serve", *form, "--log-level", "warning", *extra]
        proc = Proc("lbgw", argv, work)
        procs.append(proc)
        async with aio.insecure_channel(listen) as channel:
            call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await call(_PING, timeout=1, wait_for_ready=True)
                    break
                except aio.AioRpcError:
                    if time.monotonic() > deadline or proc.popen.poll() is not None:
                        raise RuntimeError(proc.stderr_tail()) from None
        yield listen, proc


async def good_client(address: str, seconds: float) -> tuple[list[float], collections.Counter[str]]:
    """Unary calls one after another for ``seconds``: latencies (ms) and failed codes."""
    latencies: list[float] = []
    failed: collections.Counter[str] = collections.Counter()
    async with aio.insecure_channel(address) as channel:
        call: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                await call(_PING, timeout=10)
                latencies.append((time.perf_counter() - start) * 1000)
            except aio.AioRpcError as error:
                failed[error.code().name] += 1
            await asyncio.sleep(0.02)
    return latencies, failed


def p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def slow(args: argparse.Namespace, lbgw: list[str], size: int) -> dict[str, float]:
    """Unread server streams: RSS peak while attacked and after, each round; a good client."""
    row: dict[str, float] = {}
    request = echo_pb2.EchoRequest(message="slow").SerializeToString()
    async with running(lbgw, args.lbgw_arg, stream_count=10**7, stream_size=size) as (addr, proc):
        row["rss_start"] = rss_mb(proc.pid)
        sampler = Sampler(proc.pid)
        try:
            for r in range(1, args.rounds + 1):
                sampler.reset()
                async with contextlib.AsyncExitStack() as stack:
                    conns = [
                        await stack.enter_async_context(raw_connect(addr))
                        for _ in range((args.streams + 9) // 10)
                    ]
                    for i in range(args.streams):
                        conn = conns[i // 10]
                        if i % 10 == 0:
                            conn.open_connection_window()
                        conn.open(SERVER_STREAM, request)
                    latencies, failed = await good_client(addr, args.attack_seconds)
                    row[f"peak_{r}"] = sampler.peak
                    row["p50_good"] = statistics.median(latencies) if latencies else float("nan")
                    row["good_failed"] = row.get("good_failed", 0) + sum(failed.values())
                    row["read_kib"] = (
                        sum(s.received for c in conns for s in c.streams.values()) / 1024
                    )
                await asyncio.sleep(args.settle)
                row[f"after_{r}"] = rss_mb(proc.pid)
        finally:
            await sampler.stop()
    return row


_SPAWN = multiprocessing.get_context("spawn")


def rapid_reset(address: str, resets: int) -> tuple[float, int | None, int]:
    """HEADERS + RST_STREAM ``resets`` times on one connection: seconds taken, GOAWAY, sent."""

    async def attack() -> tuple[float, int | None, int]:
        start = time.monotonic()
        sent = 0
        async with raw_connect(address) as conn:
            try:
                for _ in range(resets):
                    conn.reset(conn.open(UNARY, end=False))  # HEADERS only, then RST
                    sent += 1
                    if sent % 200 == 0:
                        await conn.drain()
                        if conn.closed.is_set():
                            break
                await conn.drain()
            except Exception:  # the server closed the connection under us
                pass
            took = time.monotonic() - start
            await asyncio.sleep(0.5)
            return took, conn.goaway, sent

    return asyncio.run(attack())


async def reset(args: argparse.Namespace, lbgw: list[str]) -> dict[str, float]:
    """Rapid reset on one connection; a good client beside it, then alone for its baseline."""
    row: dict[str, float] = {}
    async with running(lbgw, args.lbgw_arg) as (addr, proc):
        base, base_failed = await good_client(addr, 2.0)
        row["base_p50"], row["base_p99"] = p(base, 0.5), p(base, 0.99)

        # The attacker runs in a process of its own: in this one, its busy loop
        # would delay the good client's coroutines and count against lbgw.
        loop = asyncio.get_running_loop()
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=_SPAWN) as pool:
            attacking = loop.run_in_executor(pool, rapid_reset, addr, args.resets)
            under, failed = await good_client(addr, args.attack_seconds)
            took, goaway, sent = await attacking
        row["sent"], row["attack_s"] = sent, took
        row["goaway"] = -1 if goaway is None else goaway
        row["p50"], row["p99"] = p(under, 0.5), p(under, 0.99)
        row["failed"] = sum(failed.values()) + sum(base_failed.values())
        row["calls"] = len(under)
        row["alive"] = 1 if proc.popen.poll() is None else 0
    return row


async def flood(args: argparse.Namespace, lbgw: list[str]) -> dict[str, float]:
    """``--flood`` concurrent calls held ``--flood-seconds`` by the backend: their codes."""
    codes: collections.Counter[str] = collections.Counter()
    async with running(lbgw, args.lbgw_arg, echo=True) as (addr, proc):
        request = echo_pb2.EchoRequest(message="flood", delay_ms=int(args.flood_seconds * 1000))
        raw = request.SerializeToString()
        channels = [aio.insecure_channel(addr) for _ in range(8)]
        try:
            stubs: list[aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
                ch.unary_unary(UNARY) for ch in channels
            ]
            calls = [stubs[i % 8](raw, timeout=args.flood_seconds + 20) for i in range(args.flood)]
            for result in await asyncio.gather(*calls, return_exceptions=True):
                codes["OK" if isinstance(result, bytes) else _code(result)] += 1
        finally:
            for ch in channels:
                await ch.close()
        row: dict[str, float] = dict(codes)
        row["alive"] = 1 if proc.popen.poll() is None else 0
    return row


def _code(error: BaseException) -> str:
    if isinstance(error, aio.AioRpcError):
        return error.code().name
    return type(error).__name__


def _table(title: str, rows: dict[str, list[dict[str, float]]]) -> None:
    keys: list[str] = []
    for runs in rows.values():
        for run in runs:
            keys.extend(k for k in run if k not in keys)
    print(f"\n{title} (median of {max(len(r) for r in rows.values())} run(s))")
    widths = [max(11, len(k) + 2) for k in keys]
    print(f"{'':>18}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True)))
    for name, runs in rows.items():
        cells = []
        for k, w in zip(keys, widths, strict=True):
            values = [run[k] for run in runs if k in run]
            cells.append(f"{statistics.median(values):>{w}.1f}" if values else f"{'-':>{w}}")
        print(f"{name:>18}" + "".join(cells))


async def amain(args: argparse.Namespace) -> int:
    variants: dict[str, list[str]] = {"lbgw": args.lbgw.split()}
    for i, other in enumerate(args.against or []):
        variants[f"against{i + 1}"] = other.split()
    scenarios = args.scenario or ["slow", "reset", "flood"]
    results: dict[str, dict[str, list[dict[str, float]]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for _ in range(args.repeat):
        for name, command in variants.items():  # interleaved: each repeat runs every variant
            if "slow" in scenarios:
                for size in args.sizes:
                    results[f"slow {size // 1024} KiB"][name].append(
                        await slow(args, command, size)
                    )
            if "reset" in scenarios:
                results["reset"][name].append(await reset(args, command))
            if "flood" in scenarios:
                results["flood"][name].append(await flood(args, command))
    for title, rows in results.items():
        _table(title, rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lbgw",
        default=f"{sys.executable} -m lbgw",
        metavar="COMMAND",
        help="the command that runs lbgw, split on spaces (default: this Python -m lbgw)",
    )
    parser.add_argument(
        "--against",
        action="append",
        metavar="COMMAND",
        help="another lbgw command to run side by side (a string, split on spaces)",
    )
    parser.add_argument(
        "--lbgw-arg", action="append", default=[], help="an extra argument to lbgw serve"
    )
    parser.add_argument("--scenario", action="append", choices=("slow", "reset", "flood"))
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64 * 1024, 1024 * 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attack-seconds", type=float, default=8.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--resets", type=int, default=20_000)
    parser.add_argument("--flood", type=int, default=5001)
    parser.add_argument("--flood-seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small and short: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.rounds, args.attack_seconds, args.settle = 10, 1, 2.0, 0.5
        args.resets, args.flood, args.flood_seconds = 500, 50, 0.5
        args.sizes = [64 * 1024]
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
