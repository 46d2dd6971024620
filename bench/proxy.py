"""Proxy benchmark: lbgw against its floor, against nginx, haproxy and no proxy at all.

Run ``python bench/proxy.py`` (``--help`` lists the knobs; ``--quick``, one
run of 1 s per configuration, is a smoke test). It starts a fast echo backend
(``bench/backend.py``, serving server reflection too, as a newcomer's backend
would) and, in front of it, every proxy it finds:

* ``direct``: no proxy, the load goes straight to the backend;
* ``floor``: ``bench/passthrough.py``, the least a grpc.aio proxy can do
  (``unary_unary``, and ``unary_stream`` for the stream), on asyncio's own
  loop: the ratios are taken against it;
* ``floor-uvloop``: the same on uvloop;
* ``lbgw``: ``lbgw serve`` with one worker, strategy ``swrr``, both echo
  methods in its method-kind table (``--method``), on asyncio's loop
  (``--event-loop asyncio``);
* ``lbgw-uvloop``: the same on uvloop;
* ``lbgw-noflags``: the quick form with no flags but ``--backend``: the
  kinds come from the backend's reflection, the loop is the default (uvloop
  when installed). What a newcomer's first ``lbgw serve`` costs;
* ``lbgw-noflags-asyncio``: the same on asyncio's loop;
* ``lbgw-w2``: ``lbgw`` with ``--workers 2``;
* ``lbgw-stream``: ``--no-reflection`` and no method-kind table, so every
  call takes lbgw's ``stream_stream`` fallback (and the retry buffer), on the
  default loop: what the unary fast path saves;
* ``lbgw-trace-1pct`` and ``lbgw-trace-all``: ``lbgw`` with tracing on,
  sampling 1% (``parentbased_traceidratio``) or every call
  (``parentbased_always_on``) and exporting over OTLP/gRPC to
  ``bench/otlp_sink.py``, a receiver in a process of its own on loopback
  (one per configuration; the note under the table says how many spans it
  got). The load sends no traceparent, so lbgw starts every trace and its
  sampler alone decides. Unary calls only: tracing costs per call, not per
  streamed message. The plain ``lbgw`` row is the "tracing off" they are
  compared with (every lbgw row runs with the caller's ``OTEL_*`` variables
  removed, so only these two trace);
* ``lbgw-metrics``: ``lbgw`` with the admin port on (``--admin``), so
  every call is counted for the Prometheus metrics; the plain ``lbgw`` row
  is "metrics off". Nothing scrapes during the run (a scrape is off the
  call path; the admin port's once-a-second sampler runs);
* ``nginx``: ``grpc_pass`` with one worker and upstream keepalive, when
  ``nginx`` is on PATH;
* ``lbgw-tls`` and ``nginx-tls``: the same two with TLS on both sides: the
  load connects over TLS (verified against a throwaway CA made with
  ``trustme``), and the proxy forwards over TLS, verified, to a second
  ``bench/backend.py`` that serves TLS (nginx: ``listen ... ssl`` and
  ``grpc_pass grpcs://`` with ``grpc_ssl_verify on``). No client
  certificates: h2load cannot present one. Compare them with ``lbgw`` and
  ``nginx``: what TLS costs each per call.
* ``haproxy``: ``mode http`` with ``proto h2`` on both sides, one thread,
  when ``haproxy`` is on PATH (Debian's ``haproxy``): the cheapest peer.

Each gets unary calls (calls/s, p50 and p99 latency, the proxy's CPU per
call) and server streams (messages/s, the proxy's CPU per message). CPU is
``utime + stime`` from ``/proc/<pid>/stat`` over the proxy's whole process
tree (lbgw's workers, nginx's master and worker), read just before and just
after each measured window (``bench/procs.py``).

The load comes from ``h2load`` (nghttp2-client) when it is installed, else
from grpcio in processes of its own (``bench/loadgen.py``); see
``bench/drive.py``. h2load cannot read ``grpc-status``, so every target must
first pass a grpcio probe: a unary call and one full stream. Each client
connection is a channel of its own, so under ``--workers 2`` the kernel's
SO_REUSEPORT hash spreads them over both workers; the notes under the table
show how the CPU split.

The machine is small and shared, so each configuration runs ``--runs`` times,
interleaved (A B C A B C ...), each window after a short warm-up, and the
table shows medians. Everything listens on 127.0.0.1 on ports the OS chose,
and every process started here is stopped by its PID on the way out (SIGTERM,
then SIGKILL), on errors, Ctrl-C and SIGTERM too. ``--json PATH`` writes the
machine, the settings, the rows with every run, and the ratios. It asserts no
figure (STYLE.md, "Habits"): the targets in the summary are there to be read.
It exits 1 when a configuration it started failed, so ``--quick`` can guard CI.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from args import positive
from drive import SERVER_STREAM, SLACK, UNARY, Driver, Load, Sample, Target
from procs import Proc, free_port, stopping

HERE = Path(__file__).resolve().parent

CONFIGS = (
    "direct",
    "floor",
    "floor-uvloop",
    "lbgw",
    "lbgw-uvloop",
    "lbgw-noflags",
    "lbgw-noflags-asyncio",
    "lbgw-w2",
    "lbgw-stream",
    "lbgw-trace-1pct",
    "lbgw-trace-all",
    "lbgw-metrics",
    "nginx",
    "lbgw-tls",
    "nginx-tls",
    "haproxy",
)
LABELS = {
    "direct": "direct (no proxy)",
    "floor": "floor (passthrough.py)",
    "floor-uvloop": "floor on uvloop",
    "lbgw": "lbgw --method, asyncio",
    "lbgw-uvloop": "lbgw --method, uvloop",
    "lbgw-noflags": "lbgw, no flags (reflection)",
    "lbgw-noflags-asyncio": "lbgw, no flags, asyncio",
    "lbgw-w2": "lbgw --workers 2",
    "lbgw-stream": "lbgw --no-reflection",
    "lbgw-trace-1pct": "lbgw, traced 1% (OTLP)",
    "lbgw-trace-all": "lbgw, traced 100% (OTLP)",
    "lbgw-metrics": "lbgw, metrics on (--admin)",
    "nginx": "nginx grpc_pass",
    "lbgw-tls": "lbgw, TLS both sides",
    "nginx-tls": "nginx ssl + grpcs://",
    "haproxy": "haproxy h2",
}
#: What ``--quick`` (CI's smoke run) starts unless ``--configs`` says: one row of
#: each kind of program and lbgw mode, so that the smoke run stays short.
QUICK_CONFIGS = (
    "floor",
    "floor-uvloop",
    "lbgw",
    "lbgw-noflags",
    "lbgw-w2",
    "lbgw-stream",
    "lbgw-trace-1pct",
    "nginx",
    "haproxy",
)
#: The lbgw configurations that give the method kinds on the command line.
WITH_KINDS = (
    "lbgw",
    "lbgw-uvloop",
    "lbgw-w2",
    "lbgw-trace-1pct",
    "lbgw-trace-all",
    "lbgw-metrics",
)
#: The event loop of each lbgw configuration (--event-loop); absent: lbgw's default.
EVENT_LOOP = {
    "lbgw": "asyncio",
    "lbgw-uvloop": "uvloop",
    "lbgw-noflags-asyncio": "asyncio",
    "lbgw-w2": "asyncio",
    "lbgw-trace-1pct": "asyncio",
    "lbgw-trace-all": "asyncio",
    "lbgw-tls": "asyncio",
    "lbgw-metrics": "asyncio",
}
#: The configurations with TLS on both sides, and the plaintext row each is compared with.
TLS_CONFIGS = ("lbgw-tls", "nginx-tls")
#: The sampler of each traced configuration: OTEL_TRACES_SAMPLER and its argument.
TRACED = {
    "lbgw-trace-1pct": ("parentbased_traceidratio", "0.01"),
    "lbgw-trace-all": ("parentbased_always_on", ""),
}

DEFAULT_RUNS = 3
DEFAULT_DURATION = 5.0
DEFAULT_WARMUP = 1.0
QUICK_RUNS = 1
QUICK_DURATION = 1.0
QUICK_WARMUP = 0.3

#: How long a proxy may take to answer its first call.
START_TIMEOUT = 30.0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- configurations ---------------------------------------------------------


def _python() -> list[str]:
    return [sys.executable, "-u"]


#: What both nginx configurations share: one worker, files under a temp prefix,
#: connections kept open for the whole run.
_NGINX_PROLOGUE = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
"""

