"""Instructions per unary call of the lbgw process, counted by callgrind.

Run ``python bench/callgrind.py`` (``--help`` lists the knobs; ``--quick``,
one run of 20 and 60 calls, is a smoke test of well under a minute). It
starts the fast echo backend (``bench/backend.py``) in a process of its own
and, for each count N, one ``lbgw serve`` (the quick form: one worker,
``swrr``, the echo ``Unary`` method's kind given, health checks and tracing
off) under ``valgrind --tool=callgrind --separate-threads=no``. A grpcio
client in this process makes N sequential unary calls of a fixed 100-byte
request on one channel and checks every reply; then lbgw gets SIGTERM, drains,
exits 0, and callgrind writes the instructions (``Ir``) of every thread of
the process.

Start-up and shutdown cost the same whatever N is, so one difference cancels
them: instructions per call = (Ir(high) - Ir(low)) / (high - low), with N =
``--calls-low`` and ``--calls-high``. Unlike CPU time on a small shared
machine, the count hardly depends on what else the machine does, but it is
not exact: valgrind runs one thread at a time, so when grpc's threads contend
for an ``absl::Mutex`` the waiter spins until its time slice ends, and how
often that happens depends on when the packets arrive. One process's count
moves by up to some 35 M instructions from run to run, so the default figure
by up to 3% (790 to 810 k per call at 3aaa083): compare the medians of
``--runs 3`` or more, and read differences under a few percent as noise.

lbgw runs with a fixed environment (``env -i``): ``PYTHONHASHSEED=0``, a
fixed ``PATH`` and locale, and nothing else, so no ``OTEL_*``, ``GRPC_*``,
``LBGW_*`` or ``VALGRIND_OPTS`` variable of the caller changes what it does.
``--lbgw`` chooses the executable, so the same script can measure another
checkout's lbgw (``--lbgw ../base/.venv/bin/lbgw``). Everything listens on
127.0.0.1 on ports the OS chose; every process started here is stopped by its
PID on the way out, on errors, Ctrl-C and SIGTERM too. ``--json PATH`` writes
the settings and every run. It asserts no figure (STYLE.md, "Habits"), and
exits 1 when a count failed, so ``--quick`` can guard CI.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from args import positive
from backend import UNARY
from procs import Proc, free_port, stopping

HERE = Path(__file__).resolve().parent

DEFAULT_CALLS_LOW = 1000
DEFAULT_CALLS_HIGH = 3000
DEFAULT_RUNS = 1
QUICK_CALLS_LOW = 20
QUICK_CALLS_HIGH = 60

#: The request of every call; the backend echoes it.
PAYLOAD = b"x" * 100
#: lbgw's whole environment: nothing of the caller's, so nothing that changes the count.
LBGW_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
#: Under callgrind lbgw runs some 50 times slower: start-up takes tens of seconds.
START_TIMEOUT = 300.0
#: One call; a few milliseconds under callgrind, more for the first.
CALL_TIMEOUT = 30.0
#: Calls through the unmeasured lbgw that first writes Python's bytecode caches.
WARM_UP_CALLS = 3
#: From SIGTERM to exit: lbgw drains (nothing is in flight), callgrind writes its file.
EXIT_TIMEOUT = 120.0
#: Retry the first connection soon: lbgw listens only once it has started.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class _Run:
    """One run: the instructions of one lbgw process per count of calls."""

    run: int
    ir_low: int
    ir_high: int
    calls_low: int
    calls_high: int

    @property
    def per_call(self) -> float:
        return (self.ir_high - self.ir_low) / (self.calls_high - self.calls_low)


def _lbgw_binary(given: str | None) -> str:
    """``--lbgw``, else the ``lbgw`` beside this Python: ``.venv/bin/lbgw`` for the venv's."""
    if given:
        return given
    return str(Path(sys.executable).with_name("lbgw"))


