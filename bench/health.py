"""Health benchmark: how fast lbgw takes a bad endpoint out, what a death costs, what checks cost.

Run ``python bench/health.py`` (``--help`` lists the knobs; ``--quick`` is a
smoke test of about a minute). Each run starts ``lbgw serve --config`` as a
subprocess in front of three echo backends, each a process of its own
(``python bench/health.py backend``: ``lbgw.testing.EchoBackend`` with a
``lbgw.health.HealthService``, told over its stdin to turn NOT_SERVING and
asked for what it saw), and a client in this process keeps ``--concurrency``
unary calls in flight. It measures:

1. **out after NOT_SERVING**: from the moment a backend's health service
   says NOT_SERVING to the last call that reaches it, with ``rpc = "watch"``
   and with ``rpc = "check"`` at ``--check-interval`` (default 5 s, lbgw's
   default; those runs take up to twice that long each: the flip comes at a
   random phase of the interval). Both ends are read on the backend's own
   clock.
2. **out after SIGKILL**: from killing a backend to the gateway's log line
   that takes it out (``"state": "ejected"``) and to the last attempt it
   sent there (the last ``retry`` line that names it, logged at debug
   level), with active checks off: passive ejection alone. Kill time and log
   time are both wall-clock time on this machine (the log has milliseconds).
3. **calls lost per death**: client calls that failed around that kill, with
   retries on (the default, 2 attempts) and off (``max_attempts = 1``), and
   with lbgw's default health config (Watch, ejection on).
4. **CPU of checking**: a gateway with ``--endpoints`` endpoints (one backend
   process listening on that many ports), idle for ``--idle`` seconds, with
   ``rpc = "check"`` every 0.1 s, with ``rpc = "watch"`` and with checks
   off; CPU is utime+stime of the gateway from ``/proc/<pid>/stat``
   (``bench/procs.py``). The checks are counted by the backend, so the cost
   per check is (CPU_check - CPU_none) / checks; per endpoint and second at
   the default interval it is that over 5 s (plus half the 10% jitter).

Medians of ``--runs`` runs (3; ``--quick``: 1, with shorter windows and a
1 s check interval). Everything listens on 127.0.0.1 on ports the OS chose;
every process started here is stopped by its PID (SIGTERM, then SIGKILL), on
errors, Ctrl-C and SIGTERM too. ``--json PATH`` writes every run. It asserts
no figure (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import select
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeAlias

from args import positive
from procs import TICKS, Proc, stopping

UNARY = "/lbgw.echo.v1.Echo/Unary"
#: How long a process may take to start listening.
START_TIMEOUT = 30.0
#: Jitter lbgw adds to each check interval, on average (half of its default 10%).
MEAN_JITTER = 0.05

_Json: TypeAlias = dict[str, Any]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the backend process ------------------------------------------------------


def _backend_main(name: str, ports: Sequence[int]) -> None:
    """``backend NAME --port P ...``: echo + health on each port; commands on stdin.

    Prints ``{"addresses": [...]}``, then answers one JSON line per command
    line: ``down`` / ``up`` (health NOT_SERVING / SERVING, with the time it
    flipped) and ``stats`` (calls, the time of the last one, checks answered).
    Times are ``time.monotonic()`` of this process. Exits at EOF or SIGTERM.
    """
    from grpc import aio  # noqa: PLC0415 - the parent process does not need them
    from grpc_health.v1 import health_pb2  # noqa: PLC0415

    from lbgw.health import HealthService  # noqa: PLC0415
    from lbgw.pb import echo_pb2  # noqa: PLC0415
    from lbgw.testing import EchoBackend, echo_registrar  # noqa: PLC0415

    class Health(HealthService):
        checks = 0

        async def Check(  # noqa: N802 - the protocol's name
            self, request: health_pb2.HealthCheckRequest, context: Any
        ) -> health_pb2.HealthCheckResponse:
            Health.checks += 1
            return await super().Check(request, context)

    class Echo(EchoBackend):
        last = 0.0

        async def Unary(  # noqa: N802
            self, request: echo_pb2.EchoRequest, context: Any
        ) -> echo_pb2.EchoResponse:
            Echo.last = time.monotonic()
            return await super().Unary(request, context)

    async def run() -> None:
        echo, health = Echo(name), Health()
        server = aio.server()
        echo_registrar(echo, health=health)(server)
        bound = [server.add_insecure_port(f"127.0.0.1:{p}") for p in ports]
        await server.start()
        print(json.dumps({"addresses": [f"127.0.0.1:{p}" for p in bound]}), flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        flipped: float | None = None
        lines = asyncio.ensure_future(reader.readline())
        stopped = asyncio.ensure_future(stop.wait())
        while True:
            await asyncio.wait((lines, stopped), return_when=asyncio.FIRST_COMPLETED)
            if stopped.done() or not lines.result():
                break
            command = lines.result().decode().strip()
            lines = asyncio.ensure_future(reader.readline())
            if command in ("down", "up"):
                health.set("", command == "up")
                flipped = time.monotonic()
                reply: _Json = {"at": flipped}
            else:
                reply = {
                    "calls": echo.seen.calls,
                    "last": Echo.last,
                    "flipped": flipped,
                    "checks": Health.checks,
                    "now": time.monotonic(),
                }
            print(json.dumps(reply), flush=True)
        lines.cancel()
        await server.stop(0)

    asyncio.run(run())


class Backend:
    """A backend process started here, and the commands it takes."""

    def __init__(self, name: str, workdir: Path, ports: Sequence[int] = (0,)) -> None:
        argv = [sys.executable, "-u", __file__, "backend", name]
        for port in ports:
            argv += ["--port", str(port)]
        self.name = name
        self.proc = Proc(f"backend-{name}-{time.monotonic_ns()}", argv, workdir, pipes=True)
        self.addresses: list[str] = self._read(START_TIMEOUT)["addresses"]

    @property
    def address(self) -> str:
        return self.addresses[0]

    def _read(self, timeout: float) -> _Json:
        stdout = self.proc.popen.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"backend {self.name} did not answer: {self.proc.stderr_tail()}")
        answer: _Json = json.loads(line)
        return answer

    def ask(self, command: str) -> _Json:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return self._read(10.0)


# --- the gateway process ------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def _config_text(endpoints: Sequence[str], cluster: _Json) -> str:
    """A one-cluster lbgw config: the echo methods' kinds known, ``cluster`` tables added."""
    lines = [
        '[[listeners]]\naddress = "127.0.0.1:0"\n',
        "[clusters.echo]",
        "endpoints = [" + ", ".join(f'{{ address = "{e}" }}' for e in endpoints) + "]",
        f'methods = {{ "{UNARY}" = "unary" }}',
    ]
    for table, values in cluster.items():
        lines.append(f"\n[clusters.echo.{table}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Gateway:
    """``lbgw serve --config`` as a subprocess, and its JSON log lines."""

    def __init__(
        self, workdir: Path, endpoints: Sequence[str], cluster: _Json, *, debug: bool = False
    ) -> None:
        stamp = time.monotonic_ns()
        path = workdir / f"lbgw-{stamp}.toml"
        path.write_text(_config_text(endpoints, cluster), encoding="utf-8")
        argv = [sys.executable, "-m", "lbgw", "serve", "--config", str(path)]
        argv += ["--log-format", "json", "--log-level", "debug" if debug else "info"]
        self.proc = Proc(f"lbgw-{stamp}", argv, workdir)
        listening = self.wait_for(lambda e: e.get("event") == "listening", START_TIMEOUT)
        self.address: str = listening["address"]

    def lines(self) -> list[_Json]:
        events = []
        text = self.proc.err_path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def wait_for(self, predicate: Callable[[_Json], bool], timeout: float) -> _Json:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.lines():
                if predicate(event):
                    return event
            if self.proc.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"lbgw: no such log line in {timeout:g} s: {self.proc.stderr_tail()}")


