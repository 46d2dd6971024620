"""Picker benchmark: nanoseconds per pick, pure-Python twins against the compiled kernels.

Run ``python bench/pick.py`` (``--help`` lists the knobs, ``--quick`` is a
smoke run of a few seconds). For every kernel, backend count ``n`` and
implementation it measures what one ``pick()`` costs:

* ``python``: the twin in ``lbgw.picking``, ``pick()`` called in a Python loop;
* ``cython``: the kernel in ``lbgw._fastpick``, ``pick()`` called in the same loop;
* ``c_loop``: the same compiled kernel's ``pick_many(count)`` (``pick_p2c_many``
  for ``ewma_p2c``), a C loop without the GIL, divided by ``count``.

The consistent-hashing kernels (``ring_hash``, ``maglev``) are timed the way
session affinity uses them, by key and *including the key's hashing*: each
pick is ``pick_key(key)`` over a pre-made list of 16-byte keys (random, like
session ids), hashed with xxHash64 and looked up. Their ``c_loop`` is
``pick_key_many(keys)``, which walks the list in C (holding the GIL, as it
reads Python bytes objects) and hashes and looks up each key.

``cython`` minus ``c_loop`` is the cost of calling a kernel from Python, which
the balancer pays on every call it forwards. A footer gives the two baselines
for that figure: the empty loop alone, and the loop calling a compiled method
that returns at once.

Method: each cell (kernel, impl, n) is calibrated on its own to a count of
picks that takes about ``--min-time`` seconds, then timed ``--repeats`` times
with ``time.perf_counter_ns``; the figure is the median. Every repeat runs
every cell, in a shuffled order, so drift and noise fall on all cells alike.
The garbage collector is off while timing, as in ``timeit``. Kernels keep
their state from pick to pick, as in service. Their setup (weights, seeds,
in-flight counts, latency samples) is drawn from a seed per (kernel, n), so
both implementations start from the same state and make the same picks.

It prints a table and, with ``--json PATH``, writes the figures as a list of
``{"kernel", "impl", "n", "ns_per_pick"}`` objects. It asserts nothing about
them: that belongs to no test (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from args import positive

from lbgw import _fastpick, picking
from lbgw._typing import HashKernel, Kernel, KernelModule

IMPLS = ("python", "cython", "c_loop")
KERNELS = (
    "swrr",
    "round_robin",
    "random_uniform",
    "random_weighted",
    "least_request",
    "least_request_weighted",
    "ewma",
    "ewma_p2c",
    "ring_hash",
    "maglev",
)
SIZES = (3, 16, 64, 1024)

DEFAULT_REPEATS = 5
DEFAULT_MIN_TIME = 0.05
QUICK_REPEATS = 1
QUICK_MIN_TIME = 0.002

#: Calibration grows the count until one run takes this share of --min-time.
_CALIBRATE_SHARE = 0.25
#: Kernels whose picks read in-flight counts; setup gives them some.
_LOAD_AWARE = frozenset({"least_request", "least_request_weighted", "ewma", "ewma_p2c"})
#: Keys the hashing kernels cycle through: 16 bytes each, like session ids.
_KEY_COUNT = 4096
_KEY_BYTES = 16


@dataclass(frozen=True)
class _Subject:
    """One kernel instance, ready to time: how to pick once and how to pick ``count`` times.

    A hashing kernel picks by key instead: ``pick_key(key)`` for each of ``keys`` in
    turn, and ``pick_key_many(keys)`` for a list of them in one call.
    """

    pick: Callable[[], int]
    pick_many: Callable[[int], int]
    note: str
    keys: list[bytes] | None = None
    pick_key: Callable[[bytes], int] | None = None
    pick_key_many: Callable[[list[bytes]], int] | None = None


# --- kernels under test ------------------------------------------------------


def _weights(rng: random.Random, n: int) -> list[int]:
    """Weights 1..10, never all equal when ``n > 1`` (that would take the uniform path)."""
    ws = [rng.randint(1, 10) for _ in range(n)]
    if n > 1 and len(set(ws)) == 1:
        ws[0] = ws[0] % 10 + 1
    return ws


def _load(kernel: Kernel, rng: random.Random) -> None:
    """Give each backend 0 to 3 calls in flight, so in-flight comparisons are not all ties."""
    for i in range(kernel.n):
        for _ in range(rng.randrange(4)):
            kernel.started(i)


def _make(name: str, n: int, compiled: bool) -> _Subject:  # noqa: PLR0912 - a branch per kernel
    """Build kernel ``name`` over ``n`` backends from ``_fastpick`` or ``picking``.

    The setup draws from a seed per (name, n) only, so the twin and the
    compiled kernel are built into the same state.
    """
    rng = random.Random(f"lbgw-bench/{name}/{n}")
    seed = rng.getrandbits(64)
    mod: KernelModule = _fastpick if compiled else picking
    k: Kernel
    note = ""
    # Set only where the timed method is not pick()/pick_many().
    pick: Callable[[], int] | None = None
    pick_many: Callable[[int], int] | None = None
    if name == "swrr":
        swrr = mod.SmoothWeightedRoundRobin(_weights(rng, n))
        note, k = f"scheduler={swrr.scheduler}", swrr
    elif name == "round_robin":
        k = mod.RoundRobin(n)
    elif name in ("random_uniform", "random_weighted"):
        ws = [1] * n if name == "random_uniform" else _weights(rng, n)
        k = mod.Random(ws, seed=seed)
    elif name in ("least_request", "least_request_weighted"):
        ws = [1] * n if name == "least_request" else _weights(rng, n)
        k = mod.LeastRequest(ws, seed=seed)
    elif name in ("ring_hash", "maglev"):
        ws = _weights(rng, n)
        ns = [b"10.%d.%d.%d:50051" % (i >> 16, (i >> 8) & 255, i & 255) for i in range(n)]
        hk: HashKernel
        if name == "ring_hash":
            ring = mod.RingHash(ws, ns, seed=seed)
            note, hk = f"ring {ring.ring_size} points", ring
        else:
            maglev = mod.Maglev(ws, ns, seed=seed)
            note, hk = f"table {maglev.table_size} slots", maglev
        keys = [rng.randbytes(_KEY_BYTES) for _ in range(_KEY_COUNT)]
        return _Subject(hk.pick, hk.pick_many, note, keys, hk.pick_key, hk.pick_key_many)
    elif name in ("ewma", "ewma_p2c"):
        ewma = mod.PeakEwma(n, seed=seed)
        k = ewma
        if name == "ewma_p2c":
            pick, pick_many = ewma.pick_p2c, ewma.pick_p2c_many
        # A few rounds of latency samples, 1 ms apart, so the estimates differ.
        now = 0
        for _ in range(3):
            for i in range(n):
                now += 1_000_000
                k.observe(i, rng.randint(1_000_000, 50_000_000), now)
    else:
        raise ValueError(f"unknown kernel {name!r}")
    if name in _LOAD_AWARE:
        _load(k, rng)
    return _Subject(pick or k.pick, pick_many or k.pick_many, note)


# --- timing -----------------------------------------------------------------


def _time_calls(fn: Callable[[], object], count: int) -> int:
    """Nanoseconds for ``count`` calls of ``fn`` from a Python loop."""
    loop = itertools.repeat(None, count)
    t0 = time.perf_counter_ns()
    for _ in loop:
        fn()
    return time.perf_counter_ns() - t0


def _time_c_loop(fn: Callable[[int], object], count: int) -> int:
    """Nanoseconds for one call ``fn(count)`` that loops ``count`` times in C."""
    t0 = time.perf_counter_ns()
    fn(count)
    return time.perf_counter_ns() - t0


def _time_key_calls(fn: Callable[[bytes], object], keys: list[bytes], count: int) -> int:
    """Nanoseconds for ``count`` calls ``fn(key)``, cycling through ``keys``."""
    loop = itertools.islice(itertools.cycle(keys), count)
    t0 = time.perf_counter_ns()
    for key in loop:
        fn(key)
    return time.perf_counter_ns() - t0


def _time_key_many(fn: Callable[[list[bytes]], object], keys: list[bytes], count: int) -> int:
    """Nanoseconds for ``count`` keys' picks by ``fn(keys)``, which loops over them in C."""
    full, rest = divmod(count, len(keys))
    tail = keys[:rest]
    t0 = time.perf_counter_ns()
    for _ in range(full):
        fn(keys)
    if rest:
        fn(tail)
    return time.perf_counter_ns() - t0