_NGINX_BACKEND_CONF = (
    _NGINX_PROLOGUE
    + """\
    server {{
        listen 127.0.0.1:{port} http2;
        root {prefix}/www;
        # A gRPC call is a POST, which nginx's static files refuse with 405;
        # the error page turns that into a GET of the canned reply.
        location ~ ^/lbgw\\.echo\\.v1\\.Echo/(?<method>Unary|ServerStream)$ {{
            error_page 405 =200 /reply/$method;
            return 405;
        }}
        location /reply/ {{
            internal;
            default_type application/grpc;
            add_trailer grpc-status 0 always;
        }}
    }}
}}
"""
)


def _grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _start_nginx_backend(workdir: Path, args: argparse.Namespace) -> tuple[Proc, str]:
    """nginx serving canned gRPC replies from files: a backend that costs next to no CPU.

    Unary replies with one ``--payload``-sized message, ServerStream with
    ``--stream-count`` messages of ``--stream-size`` bytes. With the Python
    backend on a 2-core machine the backend and the load generator take
    about a core, so a second lbgw worker has nothing to run on; this backend
    leaves the cores to the proxy.
    """
    prefix = workdir / "nginx-backend"
    (prefix / "www" / "reply").mkdir(parents=True)
    # nginx's workers run as an unprivileged user when it starts as root:
    # they must be able to reach the reply files through the private workdir.
    for path in (workdir, prefix, prefix / "www", prefix / "www" / "reply"):
        path.chmod(0o755)
    (prefix / "www" / "reply" / "Unary").write_bytes(_grpc_frame(b"x" * args.payload))
    stream = _grpc_frame(b"x" * args.stream_size) * args.stream_count
    (prefix / "www" / "reply" / "ServerStream").write_bytes(stream)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_BACKEND_CONF.format(prefix=prefix, port=port))
    binary = args.nginx or shutil.which("nginx") or "nginx"
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    return Proc("backend", [*argv, "-g", "daemon off;"], workdir), f"127.0.0.1:{port}"


def _start_backend(workdir: Path, args: argparse.Namespace) -> tuple[Proc, str]:
    if args.backend == "nginx":
        return _start_nginx_backend(workdir, args)
    argv = [
        *_python(),
        str(HERE / "backend.py"),
        f"--stream-count={args.stream_count}",
        f"--stream-size={args.stream_size}",
        "--reflection",
    ]
    proc = Proc("backend", argv, workdir)
    return proc, f"127.0.0.1:{int(proc.first_line(START_TIMEOUT))}"