def _wall(event: _Json) -> float:
    """A log line's time (``ts``, UTC, milliseconds) as ``time.time()``."""
    ts = str(event["ts"]).replace("Z", "+00:00")
    return datetime.fromisoformat(ts).timestamp()


# --- the client -----------------------------------------------------------------------


@dataclass
class Calls:
    ok: int = 0
    failed: int = 0
    failed_at: list[float] = field(default_factory=list)  # time.time() of each failure


@contextlib.asynccontextmanager
async def _load(address: str, concurrency: int) -> AsyncIterator[Calls]:
    """``concurrency`` loops of unary calls (raw bytes) until the block ends."""
    from grpc import aio  # noqa: PLC0415

    calls = Calls()
    done = asyncio.Event()
    async with aio.insecure_channel(address) as channel:
        unary: Any = channel.unary_unary(UNARY)

        async def caller() -> None:
            while not done.is_set():
                try:
                    await unary(b"", timeout=5)
                    calls.ok += 1
                except aio.AioRpcError:
                    calls.failed += 1
                    calls.failed_at.append(time.time())

        tasks = [asyncio.ensure_future(caller()) for _ in range(concurrency)]
        try:
            yield calls
        finally:
            done.set()
            await asyncio.gather(*tasks, return_exceptions=True)