def _time_empty_key_loop(keys: list[bytes], count: int) -> int:
    """Nanoseconds for the loop of ``_time_key_calls`` with nothing in it."""
    loop = itertools.islice(itertools.cycle(keys), count)
    t0 = time.perf_counter_ns()
    for _ in loop:
        pass
    return time.perf_counter_ns() - t0


def _time_empty_loop(count: int) -> int:
    """Nanoseconds for the loop of ``_time_calls`` with nothing in it."""
    loop = itertools.repeat(None, count)
    t0 = time.perf_counter_ns()
    for _ in loop:
        pass
    return time.perf_counter_ns() - t0


@dataclass
class _Cell:
    """One measured figure: a runner, its calibrated count and its samples (ns per op)."""

    kernel: str
    impl: str
    n: int
    run: Callable[[int], int]
    note: str = ""
    count: int = 0
    samples: list[float] = field(default_factory=list)

    def calibrate(self, min_time_ns: int) -> None:
        """Find a count of picks that takes about ``min_time_ns``; it also warms the cell up."""
        target = max(1, int(min_time_ns * _CALIBRATE_SHARE))
        count = 1
        while True:
            elapsed = self.run(count)
            if elapsed >= target:
                break
            factor = 1000.0 if elapsed <= 0 else min(1000.0, max(2.0, 1.5 * target / elapsed))
            count = int(count * factor) + 1
        self.count = max(1, round(count * min_time_ns / elapsed))

    def measure(self) -> None:
        self.samples.append(self.run(self.count) / self.count)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def _cells(kernels: Sequence[str], impls: Sequence[str], sizes: Sequence[int]) -> list[_Cell]:
    cells: list[_Cell] = []
    for kernel in kernels:
        for n in sizes:
            for impl in impls:
                s = _make(kernel, n, compiled=impl != "python")
                run: Callable[[int], int]
                if s.keys is not None and s.pick_key is not None and s.pick_key_many is not None:
                    if impl == "c_loop":
                        run = functools.partial(_time_key_many, s.pick_key_many, s.keys)
                    else:
                        run = functools.partial(_time_key_calls, s.pick_key, s.keys)
                elif impl == "c_loop":
                    run = functools.partial(_time_c_loop, s.pick_many)
                else:
                    run = functools.partial(_time_calls, s.pick)
                cells.append(_Cell(kernel, impl, n, run, s.note))
    return cells


