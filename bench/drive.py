"""One measured window of load on one target, and the CPU its proxy spent meanwhile.

``Driver.measure(target, kind)`` warms the target up, reads the CPU of the
proxy's process tree and of the backend, keeps ``concurrency`` calls in
flight for ``duration`` seconds, reads the CPU again and returns a
``Sample``. The load comes from ``h2load`` when the driver has it (a C client:
it leaves more of a small machine to the proxy) or else from
``bench/loadgen.py`` processes (grpcio, raw bytes).

h2load posts one gRPC-framed body and counts HTTP/2 responses: it cannot read
``grpc-status``, so ``bench/proxy.py`` probes every target with grpcio first.
For streams it counts messages from the DATA bytes received, so streams cut
off when the window closes still count the messages the proxy carried.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import selectors
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from procs import TICKS, Proc, stopping

HERE = Path(__file__).resolve().parent
UNARY = "/lbgw.echo.v1.Echo/Unary"
SERVER_STREAM = "/lbgw.echo.v1.Echo/ServerStream"
#: Bytes of the server-streaming request; the backend ignores them.
STREAM_REQUEST_SIZE = 8
#: A load generator may overrun its warm-up plus duration by this much.
SLACK = 30.0

_H2_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s),")
_H2_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2_DATA = re.compile(r"\((\d+)\) data")


@dataclass
class Target:
    """One configuration under load: where to send calls and which process to charge."""

    config: str
    address: str
    proxy: Proc | None
    streams: bool = True
    note: str = ""
    #: TLS to the target, verified against this CA file (the TLS rows); "": plaintext.
    tls_ca: str = ""
    #: The backend this target forwards to, when not the driver's (the TLS rows').
    backend: Proc | None = None


@dataclass(frozen=True)
class Load:
    """The load every target gets."""

    concurrency: int
    stream_concurrency: int
    connections: int
    client_procs: int
    payload: int
    stream_size: int
    warmup: float
    duration: float

    def shape(self, kind: str) -> tuple[int, int]:
        """(calls in flight, connections) for ``kind``."""
        inflight = self.concurrency if kind == "unary" else self.stream_concurrency
        return inflight, min(self.connections, inflight)


@dataclass
class Sample:
    """One measured window of one configuration and kind."""

    calls: int = 0
    msgs: int = 0
    elapsed: float = 0.0
    proxy_cpu: float | None = None
    backend_cpu: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    error: str = ""
    #: Each busy process's share of the proxy's CPU, in percent, when there are several.
    cpu_split: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.elapsed > 0 and (self.calls > 0 or self.msgs > 0) and not self.error

    def __str__(self) -> str:
        if not self.ok:
            return f"failed: {self.error or 'no call completed'}"
        n, what = (self.msgs, "msgs") if self.msgs else (self.calls, "calls")
        cpu = "" if self.proxy_cpu is None else f", {1e6 * self.proxy_cpu / n:.1f} µs CPU each"
        return f"{n / self.elapsed:,.0f} {what}/s{cpu}"


def percentile(sorted_us: list[int], q: float) -> float | None:
    """Nearest-rank percentile of microsecond latencies, in milliseconds."""
    if not sorted_us:
        return None
    return sorted_us[min(len(sorted_us) - 1, max(0, math.ceil(q * len(sorted_us)) - 1))] / 1000


class _Meter:
    """Proxy and backend CPU over one window, and how the proxy's share split over its tree."""

    def __init__(self, proxy: Proc | None, backend: Proc) -> None:
        self.proxy, self.backend = proxy, backend
        self._p0 = proxy.cpu() if proxy else {}
        self._b0 = sum(backend.cpu().values())

    def finish(self, sample: Sample) -> None:
        sample.backend_cpu = (sum(self.backend.cpu().values()) - self._b0) / TICKS
        if self.proxy is None:
            return
        p1 = self.proxy.cpu()
        total = sum(p1.values()) - sum(self._p0.values())
        sample.proxy_cpu = total / TICKS
        if total > 0:
            shares = [100 * (t - self._p0.get(pid, 0)) / total for pid, t in p1.items()]
            busy = sorted((x for x in shares if x >= 1), reverse=True)
            sample.cpu_split = busy if len(busy) > 1 else []


def _framed(payload: bytes) -> bytes:
    """One gRPC length-prefixed message: no compression, 4-byte big-endian length, bytes."""
    return b"\0" + struct.pack(">I", len(payload)) + payload


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    return stream.readline()