# --- the measurements -----------------------------------------------------------------


@dataclass
class Row:
    """One figure: its runs and their median."""

    what: str
    unit: str
    runs: list[float | None] = field(default_factory=list)
    note: str = ""
    digits: int | None = None  # decimals shown; None: by size

    def median(self) -> float | None:
        values = [v for v in self.runs if v is not None]
        return statistics.median(values) if values else None


async def _out_after_not_serving(
    args: argparse.Namespace, workdir: Path, procs: list[Proc], health: _Json
) -> float | None:
    """One run: seconds from a backend's NOT_SERVING to the last call it got."""
    backends = [Backend(f"b{i}", workdir) for i in range(3)]
    procs += [b.proc for b in backends]
    gateway = Gateway(workdir, [b.address for b in backends], {"health_check": health})
    procs.append(gateway.proc)
    victim = backends[0]
    try:
        async with _load(gateway.address, args.concurrency) as calls:
            await asyncio.sleep(args.warmup)
            if victim.ask("stats")["calls"] == 0:
                raise RuntimeError("the victim got no call during the warm-up")
            interval = float(health.get("interval", 5.0))
            if health.get("rpc") == "check":
                # Checks run at start-up and then every interval: flip at a random
                # phase of it, or every run would wait the same (interval - warm-up).
                await asyncio.sleep(random.uniform(0, interval))
            flipped = float(victim.ask("down")["at"])
            await asyncio.to_thread(
                gateway.wait_for,
                lambda e: e.get("endpoint") == victim.address and e.get("state") == "not_serving",
                interval * 1.2 + 5,
            )
            await asyncio.sleep(0.3)  # calls already on their way arrive
            last = float(victim.ask("stats")["last"])
        if calls.failed:
            _progress(f"  {calls.failed} calls failed")
        return max(0.0, last - flipped)
    finally:
        for p in (gateway.proc, *(b.proc for b in backends)):
            p.stop()
            procs.remove(p)


@dataclass
class Death:
    ejected_s: float | None  # kill -> the log line that took it out
    last_attempt_s: float | None  # kill -> the last attempt sent to it (retry lines)
    lost: int  # client calls that failed
    calls: int


async def _death(
    args: argparse.Namespace, workdir: Path, procs: list[Proc], cluster: _Json
) -> Death:
    """One run: SIGKILL a backend under load; what the gateway did and what the client lost."""
    backends = [Backend(f"b{i}", workdir) for i in range(3)]
    procs += [b.proc for b in backends]
    gateway = Gateway(workdir, [b.address for b in backends], cluster, debug=True)
    procs.append(gateway.proc)
    victim = backends[1]
    try:
        async with _load(gateway.address, args.concurrency) as calls:
            await asyncio.sleep(args.warmup)
            killed = time.time()
            os.kill(victim.proc.pid, signal.SIGKILL)
            await asyncio.sleep(args.after_kill)
        lines = gateway.lines()
        out = [
            _wall(e)
            for e in lines
            if e.get("endpoint") == victim.address and e.get("state") in ("ejected", "not_serving")
        ]
        attempts = [
            _wall(e)
            for e in lines
            if e.get("event") == "retry" and e.get("failed") == victim.address
        ]
        return Death(
            ejected_s=min(out) - killed if out else None,
            last_attempt_s=max(attempts) - killed if attempts else None,
            lost=calls.failed,
            calls=calls.ok + calls.failed,
        )
    finally:
        for p in (gateway.proc, *(b.proc for b in backends)):
            p.stop()
            procs.remove(p)