def _overhead_cells() -> tuple[_Cell, _Cell, _Cell]:
    """The loop alone, the loop calling a compiled method that returns at once, and the
    key loop of the hashing kernels alone.

    ``RoundRobin(0).pick`` is a real kernel method with nothing in rotation:
    it checks the count, returns -1 and touches no array, so what it costs is
    the call itself.
    """
    noop = _fastpick.RoundRobin(0).pick
    keys = [random.Random("lbgw-bench/keys").randbytes(_KEY_BYTES) for _ in range(_KEY_COUNT)]
    empty = _Cell("(empty loop)", "python", 0, _time_empty_loop)
    call = _Cell("(no-op call)", "cython", 0, functools.partial(_time_calls, noop))
    key_loop = _Cell("(empty key loop)", "python", 0, functools.partial(_time_empty_key_loop, keys))
    return empty, call, key_loop


# --- report -----------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nproc() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _ns(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) < 10:
        return f"{x:.2f}"
    if abs(x) < 1000:
        return f"{x:.1f}"
    return f"{x:,.0f}"


def _table(cells: Sequence[_Cell], kernels: Sequence[str], sizes: Sequence[int]) -> list[str]:
    by_key = {(c.kernel, c.impl, c.n): c for c in cells}
    head = ("kernel", "n", "python ns", "cython ns", "C-loop ns", "call ns", "speed-up", "note")
    rows: list[tuple[str, ...]] = []
    for kernel in kernels:
        for n in sizes:
            fig: dict[str, float | None] = {}
            note = ""
            for impl in IMPLS:
                cell = by_key.get((kernel, impl, n))
                fig[impl] = cell.median if cell else None
                note = note or (cell.note if cell else "")
            py, cy, cl = fig["python"], fig["cython"], fig["c_loop"]
            call = cy - cl if cy is not None and cl is not None else None
            speedup = f"{py / cy:.1f}×" if py is not None and cy else "-"
            rows.append((kernel, str(n), _ns(py), _ns(cy), _ns(cl), _ns(call), speedup, note))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        left = f"{r[0]:<{widths[0]}}"
        nums = "  ".join(f"{v:>{w}}" for v, w in zip(r[1:-1], widths[1:-1], strict=True))
        return f"{left}  {nums}  {r[-1]}".rstrip()

    rule = "-" * len(fmt(tuple("-" * w for w in widths)))
    return [fmt(head), rule, *(fmt(r) for r in rows)]