@dataclass
class Driver:
    """Measures targets under ``load``; scratch files go to ``workdir``."""

    load: Load
    workdir: Path
    backend: Proc
    h2load: str | None

    def measure(self, target: Target, kind: str) -> Sample:
        if self.h2load:
            return self._h2load(self.h2load, target, kind)
        return self._grpcio(target, kind)

    # --- h2load --------------------------------------------------------------

    def _h2load_argv(self, binary: str, target: Target, kind: str, seconds: float) -> list[str]:
        body = self.workdir / f"{kind}.body"
        if not body.exists():
            size = self.load.payload if kind == "unary" else STREAM_REQUEST_SIZE
            body.write_bytes(_framed(b"x" * size))
        inflight, conns = self.load.shape(kind)
        return [
            binary,
            f"--duration={max(1, round(seconds * 1000))}ms",
            f"--clients={conns}",
            f"--max-concurrent-streams={math.ceil(inflight / conns)}",
            "--threads=1",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"{'https' if target.tls_ca else 'http'}://{target.address}"
            f"{UNARY if kind == 'unary' else SERVER_STREAM}",
        ]

    def _h2load(self, binary: str, target: Target, kind: str) -> Sample:
        load, sample = self.load, Sample()
        name = f"h2load-{target.config}-{kind}"
        warm = Proc(name, self._h2load_argv(binary, target, kind, load.warmup), self.workdir)
        with stopping([warm]), contextlib.suppress(subprocess.TimeoutExpired):
            warm.popen.wait(load.warmup + SLACK)
        argv = self._h2load_argv(binary, target, kind, load.duration)
        log = self.workdir / "h2load.log"
        if kind == "unary":
            argv.insert(1, f"--log-file={log}")
        meter = _Meter(target.proxy, target.backend or self.backend)
        proc = Proc(name, argv, self.workdir)
        with stopping([proc]):
            try:
                proc.popen.wait(load.duration + SLACK)
            except subprocess.TimeoutExpired:
                sample.error = "h2load overran its duration"
                return sample
            meter.finish(sample)
        out = proc.out_path.read_text(encoding="utf-8", errors="replace")
        finished, requests = _H2_FINISHED.search(out), _H2_REQUESTS.search(out)
        data = _H2_DATA.search(out)
        if proc.popen.returncode != 0 or not finished or not requests or not data:
            sample.error = f"h2load failed: {proc.stderr_tail()}"
            return sample
        sample.elapsed = float(finished[1]) / (1000 if finished[2] == "ms" else 1)
        done, sample.calls = int(requests[3]), int(requests[4])
        sample.errors = done - sample.calls + int(requests[6]) + int(requests[7])
        if kind == "unary":
            lines = log.read_text(encoding="ascii").splitlines()
            lat = sorted(int(line.split("\t")[2]) for line in lines if line)
            sample.p50_ms, sample.p99_ms = percentile(lat, 0.50), percentile(lat, 0.99)
        else:
            sample.msgs = int(data[1]) // (5 + load.stream_size)
        if sample.errors:
            sample.error = f"{sample.errors} calls failed"
        return sample

    # --- grpcio ---------------------------------------------------------------

    def _grpcio(self, target: Target, kind: str) -> Sample:
        load, sample = self.load, Sample()
        inflight, conns = load.shape(kind)
        nprocs = min(load.client_procs, conns)
        procs: list[Proc] = []
        with stopping(procs):
            for i in range(nprocs):
                argv = [sys.executable, "-u", str(HERE / "loadgen.py"), "load", target.address]
                argv += [f"--kind={kind}", f"--payload={load.payload}"]
                argv += [f"--concurrency={inflight // nprocs + (i < inflight % nprocs)}"]
                argv += [f"--channels={conns // nprocs + (i < conns % nprocs)}"]
                argv += [f"--warmup={load.warmup}", f"--duration={load.duration}"]
                argv += [f"--ca={target.tls_ca}"] if target.tls_ca else []
                name = f"loadgen-{target.config}-{kind}-{i}"
                procs.append(Proc(name, argv, self.workdir, pipes=True))
            for proc in procs:
                assert proc.popen.stdout is not None
                line = _readline(proc.popen.stdout, load.warmup + SLACK)
                if line.strip() != b"ready":
                    sample.error = f"load generator not ready: {line[:200]!r}; {proc.stderr_tail()}"
                    return sample
            meter = _Meter(target.proxy, target.backend or self.backend)
            for proc in procs:
                assert proc.popen.stdin is not None
                proc.popen.stdin.write(b"go\n")
                proc.popen.stdin.flush()
            outputs: list[bytes] = []
            for proc in procs:
                try:
                    outputs.append(proc.popen.communicate(timeout=load.duration + SLACK)[0])
                except subprocess.TimeoutExpired:
                    sample.error = "load generator overran its duration"
                    return sample
            meter.finish(sample)
        latencies: list[int] = []
        for proc, out in zip(procs, outputs, strict=True):
            try:
                result = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                sample.error = f"load generator said nothing: {proc.stderr_tail()}"
                return sample
            sample.calls += result["calls"]
            sample.msgs += result["msgs"]
            sample.errors += result["errors"]
            sample.error = sample.error or result["error"]
            sample.elapsed = max(sample.elapsed, result["elapsed"])
            latencies.extend(result["latencies_us"])
        latencies.sort()
        sample.p50_ms, sample.p99_ms = percentile(latencies, 0.50), percentile(latencies, 0.99)
        return sample