def _cpu_s(proc: Proc) -> float:
    return sum(proc.cpu().values()) / TICKS


async def _idle_cpu(
    args: argparse.Namespace, workdir: Path, procs: list[Proc], backend: Backend, health: _Json
) -> tuple[float, int]:
    """One run: the gateway's CPU seconds over ``--idle`` idle seconds, and checks answered."""
    gateway = Gateway(workdir, backend.addresses, {"health_check": health})
    procs.append(gateway.proc)
    try:
        await asyncio.sleep(1.0)  # start-up and first checks done
        checks0, cpu0 = backend.ask("stats")["checks"], _cpu_s(gateway.proc)
        await asyncio.sleep(args.idle)
        checks1, cpu1 = backend.ask("stats")["checks"], _cpu_s(gateway.proc)
        return cpu1 - cpu0, int(checks1 - checks0)
    finally:
        gateway.proc.stop()
        procs.remove(gateway.proc)


async def _measure(args: argparse.Namespace, workdir: Path, procs: list[Proc]) -> list[Row]:
    interval = args.check_interval
    watch = Row("NOT_SERVING -> last call, rpc=watch", "ms")
    check = Row(
        f"NOT_SERVING -> last call, rpc=check every {interval:g} s",
        "ms",
        note="random phase: 0 to the interval, ~half of it on average",
    )
    for run in range(args.runs):
        _progress(f"run {run + 1}/{args.runs}: NOT_SERVING, watch and check")
        for row, rpc in ((watch, "watch"), (check, "check")):
            health = {"rpc": rpc, "interval": interval}
            s = await _out_after_not_serving(args, workdir, procs, health)
            row.runs.append(None if s is None else s * 1000)

    no_checks = {"health_check": {"mode": "none"}}
    deaths: dict[str, list[Death]] = {"on": [], "off": [], "default": []}
    configs: dict[str, _Json] = {
        "on": no_checks,
        "off": no_checks | {"retries": {"max_attempts": 1}},
        "default": {},
    }
    for run in range(args.runs):
        for key, cluster in configs.items():
            _progress(f"run {run + 1}/{args.runs}: SIGKILL, retries {key}")
            deaths[key].append(await _death(args, workdir, procs, cluster))

    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1000

    rows = [watch, check]
    on, off, default = deaths["on"], deaths["off"], deaths["default"]
    rows.append(Row("SIGKILL -> EJECTED (checks off)", "ms", [ms(d.ejected_s) for d in on]))
    rows.append(
        Row("SIGKILL -> last attempt sent (checks off)", "ms", [ms(d.last_attempt_s) for d in on])
    )
    rows.append(
        Row("SIGKILL -> out, default health config", "ms", [ms(d.ejected_s) for d in default])
    )
    note = f"{args.concurrency} callers, {args.after_kill:g} s after the kill"
    rows.append(Row("calls lost per death, retries on", "calls", [d.lost for d in on], note, 0))
    rows.append(Row("calls lost per death, retries off", "calls", [d.lost for d in off], note, 0))
    rows.append(
        Row("calls lost per death, default config", "calls", [d.lost for d in default], note, 0)
    )

    k = args.endpoints
    _progress(f"CPU of checking: one backend process on {k} ports")
    backend = Backend("many", workdir, [0] * k)
    procs.append(backend.proc)
    idle: dict[str, list[tuple[float, int]]] = {"none": [], "check": [], "watch": []}
    healths: dict[str, _Json] = {
        "none": {"mode": "none"},
        "check": {"rpc": "check", "interval": 0.1},
        "watch": {"rpc": "watch"},
    }
    for run in range(args.runs):
        for key, health in healths.items():  # interleaved, so drifts hit all alike
            _progress(f"run {run + 1}/{args.runs}: idle CPU, {key}")
            idle[key].append(await _idle_cpu(args, workdir, procs, backend, health))
    per_check: list[float | None] = []
    per_watch: list[float | None] = []
    for (none_cpu, _), (check_cpu, checks), (watch_cpu, _) in zip(
        idle["none"], idle["check"], idle["watch"], strict=True
    ):
        per_check.append((check_cpu - none_cpu) / checks * 1e6 if checks else None)
        per_watch.append((watch_cpu - none_cpu) / (k * args.idle) * 1e6)
    default_rate = 1 / (5.0 * (1 + MEAN_JITTER))
    rows.append(Row("CPU per Check (gateway side)", "µs", per_check, f"{k} endpoints, 0.1 s"))
    rows.append(
        Row(
            "CPU per endpoint-second, rpc=check every 5 s",
            "µs/s",
            [None if c is None else c * default_rate for c in per_check],
            "per Check x 1/5.25 s",
        )
    )
    rows.append(
        Row(
            "CPU per endpoint-second, rpc=watch idle",
            "µs/s",
            per_watch,
            f"(watch - none) idle; 1 clock tick = {1e6 / TICKS / (k * args.idle):.0f}",
        )
    )
    rows.append(
        Row(
            "gateway idle CPU, checks off",
            "ms/s",
            [c / args.idle * 1000 for c, _ in idle["none"]],
            f"{k} endpoints",
        )
    )
    return rows