def _read_ir(path: Path) -> int:
    """The ``totals:`` line of a callgrind file (its only event is Ir), else ``summary:``."""
    found: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("totals", "summary"):
                found[key] = int(value.split()[0])
    if not found:
        raise RuntimeError(f"{path.name}: no totals: or summary: line")
    return found.get("totals", found.get("summary", 0))


def _wait_ready(channel: grpc.Channel, proc: Proc) -> None:
    """Until ``channel`` connects; gives up when lbgw exits or START_TIMEOUT passes."""
    ready = grpc.channel_ready_future(channel)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            ready.result(timeout=0.2)
            return
        except grpc.FutureTimeoutError:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"lbgw exited while starting: {proc.stderr_tail()}") from None
            if time.monotonic() > deadline:
                ready.cancel()
                raise RuntimeError(f"lbgw not serving after {START_TIMEOUT:g} s") from None


def _call(address: str, calls: int, proc: Proc) -> None:
    """``calls`` sequential unary calls on one channel, each reply checked, then close."""
    with grpc.insecure_channel(address, options=_CHANNEL_OPTIONS) as channel:
        _wait_ready(channel, proc)
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(UNARY)
        for i in range(calls):
            try:
                reply = unary(PAYLOAD, timeout=CALL_TIMEOUT)
            except grpc.RpcError as err:
                raise RuntimeError(f"call {i + 1} of {calls} failed: {err}") from None
            if reply != PAYLOAD:
                raise RuntimeError(f"call {i + 1} of {calls}: the reply is not the request")


@dataclass(frozen=True)
class _Lbgw:
    """How each lbgw of a measurement starts: which executable, in front of which backend."""

    binary: str
    valgrind: str
    backend: str
    workdir: Path
    out_dir: Path
    main_thread: bool = False
    metrics: bool = False

    def argv(self, port: int, out_file: Path | None) -> list[str]:
        """lbgw in a fixed environment, under callgrind writing ``out_file`` unless None."""
        env = shutil.which("env") or "/usr/bin/env"
        argv = [env, "-i", *(f"{k}={v}" for k, v in LBGW_ENV.items())]
        if out_file is not None:
            argv += [
                self.valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out_file}",
                f"--separate-threads={'yes' if self.main_thread else 'no'}",
                "--trace-children=no",
            ]
        argv += [self.binary, "serve", "--listen", f"127.0.0.1:{port}", "--backend", self.backend]
        argv += ["--strategy", "swrr", "--method", f"{UNARY}=unary"]
        # Health checks run on a timer: how many fall in a count would depend on time.
        argv += ["--health-check", "none", "--log-level", "warning"]
        if self.metrics:  # the admin port on: every call is counted for /metrics
            argv += ["--admin", "127.0.0.1:0"]
        return argv

    def serve(self, name: str, calls: int, out_file: Path | None) -> None:
        """Start one lbgw, make ``calls`` calls through it, SIGTERM it and see it exit 0."""
        port = free_port()
        procs: list[Proc] = []
        with stopping(procs):
            proc = Proc(name, self.argv(port, out_file), self.workdir)
            procs.append(proc)
            _call(f"127.0.0.1:{port}", calls, proc)
            proc.popen.send_signal(signal.SIGTERM)
            try:
                code = proc.popen.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{name} still running {EXIT_TIMEOUT:g} s after SIGTERM"
                ) from None
        if code != 0:
            raise RuntimeError(f"{name} exited {code} on SIGTERM: {proc.stderr_tail()}")

    def warm_up(self) -> None:
        """One lbgw without callgrind, so Python writes the bytecode caches of lbgw's modules.

        Otherwise the first count alone would pay for compiling them (some
        250 M instructions, the first time a checkout's lbgw serves).
        """
        self.serve("lbgw-warm-up", WARM_UP_CALLS, None)

    def count(self, calls: int, tag: str) -> int:
        """Ir of one lbgw process, from start to exit, that served ``calls`` unary calls."""
        out_file = self.out_dir / f"callgrind.{tag}.out"
        self.serve(f"lbgw-{tag}", calls, out_file)
        if self.main_thread:  # thread 1, the event loop's: lbgw's Python runs there
            return _read_ir(out_file.with_name(f"{out_file.name}-01"))
        return _read_ir(out_file)