def _start_floor(workdir: Path, backend: str, config: str) -> Proc:
    env = {"LBGW_BENCH_UVLOOP": "1"} if config == "floor-uvloop" else {}
    argv = [*_env_prefix(env), *_python(), str(HERE / "passthrough.py"), backend]
    return Proc(config, argv, workdir)


def _lbgw_binary(given: str | None) -> str | None:
    if given:
        return given
    beside = Path(sys.executable).with_name("lbgw")
    return str(beside) if beside.exists() else shutil.which("lbgw")


def _lbgw_help(binary: str) -> str | None:
    """``lbgw serve --help``, or None when lbgw cannot run it yet."""
    try:
        done = subprocess.run(
            [binary, "serve", "--help"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _lbgw_argv(  # noqa: PLR0913 - the lbgw command line's flags, one argument each
    binary: str,
    help_text: str,
    port: int,
    backend: str,
    workers: int,
    *,
    kinds: bool = True,
    env: Mapping[str, str] | None = None,
    flags: bool = True,
    loop: str | None = None,
    reflection: bool = True,
    admin: int | None = None,
) -> list[str]:
    """``lbgw serve``; ``flags`` False: the quick form with ``--backend`` and the port alone."""
    argv = [*_env_prefix(env or {}), binary, "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--backend", backend]
    if not flags:
        return argv
    argv += ["--strategy", "swrr", "--log-level", "warning"]
    # The method-kind table gives lbgw its unary fast path (MethodKind values in lbgw.config).
    if kinds and "--method" in help_text:
        argv += ["--method", f"{UNARY}=unary", "--method", f"{SERVER_STREAM}=server_streaming"]
    if not reflection and "--no-reflection" in help_text:
        argv += ["--no-reflection"]
    if loop is not None and "--event-loop" in help_text:
        argv += ["--event-loop", loop]
    if workers > 1:
        argv += ["--workers", str(workers)]
    if admin is not None:
        argv += ["--admin", f"127.0.0.1:{admin}"]
    return argv


def _env_prefix(env: Mapping[str, str]) -> list[str]:
    """``env -u OTEL_... NAME=VALUE ...``: lbgw's environment, minus the caller's OTEL_* variables.

    ``env`` execs the program, so the PID the benchmark watches is lbgw's. No
    prefix at all when there is nothing to change.
    """
    unset = sorted(k for k in os.environ if k.startswith("OTEL_") and k not in env)
    if not unset and not env:
        return []
    return [
        shutil.which("env") or "/usr/bin/env",
        *(f"--unset={k}" for k in unset),
        *(f"{k}={v}" for k, v in env.items()),
    ]


def _tracing_env(config: str, sink: str) -> dict[str, str]:
    """The OTEL_* variables of a traced configuration: its sampler, the sink as collector."""
    sampler, arg = TRACED[config]
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink}",
        "OTEL_SERVICE_NAME": "lbgw-bench",
        "OTEL_TRACES_SAMPLER": sampler,
    }
    if arg:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    return env


def _start_sink(workdir: Path, config: str) -> Proc:
    """``bench/otlp_sink.py``: its first line is its address, then ``requests spans`` lines."""
    return Proc(f"otlp-sink-{config}", [*_python(), str(HERE / "otlp_sink.py")], workdir)


def _sink_note(sink: Proc, row: _Row) -> str:
    """How many spans the sink got, and per measured call (warm-ups and probes send too)."""
    lines = sink.out_path.read_text(encoding="utf-8", errors="replace").split()
    spans = int(lines[-1]) if len(lines) >= 3 else 0
    calls = sum(s.calls for s in row.unary if s.ok)
    per = f" ({spans / calls:.3f} per measured call)" if calls else ""
    return f"the OTLP sink received {spans:,} spans{per}"


_NGINX_CONF = (
    _NGINX_PROLOGUE
    + """\
    upstream backend {{
        server {backend};
        keepalive {keepalive};
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://backend;
        }}
    }}
}}
"""
)


def _start_nginx(workdir: Path, binary: str, backend: str, inflight: int) -> tuple[Proc, int]:
    """nginx in the foreground on a temp prefix: one worker, keepalive to the backend.

    nginx carries one call per backend connection at a time and, without
    ``keepalive`` in an upstream block, opens a connection per call, which
    would measure connection setup instead of proxying. So it keeps enough
    idle connections for every call in flight.
    """
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    keepalive = max(64, inflight)
    conf.write_text(
        _NGINX_CONF.format(prefix=prefix, port=port, backend=backend, keepalive=keepalive)
    )
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    return Proc("nginx", [*argv, "-g", "daemon off;"], workdir), port


_NGINX_TLS_CONF = (
    _NGINX_PROLOGUE
    + """\
    upstream backend {{
        server {backend};
        keepalive {keepalive};
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            grpc_pass grpcs://backend;
            grpc_ssl_trusted_certificate {ca};
            grpc_ssl_verify on;
            grpc_ssl_name {server_name};
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;
        }}
    }}
}}
"""
)