# --- command line -----------------------------------------------------------


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in allowed]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        choices = ", ".join(allowed)
        raise argparse.ArgumentTypeError(f"unknown {what} {given}; choose from {choices}")
    return names


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be integers >= 1, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/pick.py",
        description="Nanoseconds per pick for each lbgw kernel: Python twin, Cython, C loop.",
    )
    p.add_argument(
        "--repeats",
        type=positive(int),
        default=None,
        help=f"timed repeats per cell; the median is reported (default {DEFAULT_REPEATS})",
    )
    p.add_argument(
        "--min-time",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help=f"about how long one repeat of one cell runs (default {DEFAULT_MIN_TIME})",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=list(SIZES),
        help=f"comma list of backend counts (default {','.join(map(str, SIZES))})",
    )
    p.add_argument(
        "--kernels",
        type=lambda t: _names(t, KERNELS, "kernel"),
        default=list(KERNELS),
        help=f"comma list of kernels (default all: {','.join(KERNELS)})",
    )
    p.add_argument(
        "--impls",
        type=lambda t: _names(t, IMPLS, "impl"),
        default=list(IMPLS),
        help=f"comma list of implementations (default all: {','.join(IMPLS)})",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write figures here")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_REPEATS} repeat of ~{QUICK_MIN_TIME} s unless given otherwise",
    )
    return p


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeats = int(args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS))
    min_time = float(args.min_time or (QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME))
    min_time_ns = round(min_time * 1e9)
    kernels: list[str] = args.kernels
    impls: list[str] = args.impls
    sizes: list[int] = args.sizes

    started = time.perf_counter()
    cells = _cells(kernels, impls, sizes)
    empty, call, key_loop = _overhead_cells()
    everything = [*cells, empty, call, key_loop]
    order = random.Random(0x1B6E)

    gc.collect()
    gc.disable()
    try:
        _progress(f"calibrating {len(everything)} cells to ~{min_time:g} s each ...")
        for cell in everything:
            cell.calibrate(min_time_ns)
        eta = repeats * len(everything) * min_time
        _progress(f"timing {repeats} repeat(s) of {len(everything)} cells, about {eta:.1f} s")
        for r in range(repeats):
            order.shuffle(everything)
            t0 = time.perf_counter()
            for cell in everything:
                cell.measure()
            _progress(f"  repeat {r + 1}/{repeats} done in {time.perf_counter() - t0:.1f} s")
    finally:
        gc.enable()

    impl = sys.implementation.name
    name = {"cpython": "CPython"}.get(impl, impl)
    print(
        f"# lbgw picker benchmark: {name} {platform.python_version()}, {platform.platform()}, "
        f"nproc {_nproc()}, {_cpu_model()}"
    )
    print(
        f"# ns per pick, median of {repeats} repeat(s) of ~{min_time:g} s per cell, "
        "cells interleaved, gc off"
    )
    for line in _table(cells, kernels, sizes):
        print(line)
    print(
        "# call ns = cython - C loop: what calling pick() from Python adds. "
        "speed-up = python / cython."
    )
    print(
        f"# loop baselines: empty `for` loop {_ns(empty.median)} ns/iter; "
        f"same loop calling a compiled no-op (_fastpick.RoundRobin(0).pick) "
        f"{_ns(call.median)} ns/iter; the hashing kernels' loop over a key list "
        f"{_ns(key_loop.median)} ns/iter."
    )
    print(
        f"# ring_hash, maglev: pick_key(key) over {_KEY_COUNT} random {_KEY_BYTES}-byte keys, "
        "xxHash64 included; C loop = pick_key_many(keys)."
    )
    print(
        "# least_request*, ewma*: in-flight counts (0-3) set at setup; "
        "started()/finished() are not part of the timed pick."
    )

    if args.json is not None:
        figures = [
            {"kernel": c.kernel, "impl": c.impl, "n": c.n, "ns_per_pick": round(c.median, 3)}
            for c in cells
        ]
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        _progress(f"wrote {len(figures)} figures to {args.json}")
    _progress(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