def _start_backend(workdir: Path) -> tuple[Proc, str]:
    proc = Proc("backend", [sys.executable, "-u", str(HERE / "backend.py")], workdir)
    return proc, f"127.0.0.1:{int(proc.first_line(30.0))}"


def _measure(args: argparse.Namespace, valgrind: str, lbgw: str) -> list[_Run]:
    runs: list[_Run] = []
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="lbgw-callgrind-") as tmp, stopping(procs):
        workdir = Path(tmp)
        out_dir = args.keep or workdir
        out_dir.mkdir(parents=True, exist_ok=True)
        backend_proc, backend = _start_backend(workdir)
        procs.append(backend_proc)
        under_test = _Lbgw(
            lbgw, valgrind, backend, workdir, out_dir, args.main_thread, args.metrics
        )
        under_test.warm_up()
        for r in range(1, args.runs + 1):
            ir: dict[int, int] = {}
            for calls in (args.calls_low, args.calls_high):
                t0 = time.perf_counter()
                ir[calls] = under_test.count(calls, f"{r}-{calls}")
                _progress(
                    f"  run {r}/{args.runs}: {calls:,} calls, Ir {ir[calls]:,} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            low, high = args.calls_low, args.calls_high
            runs.append(_Run(r, ir[low], ir[high], low, high))
    return runs


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _first_line(argv: Sequence[str], cwd: str | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, cwd=cwd
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else "?"


def _lbgw_source(lbgw: str) -> str:
    """Where the lbgw under test imports its package from, and that checkout's commit."""
    python = Path(lbgw).with_name("python")
    code = "import os, lbgw; print(os.path.dirname(os.path.dirname(lbgw.__file__)))"
    where = _first_line([str(python), "-I", "-c", code])  # -I: not the lbgw in the cwd
    if where == "?":
        return "?"
    commit = _first_line(["git", "describe", "--always", "--dirty"], cwd=where)
    return f"{where} at {commit}" if commit != "?" else where


def _machine(valgrind: str, lbgw: str) -> dict[str, str]:
    return {
        "valgrind": _first_line([valgrind, "--version"]),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "grpcio_client": _dist_version("grpcio"),
        "lbgw_executable": lbgw,
        "lbgw_source": _lbgw_source(lbgw),
    }


def _table(runs: Sequence[_Run]) -> list[str]:
    low, high = runs[0].calls_low, runs[0].calls_high
    head = ("run", f"Ir({low:,} calls)", f"Ir({high:,} calls)", "instructions/call")
    lines = [head]
    lines += [(str(r.run), f"{r.ir_low:,}", f"{r.ir_high:,}", f"{r.per_call:,.0f}") for r in runs]
    if len(runs) > 1:
        per = [r.per_call for r in runs]
        lines.append(("median", "", "", f"{statistics.median(per):,.0f}"))
        lines.append(("max-min", "", "", f"{max(per) - min(per):,.0f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(f"{v:>{w}}" for v, w in zip(line, widths, strict=True)) for line in lines]
    return [out[0], "-" * len(out[0]), *out[1:]]


def _report(args: argparse.Namespace, machine: dict[str, str], runs: Sequence[_Run]) -> None:
    threads = "the event loop's thread (--main-thread)" if args.main_thread else "all its threads"
    print(
        f"# lbgw callgrind benchmark: {machine['valgrind']}, {machine['python']}, "
        f"client grpcio {machine['grpcio_client']}, {machine['platform']}"
    )
    print(f"# lbgw under test: {machine['lbgw_executable']} ({machine['lbgw_source']})")
    print(
        f"# each count: one lbgw process (one worker, swrr, unary kind given, health checks and "
        f"tracing off) under callgrind; {len(PAYLOAD)} B unary calls, one at a time on one "
        f"channel; Ir = {threads}, start to exit"
    )
    for line in _table(runs):
        print(line)
    print(
        f"# instructions/call = (Ir({args.calls_high:,}) - Ir({args.calls_low:,})) / "
        f"{args.calls_high - args.calls_low:,}: start-up and shutdown cancel out"
    )


def _write_json(
    path: Path, args: argparse.Namespace, machine: dict[str, str], runs: Sequence[_Run]
) -> None:
    per = [r.per_call for r in runs]
    result = {
        "machine": machine,
        "settings": {
            "calls_low": args.calls_low,
            "calls_high": args.calls_high,
            "runs": args.runs,
            "payload_bytes": len(PAYLOAD),
            "concurrency": 1,
            "lbgw_env": LBGW_ENV,
        },
        "runs": [asdict(r) | {"instructions_per_call": r.per_call} for r in runs],
        "instructions_per_call_median": statistics.median(per) if per else None,
    }
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _progress(f"wrote {len(runs)} runs to {path}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/callgrind.py",
        description="Instructions per unary call of the lbgw process, counted by callgrind.",
    )
    p.add_argument(
        "--calls-low",
        type=positive(int),
        default=None,
        metavar="N",
        help=f"calls of the smaller count (default {DEFAULT_CALLS_LOW:,})",
    )
    p.add_argument(
        "--calls-high",
        type=positive(int),
        default=None,
        metavar="N",
        help=f"calls of the larger count (default {DEFAULT_CALLS_HIGH:,})",
    )
    p.add_argument(
        "--runs",
        type=positive(int),
        default=DEFAULT_RUNS,
        help=f"pairs of counts, to see how repeatable the figure is (default {DEFAULT_RUNS})",
    )
    p.add_argument(
        "--lbgw",
        default=None,
        metavar="PATH",
        help="the lbgw executable (default: the lbgw beside this Python, .venv/bin/lbgw)",
    )
    p.add_argument("--valgrind", default=None, metavar="PATH", help="the valgrind executable")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the callgrind files here (callgrind.RUN-CALLS.out), for callgrind_annotate",
    )
    p.add_argument(
        "--main-thread",
        action="store_true",
        help="count only the event loop's thread, where lbgw's Python runs: steadier, as "
        "it leaves out gRPC's I/O threads and their lock spinning under valgrind",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="lbgw with its admin port on (--admin), so that every call is counted for "
        "the Prometheus metrics: compare with a run without",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_CALLS_LOW} and {QUICK_CALLS_HIGH} calls unless given otherwise",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    args.calls_low = int(args.calls_low or (QUICK_CALLS_LOW if args.quick else DEFAULT_CALLS_LOW))
    args.calls_high = int(
        args.calls_high or (QUICK_CALLS_HIGH if args.quick else DEFAULT_CALLS_HIGH)
    )
    if args.calls_high <= args.calls_low:
        p.error(f"--calls-high ({args.calls_high}) must exceed --calls-low ({args.calls_low})")
    valgrind = args.valgrind or shutil.which("valgrind")
    if valgrind is None:
        _progress("bench/callgrind.py: valgrind is not on PATH (apt-get install valgrind)")
        return 2
    lbgw = _lbgw_binary(args.lbgw)
    if not Path(lbgw).is_file():
        _progress(f"bench/callgrind.py: no lbgw executable at {lbgw} (see --lbgw)")
        return 2

    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    machine = _machine(valgrind, lbgw)
    _progress(
        f"{args.runs} run(s) of {args.calls_low:,} and {args.calls_high:,} calls "
        f"through {lbgw} under callgrind"
    )
    try:
        runs = _measure(args, valgrind, lbgw)
    except RuntimeError as exc:
        _progress(f"bench/callgrind.py: {exc}")
        return 1
    _report(args, machine, runs)
    if args.json is not None:
        _write_json(args.json, args, machine, runs)
    _progress(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