@dataclass
class _Tls:
    """The TLS rows' material: a throwaway CA, the proxies' and the backend's certificates."""

    ca: Path
    cert: Path
    key: Path
    backend: str = ""  # the TLS backend's address, once started
    proc: Proc | None = None  # and its process
    server_name: str = "backend.bench"

    @classmethod
    def make(cls, workdir: Path) -> tuple[_Tls, Path, Path]:
        """The material, and the backend's own (cert, key)."""
        import trustme  # noqa: PLC0415 - only the TLS rows need it

        ca = trustme.CA()
        tls_dir = workdir / "tls"
        tls_dir.mkdir()
        tls_dir.chmod(0o755)

        def write(name: str, data: bytes) -> Path:
            path = tls_dir / name
            path.write_bytes(data)
            return path

        proxy = ca.issue_cert("localhost", "127.0.0.1")
        backend = ca.issue_cert(cls.server_name)
        made = cls(
            write("ca.pem", ca.cert_pem.bytes()),
            write("proxy.pem", b"".join(b.bytes() for b in proxy.cert_chain_pems)),
            write("proxy.key", proxy.private_key_pem.bytes()),
        )
        backend_cert = write("backend.pem", b"".join(b.bytes() for b in backend.cert_chain_pems))
        return made, backend_cert, write("backend.key", backend.private_key_pem.bytes())


def _start_tls_backend(workdir: Path, args: argparse.Namespace) -> tuple[Proc, _Tls]:
    """``bench/backend.py`` serving TLS, for the TLS rows (whatever ``--backend`` says)."""
    tls, cert, key = _Tls.make(workdir)
    argv = [
        *_python(),
        str(HERE / "backend.py"),
        f"--stream-count={args.stream_count}",
        f"--stream-size={args.stream_size}",
        f"--tls-cert={cert}",
        f"--tls-key={key}",
    ]
    proc = Proc("backend-tls", argv, workdir)
    tls.backend = f"127.0.0.1:{int(proc.first_line(START_TIMEOUT))}"
    tls.proc = proc
    return proc, tls


def _start_nginx_tls(workdir: Path, binary: str, tls: _Tls, inflight: int) -> tuple[Proc, int]:
    """``_start_nginx`` with ``ssl`` on its listener and ``grpcs://`` to the TLS backend."""
    prefix = workdir / "nginx-tls"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        _NGINX_TLS_CONF.format(
            prefix=prefix,
            port=port,
            backend=tls.backend,
            keepalive=max(64, inflight),
            cert=tls.cert,
            key=tls.key,
            ca=tls.ca,
            server_name=tls.server_name,
        )
    )
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    return Proc("nginx-tls", [*argv, "-g", "daemon off;"], workdir), port


#: haproxy as a gRPC proxy: HTTP/2 on both sides (``proto h2``), one thread.
_HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 2048
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend grpc
    bind 127.0.0.1:{port} proto h2
    default_backend echo
backend echo
    server echo {backend} proto h2