# --- output -----------------------------------------------------------------------------


def _fmt(x: float | None, digits: int | None = None) -> str:
    if x is None:
        return "-"
    if abs(x) < 1e-9:
        x = 0.0  # no "-0.00" from subtracting equal CPU readings
    if digits is not None:
        return f"{x:,.{digits}f}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.2f}"


def _report(args: argparse.Namespace, rows: Sequence[Row]) -> None:
    print(
        f"# lbgw health benchmark: nproc {len(os.sched_getaffinity(0))}, "
        f"{args.concurrency} unary callers, 3 backend processes, lbgw serve as a subprocess; "
        f"medians of {args.runs} run(s)"
    )
    head = ("measurement", "median", "unit", "runs", "note")
    table = [head]
    for r in rows:
        runs = " ".join(_fmt(v, r.digits) for v in r.runs)
        table.append((r.what, _fmt(r.median(), r.digits), r.unit, runs, r.note))
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    out = [
        "  ".join(
            f"{v:>{w}}" if i == 1 else f"{v:<{w}}"
            for i, (v, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    print("\n".join([out[0], "-" * len(out[0]), *out[1:]]))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/health.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=positive(int), default=None, help="runs per figure (3)")
    p.add_argument("--quick", action="store_true", help="one short run of each, for CI")
    p.add_argument(
        "--check-interval",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help="interval of the rpc=check runs of measurement 1 (5, lbgw's default; quick: 1)",
    )
    p.add_argument("--concurrency", type=positive(int), default=8, help="unary calls in flight")
    p.add_argument("--endpoints", type=positive(int), default=20, help="endpoints for CPU runs")
    p.add_argument("--idle", type=positive(float), default=None, help="idle CPU window (5 s)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backend"]:
        backend = argparse.ArgumentParser(prog="bench/health.py backend")
        backend.add_argument("name")
        backend.add_argument("--port", type=int, action="append", default=[])
        parsed = backend.parse_args(argv[1:])
        _backend_main(parsed.name, parsed.port or [0])
        return 0
    args = _parser().parse_args(argv)
    args.runs = int(args.runs or (1 if args.quick else 3))
    args.check_interval = float(args.check_interval or (1.0 if args.quick else 5.0))
    args.idle = float(args.idle or (2.0 if args.quick else 5.0))
    args.warmup = 0.5 if args.quick else 1.0
    args.after_kill = 1.0 if args.quick else 2.0

    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lbgw-health-") as tmp, stopping([]) as procs:
        try:
            rows = asyncio.run(_measure(args, Path(tmp), procs))
        except RuntimeError as exc:
            _progress(f"bench/health.py: {exc}")
            return 1
    _report(args, rows)
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        result = {"settings": settings, "rows": [asdict(r) | {"median": r.median()} for r in rows]}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        _progress(f"wrote {len(rows)} rows to {args.json}")
    _progress(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