"""


def _start_haproxy(workdir: Path, binary: str, backend: str) -> tuple[Proc, int]:
    """haproxy in the foreground (``-db``), HTTP/2 end to end, as its gRPC docs configure it."""
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(_HAPROXY_CONF.format(port=port, backend=backend))
    return Proc("haproxy", [binary, "-db", "-f", str(conf)], workdir), port


def _probe(target: Target, args: argparse.Namespace, workdir: Path) -> str:
    """Empty when the target answers a unary call (and a full stream); else why not.

    Gives up as soon as the proxy process exits.
    """
    argv = [*_python(), str(HERE / "loadgen.py"), "probe", target.address]
    argv += [f"--timeout={START_TIMEOUT}", *(["--stream"] if target.streams else [])]
    argv += [f"--ca={target.tls_ca}"] if target.tls_ca else []
    proc = Proc(f"probe-{target.config}", argv, workdir)
    deadline = time.monotonic() + START_TIMEOUT + SLACK
    with stopping([proc]):
        while proc.popen.poll() is None:
            if target.proxy and target.proxy.popen.poll() is not None:
                return "the proxy exited"
            if time.monotonic() > deadline:
                return "probe timed out"
            time.sleep(0.05)
        line = proc.out_path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        result = json.loads(line.splitlines()[-1])
    except (ValueError, IndexError):
        return f"probe failed: {proc.stderr_tail()}"
    if not result["unary"]:
        return f"no unary call went through: {result['error']}"
    if target.streams and result["stream_msgs"] != args.stream_count:
        got = result["stream_msgs"]
        return f"stream: {got} of {args.stream_count} messages ({result['error']})"
    return ""


# --- results ----------------------------------------------------------------


@dataclass
class _Row:
    """Every sample of one configuration, and their medians."""

    config: str
    note: str = ""
    #: Started but never ready; a row left out because its program is missing is not failed.
    failed: bool = False
    unary: list[Sample] = field(default_factory=list)
    stream: list[Sample] = field(default_factory=list)

    @staticmethod
    def _median(values: Sequence[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    def figures(self) -> dict[str, float | None]:
        u = [s for s in self.unary if s.ok]
        st = [s for s in self.stream if s.ok and s.msgs]
        med = self._median

        def per(cpu: float | None, n: int) -> float | None:
            return None if cpu is None or not n else 1e6 * cpu / n

        return {
            "calls_per_s": med([s.calls / s.elapsed for s in u]),
            "p50_ms": med([s.p50_ms for s in u]),
            "p99_ms": med([s.p99_ms for s in u]),
            "cpu_us_per_call": med([per(s.proxy_cpu, s.calls) for s in u]),
            "proxy_cores": med(
                [None if s.proxy_cpu is None else s.proxy_cpu / s.elapsed for s in u]
            ),
            "backend_cpu_us_per_call": med([per(s.backend_cpu, s.calls) for s in u]),
            "msgs_per_s": med([s.msgs / s.elapsed for s in st]),
            "cpu_us_per_msg": med([per(s.proxy_cpu, s.msgs) for s in st]),
        }


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


#: Table columns: heading, key of ``_Row.figures()``, decimals.
_COLUMNS = (
    ("calls/s", "calls_per_s", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("CPU µs/call", "cpu_us_per_call", 1),
    ("cores", "proxy_cores", 2),
    ("msgs/s", "msgs_per_s", 0),
    ("CPU µs/msg", "cpu_us_per_msg", 2),
    ("backend µs/call", "backend_cpu_us_per_call", 1),
)

#: The summary: key, what, (config, figure) over (config, figure), the target.
_RATIOS = (
    (
        "lbgw_noflags_cpu_per_call_vs_floor",
        "lbgw, no flags: CPU per unary call / the floor's",
        ("lbgw-noflags", "cpu_us_per_call"),
        ("floor", "cpu_us_per_call"),
        "target <= 0.85x",
    ),
    (
        "lbgw_noflags_p50_vs_floor",
        "lbgw, no flags: p50 / the floor's (the target is at --concurrency 1 --connections 1)",
        ("lbgw-noflags", "p50_ms"),
        ("floor", "p50_ms"),
        "target <= 1.00x",
    ),
    (
        "lbgw_noflags_cpu_per_msg_vs_floor",
        "lbgw, no flags: CPU per streamed message / the floor's",
        ("lbgw-noflags", "cpu_us_per_msg"),
        ("floor", "cpu_us_per_msg"),
        "target <= 0.9x",
    ),
    (
        "lbgw_cpu_per_call_vs_floor",
        "lbgw --method (asyncio) CPU per unary call / the floor's",
        ("lbgw", "cpu_us_per_call"),
        ("floor", "cpu_us_per_call"),
        "target <= 1.25x",
    ),
    (
        "lbgw_uvloop_cpu_per_call_vs_floor",
        "lbgw --method on uvloop: CPU per unary call / the floor's",
        ("lbgw-uvloop", "cpu_us_per_call"),
        ("floor", "cpu_us_per_call"),
        "for reading",
    ),
    (
        "floor_uvloop_cpu_per_call_vs_floor",
        "the floor on uvloop: CPU per unary call / on asyncio",
        ("floor-uvloop", "cpu_us_per_call"),
        ("floor", "cpu_us_per_call"),
        "for reading",
    ),
    (
        "lbgw_w2_calls_per_s_vs_lbgw",
        "lbgw --workers 2 calls/s / one worker's",
        ("lbgw-w2", "calls_per_s"),
        ("lbgw", "calls_per_s"),
        "target >= 1.5x",
    ),
    (
        "lbgw_stream_cpu_per_call_vs_floor",
        "lbgw --no-reflection (kinds unknown): CPU per unary call / the floor's",
        ("lbgw-stream", "cpu_us_per_call"),
        ("floor", "cpu_us_per_call"),
        "for reading: what the fast path saves",
    ),
    (
        "lbgw_trace_1pct_cpu_per_call_vs_off",
        "lbgw CPU per unary call, traced 1% / tracing off",
        ("lbgw-trace-1pct", "cpu_us_per_call"),
        ("lbgw", "cpu_us_per_call"),
        "target <= 1.05x",
    ),
    (
        "lbgw_trace_all_cpu_per_call_vs_off",
        "lbgw CPU per unary call, traced 100% / tracing off",
        ("lbgw-trace-all", "cpu_us_per_call"),
        ("lbgw", "cpu_us_per_call"),
        "target <= 1.5x",
    ),
    (
        "lbgw_metrics_cpu_per_call_vs_off",
        "lbgw CPU per unary call, metrics on / off",
        ("lbgw-metrics", "cpu_us_per_call"),
        ("lbgw", "cpu_us_per_call"),
        "target <= 1.03x",
    ),
    (
        "lbgw_cpu_per_call_vs_nginx",
        "lbgw CPU per unary call / nginx's",
        ("lbgw", "cpu_us_per_call"),
        ("nginx", "cpu_us_per_call"),
        "for reading",
    ),
    (
        "lbgw_cpu_per_msg_vs_nginx",
        "lbgw CPU per streamed message / nginx's",
        ("lbgw", "cpu_us_per_msg"),
        ("nginx", "cpu_us_per_msg"),
        "for reading",
    ),
    (
        "lbgw_tls_cpu_per_call_vs_plain",
        "lbgw CPU per unary call, TLS both sides / plaintext",
        ("lbgw-tls", "cpu_us_per_call"),
        ("lbgw", "cpu_us_per_call"),
        "for reading: what TLS costs lbgw",
    ),
    (
        "nginx_tls_cpu_per_call_vs_plain",
        "nginx CPU per unary call, TLS both sides / plaintext",
        ("nginx-tls", "cpu_us_per_call"),
        ("nginx", "cpu_us_per_call"),
        "for reading: what TLS costs nginx",
    ),
    (
        "lbgw_tls_cpu_per_call_vs_nginx_tls",
        "lbgw CPU per unary call / nginx's, both with TLS",
        ("lbgw-tls", "cpu_us_per_call"),
        ("nginx-tls", "cpu_us_per_call"),
        "for reading",
    ),
    (
        "floor_cpu_per_call_vs_nginx",
        "floor CPU per unary call / nginx's",
        ("floor", "cpu_us_per_call"),
        ("nginx", "cpu_us_per_call"),
        "for reading",
    ),
    (
        "lbgw_noflags_cpu_per_call_vs_haproxy",
        "lbgw, no flags: CPU per unary call / haproxy's",
        ("lbgw-noflags", "cpu_us_per_call"),
        ("haproxy", "cpu_us_per_call"),
        "for reading",
    ),
)


def _table(rows: Sequence[_Row]) -> list[str]:
    head = ("config", *(c[0] for c in _COLUMNS))
    lines = [head]
    for row in rows:
        f = row.figures()
        lines.append((LABELS[row.config], *(_fmt(f[key], d) for _, key, d in _COLUMNS)))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        nums = "  ".join(f"{v:>{w}}" for v, w in zip(r[1:], widths[1:], strict=True))
        return f"{r[0]:<{widths[0]}}  {nums}"

    out = [fmt(r) for r in lines]
    return [out[0], "-" * len(out[0]), *out[1:]]


def _ratios(rows: Sequence[_Row]) -> list[tuple[str, str, float | None, str]]:
    """(key, what, value, target) for the summary under the table."""
    f = {row.config: row.figures() for row in rows}
    found = []
    for key, what, (c1, k1), (c2, k2), aim in _RATIOS:
        a, b = f.get(c1, {}).get(k1), f.get(c2, {}).get(k2)
        found.append((key, what, a / b if a is not None and b else None, aim))
    return found


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


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --- command line -----------------------------------------------------------


def _configs(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in CONFIGS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise argparse.ArgumentTypeError(
            f"unknown config {given}; choose from {', '.join(CONFIGS)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/proxy.py",
        description="Calls/s, latency and proxy CPU per call: lbgw, its floor, nginx, no proxy.",
    )
    p.add_argument(
        "--runs",
        type=positive(int),
        default=None,
        help=f"interleaved runs per configuration; medians are shown (default {DEFAULT_RUNS})",
    )
    p.add_argument(
        "--duration",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help=f"measured seconds per run and kind (default {DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--warmup",
        type=positive(float),
        default=None,
        metavar="SECONDS",
        help=f"unmeasured load before each run (default {DEFAULT_WARMUP:g})",
    )
    p.add_argument("--concurrency", type=positive(int), default=32, help="unary calls in flight")
    p.add_argument("--stream-concurrency", type=positive(int), default=8, help="streams in flight")
    p.add_argument(
        "--connections",
        type=positive(int),
        default=8,
        help="client connections (channels); several, so SO_REUSEPORT can spread them",
    )
    p.add_argument(
        "--client-procs",
        type=positive(int),
        default=1,
        help="grpcio load generator processes (without h2load)",
    )
    p.add_argument("--payload", type=int, default=100, metavar="BYTES", help="unary request size")
    p.add_argument("--stream-count", type=positive(int), default=1000, help="messages per stream")
    p.add_argument("--stream-size", type=int, default=100, metavar="BYTES", help="message size")
    p.add_argument(
        "--loadgen",
        choices=("auto", "h2load", "grpcio"),
        default="auto",
        help="load generator: h2load when installed (auto), or bench/loadgen.py",
    )
    p.add_argument(
        "--configs",
        type=_configs,
        default=None,
        help=f"comma list of configurations (default all found: {','.join(CONFIGS)}; "
        f"with --quick: {','.join(QUICK_CONFIGS)})",
    )
    p.add_argument("--lbgw", default=None, metavar="PATH", help="the lbgw executable")
    p.add_argument("--nginx", default=None, metavar="PATH", help="the nginx executable")
    p.add_argument("--haproxy", default=None, metavar="PATH", help="the haproxy executable")
    p.add_argument(
        "--backend",
        choices=("python", "nginx"),
        default="python",
        help="the echo backend: bench/backend.py (grpc.aio), or nginx serving canned "
        "replies, which leaves the CPU to the proxy (to measure --workers on 2 cores)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_RUNS} run of {QUICK_DURATION:g} s unless given otherwise",
    )
    return p


def _start_targets(  # noqa: PLR0912, PLR0913, PLR0915 - one block per configuration of the table
    args: argparse.Namespace,
    workdir: Path,
    procs: list[Proc],
    backend: str,
    sinks: dict[str, Proc],
    *,
    tls: _Tls | None = None,
) -> tuple[list[Target], list[_Row]]:
    """Start every configuration asked for and found; rows note those left out and why.

    ``sinks`` gets the OTLP sink of each traced configuration.
    """
    targets: list[Target] = []
    skipped: list[_Row] = []
    for config in args.configs:
        if config == "direct":
            targets.append(Target(config, backend, None))
        elif config.startswith("floor"):
            proc = _start_floor(workdir, backend, config)
            procs.append(proc)
            try:
                port = int(proc.first_line(START_TIMEOUT))
            except (RuntimeError, ValueError) as exc:
                skipped.append(_Row(config, note=f"did not start: {exc}", failed=True))
                continue
            targets.append(Target(config, f"127.0.0.1:{port}", proc))
        elif config in TLS_CONFIGS and tls is None:
            skipped.append(_Row(config, note="the TLS backend did not start", failed=True))
        elif config == "lbgw-tls" and tls is not None:
            binary = _lbgw_binary(args.lbgw)
            help_text = _lbgw_help(binary) if binary else None
            if binary is None or help_text is None or "--tls-cert" not in help_text:
                skipped.append(_Row(config, note="this lbgw has no --tls-cert: not measured"))
                continue
            port = free_port()
            argv = _lbgw_argv(binary, help_text, port, tls.backend, 1, loop=EVENT_LOOP[config])
            argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            argv += ["--backend-ca", str(tls.ca), "--backend-server-name", tls.server_name]
            procs.append(Proc(config, argv, workdir))
            address = f"127.0.0.1:{port}"
            targets.append(Target(config, address, procs[-1], tls_ca=str(tls.ca), backend=tls.proc))
        elif config == "nginx-tls" and tls is not None:
            binary = args.nginx or shutil.which("nginx")
            if binary is None:
                skipped.append(_Row(config, note="nginx is not on PATH: not measured"))
                continue
            inflight = max(args.concurrency, args.stream_concurrency)
            proc, port = _start_nginx_tls(workdir, binary, tls, inflight)
            procs.append(proc)
            targets.append(
                Target(config, f"127.0.0.1:{port}", proc, tls_ca=str(tls.ca), backend=tls.proc)
            )
        elif config.startswith("lbgw"):
            binary = _lbgw_binary(args.lbgw)
            help_text = _lbgw_help(binary) if binary else None
            if binary is None or help_text is None:
                skipped.append(_Row(config, note="`lbgw serve --help` does not run: not measured"))
                continue
            env: dict[str, str] = {}
            if config in TRACED:
                sink = _start_sink(workdir, config)
                procs.append(sink)
                try:
                    sink_address = sink.first_line(START_TIMEOUT)
                except RuntimeError as exc:
                    skipped.append(_Row(config, note=f"OTLP sink: {exc}", failed=True))
                    continue
                sinks[config] = sink
                env = _tracing_env(config, sink_address)
            port = free_port()
            workers = 2 if config == "lbgw-w2" else 1
            argv = _lbgw_argv(
                binary,
                help_text,
                port,
                backend,
                workers,
                kinds=config in WITH_KINDS,
                env=env,
                flags=config != "lbgw-noflags",
                loop=EVENT_LOOP.get(config),
                reflection=config != "lbgw-stream",
                admin=free_port() if config == "lbgw-metrics" else None,
            )
            procs.append(Proc(config, argv, workdir))
            streams = config not in TRACED
            targets.append(Target(config, f"127.0.0.1:{port}", procs[-1], streams=streams))
        elif config == "nginx":
            binary = args.nginx or shutil.which("nginx")
            if binary is None:
                skipped.append(_Row(config, note="nginx is not on PATH: not measured"))
                continue
            inflight = max(args.concurrency, args.stream_concurrency)
            proc, port = _start_nginx(workdir, binary, backend, inflight)
            procs.append(proc)
            targets.append(Target(config, f"127.0.0.1:{port}", proc))
        elif config == "haproxy":
            binary = args.haproxy or shutil.which("haproxy")
            if binary is None:
                note = "haproxy is not on PATH (apt-get install haproxy): not measured"
                skipped.append(_Row(config, note=note))
                continue
            proc, port = _start_haproxy(workdir, binary, backend)
            procs.append(proc)
            targets.append(Target(config, f"127.0.0.1:{port}", proc))
    ready: list[Target] = []
    for target in targets:
        why = _probe(target, args, workdir)
        if why.startswith("stream:"):
            target.streams, target.note = False, why
            why = ""
        if why:
            tail = f"; {target.proxy.stderr_tail()}" if target.proxy else ""
            skipped.append(_Row(target.config, note=f"not ready: {why}{tail}", failed=True))
            continue
        ready.append(target)
    return ready, skipped


def _measure(args: argparse.Namespace, h2load: str | None) -> list[_Row]:
    """Start everything, run each configuration ``args.runs`` times interleaved, stop all."""
    load = Load(
        concurrency=args.concurrency,
        stream_concurrency=args.stream_concurrency,
        connections=args.connections,
        client_procs=args.client_procs,
        payload=args.payload,
        stream_size=args.stream_size,
        warmup=args.warmup,
        duration=args.duration,
    )
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="lbgw-bench-") as tmp, stopping(procs):
        workdir = Path(tmp)
        backend_proc, backend = _start_backend(workdir, args)
        procs.append(backend_proc)
        driver = Driver(load, workdir, backend_proc, h2load)
        sinks: dict[str, Proc] = {}
        tls: _Tls | None = None
        if any(c in TLS_CONFIGS for c in args.configs):
            try:
                tls_proc, tls = _start_tls_backend(workdir, args)
            except (RuntimeError, ValueError) as exc:
                _progress(f"the TLS backend did not start: {exc}")
            else:
                procs.append(tls_proc)
        targets, skipped = _start_targets(args, workdir, procs, backend, sinks, tls=tls)
        rows = {t.config: _Row(t.config, note=t.note) for t in targets}
        windows = args.runs * sum(1 + t.streams for t in targets)
        _progress(
            f"{len(targets)} configurations ({', '.join(rows)}), {args.runs} run(s), "
            f"load by {'h2load' if h2load else 'grpcio'}, "
            f"about {windows * (args.duration + args.warmup + 0.5):.0f} s"
        )
        for r in range(args.runs):
            for target in targets:
                row = rows[target.config]
                for kind in ("unary", "stream") if target.streams else ("unary",):
                    sample = driver.measure(target, kind)
                    (row.unary if kind == "unary" else row.stream).append(sample)
                    _progress(f"  run {r + 1}/{args.runs} {target.config:<8} {kind:<6} {sample}")
        for config, sink in sinks.items():
            if config in rows:
                row = rows[config]
                notes = (row.note, "unary only", _sink_note(sink, row))
                row.note = "; ".join(x for x in notes if x)
    return [rows.get(c) or next(r for r in skipped if r.config == c) for c in args.configs]


def _machine(args: argparse.Namespace, h2load: str | None) -> dict[str, object]:
    impl = sys.implementation.name
    return {
        "nproc": _nproc(),
        "cpu": _cpu_model(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": f"{ {'cpython': 'CPython'}.get(impl, impl) } {platform.python_version()}",
        "platform": platform.platform(),
        "grpcio": _dist_version("grpcio"),
        "lbgw": _dist_version("lbgw"),
        "h2load": _version([h2load, "--version"]) if h2load else "not used",
        "nginx": _version([args.nginx or shutil.which("nginx") or "nginx", "-v"]),
        "haproxy": _version([args.haproxy or shutil.which("haproxy") or "haproxy", "-v"]),
        "uvloop": _dist_version("uvloop"),
    }


def _report(args: argparse.Namespace, machine: dict[str, object], rows: Sequence[_Row]) -> None:
    h2load = machine["h2load"]
    loadgen = f"h2load ({h2load})" if h2load != "not used" else "grpcio (bench/loadgen.py)"
    print(
        f"# lbgw proxy benchmark: nproc {machine['nproc']}, {machine['cpu']}, "
        f"{machine['python']}, grpcio {machine['grpcio']}, lbgw {machine['lbgw']}, "
        f"{machine['platform']}, load average before {machine['loadavg']}"
    )
    print(
        f"# load: {loadgen}, {args.concurrency} unary calls in flight on "
        f"{args.connections} connections, {args.payload} B requests; "
        f"{args.stream_concurrency} streams of {args.stream_count} x {args.stream_size} B"
    )
    print(
        f"# medians of {args.runs} interleaved run(s) of {args.duration:g} s, each after "
        f"{args.warmup:g} s of warm-up; CPU = the proxy's utime+stime over its process tree"
    )
    for line in _table(rows):
        print(line)
    for row in rows:
        notes = [row.note] if row.note else []
        splits = [s.cpu_split for s in row.unary if s.cpu_split]
        if splits:
            notes.append("CPU split over processes per run: " + ", ".join(map(_split, splits)))
        errors = [s.error for s in (*row.unary, *row.stream) if s.error]
        if errors:
            notes.append(f"{len(errors)} run(s) with errors, first: {errors[0]}")
        if notes:
            print(f"# {LABELS[row.config]}: {'; '.join(notes)}")
    print(
        "# cores = the proxy's CPU seconds per second; backend µs/call = the echo server's CPU "
        "per call, for scale"
    )
    ratios = _ratios(rows)
    print("# summary (ratios of the medians above):")
    width = max(len(what) for _, what, _, _ in ratios)
    for _, what, value, aim in ratios:
        shown = "-" if value is None else f"{value:.2f}x"
        print(f"#   {what:<{width}}  {shown:>6}  ({aim})")
    if _nproc() <= 2:
        print(
            f"# note: {_nproc()} cores run the backend, the proxy and the load generator "
            "together, so a second worker has little idle CPU to use here"
        )


def _write_json(
    path: Path, args: argparse.Namespace, machine: dict[str, object], rows: Sequence[_Row]
) -> None:
    skip = ("json", "lbgw", "nginx", "haproxy", "quick")
    result = {
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in skip}
        | {"loadgen": "grpcio" if machine["h2load"] == "not used" else "h2load"},
        "rows": [
            {"config": row.config, "label": LABELS[row.config], "note": row.note}
            | row.figures()
            | {
                "unary_runs": [asdict(s) for s in row.unary],
                "stream_runs": [asdict(s) for s in row.stream],
            }
            for row in rows
        ],
        "ratios": {key: value for key, _, value, _ in _ratios(rows)},
    }
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    _progress(f"wrote {len(rows)} rows to {path}")


def _split(shares: Sequence[float]) -> str:
    return "/".join(f"{s:.0f}" for s in shares) + "%"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.runs = int(args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS))
    args.duration = float(args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION))
    args.warmup = float(args.warmup or (QUICK_WARMUP if args.quick else DEFAULT_WARMUP))
    if args.configs is None:
        args.configs = list(QUICK_CONFIGS if args.quick else CONFIGS)
    h2load = shutil.which("h2load") if args.loadgen in ("auto", "h2load") else None
    if args.loadgen == "h2load" and h2load is None:
        _progress("h2load is not on PATH (apt-get install nghttp2-client)")
        return 2

    # SIGTERM unwinds like Ctrl-C, so every process started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    machine = _machine(args, h2load)
    try:
        rows = _measure(args, h2load)
    except RuntimeError as exc:  # the backend did not start: nothing to measure
        _progress(f"bench/proxy.py: {exc}")
        return 1
    _report(args, machine, rows)
    if args.json is not None:
        _write_json(args.json, args, machine, rows)
    _progress(f"done in {time.perf_counter() - started:.1f} s")
    failed = [r.config for r in rows if r.failed or any(not s.ok for s in (*r.unary, *r.stream))]
    if failed:
        _progress(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
