"""The ``lbgw`` command: ``serve``, ``check-config``, ``demo`` and ``call``.

This module and ``lbgw.config`` are the only ones that read argv, files or
the environment (but for ``kernels.py``, which reads ``LBGW_NO_EXTENSIONS``).
``serve`` takes a config file or the quick-form flags, lays the ``OTEL_*``
variables and ``LBGW_STICKY_SECRET`` over it, runs the gateway and drains it
on SIGTERM or SIGINT. Exit status: 0 after a drain, 2 for a bad config or
command line, 1 if the gateway cannot start.

``serve --workers N`` runs N worker processes that share the listening ports
with ``SO_REUSEPORT`` (the kernel spreads incoming connections over them);
a port 0 is resolved, and an unset sticky secret made, once for all of them.
This process supervises them: on SIGTERM or SIGINT it sends every worker
SIGTERM and exits 0 once all have drained, killing one still running
``grace_period`` + 10 s later; if a worker exits on its own, it stops the
others and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

from lbgw.config import (
    HASH_STRATEGIES,
    HEALTH_MODES,
    STICKY_SECRET_ENV,
    STRATEGIES,
    Config,
    ListenerConfig,
    MethodKind,
    TracingConfig,
    config_from_mapping,
    is_metadata_key,
    is_method_name,
    load_config,
    parse_address,
    sticky_from_env,
    tracing_from_env,
)
from lbgw.config.rules import remote_admin_refused
from lbgw.exceptions import ConfigError, LbgwError
from lbgw.logs import configure, fields

__all__ = ["main"]

log = logging.getLogger("lbgw.cli")

# A worker process learns its role and its (already resolved) listeners here.
_WORKER_ENV: Final = "LBGW_WORKER"
_WORKER_LISTENERS_ENV: Final = "LBGW_WORKER_LISTENERS"
_WORKER_PARENT_ENV: Final = "LBGW_WORKER_PARENT"
EXIT_CONFIG: Final = 2


def _listen(text: str) -> str:
    try:
        parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected host:port (IPv6 as [addr]:port)"
        ) from None
    return text


def _backend(text: str) -> dict[str, Any]:
    address, sep, weight = text.partition("=")
    try:
        _, port = parse_address(address)
        if port == 0 or (sep and not (weight.isascii() and weight.isdigit() and int(weight) >= 1)):
            raise ValueError(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected host:port or host:port=WEIGHT, port 1-65535, WEIGHT >= 1"
        ) from None
    return {"address": address, "weight": int(weight) if sep else 1}


def _method_kind(text: str) -> tuple[str, str]:
    method, sep, kind = text.rpartition("=")
    kinds = [k.value for k in MethodKind]
    if not sep or kind not in kinds or not is_method_name(method):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected /package.Service/Method=KIND, KIND one of {', '.join(kinds)}"
        )
    return method, kind


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbgw", description="A gRPC load-balancing gateway.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway from a config file (--config), or from the quick "
        "form: --listen, --backend (repeatable) and --strategy.",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        type=_listen,
        help="listen address (quick form; repeatable)",
    )
    serve.add_argument(
        "--backend",
        metavar="HOST:PORT[=WEIGHT]",
        action="append",
        type=_backend,
        help="a backend endpoint, weight 1 unless given (quick form; repeatable)",
    )
    serve.add_argument("--strategy", choices=STRATEGIES, help="picking strategy (default swrr)")
    serve.add_argument(
        "--method",
        metavar="/pkg.Svc/Method=KIND",
        action="append",
        type=_method_kind,
        default=[],
        help="a method's kind, for the unary fast path (quick form; repeatable)",
    )
    serve.add_argument(
        "--reflection",
        action="store_true",
        help="learn method kinds from the backends' server reflection (quick form)",
    )
    serve.add_argument(
        "--hash-key",
        metavar="KEY",
        help="with --strategy ring_hash or maglev: the request metadata key whose value is "
        "hashed, e.g. x-session-id (quick form)",
    )
    serve.add_argument(
        "--health-check",
        choices=HEALTH_MODES,
        help="active health checks: grpc (grpc.health.v1, the default), tcp or none (quick form)",
    )
    serve.add_argument(
        "--health-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between health checks (default 5; quick form)",
    )
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes (default 1)")
    serve.add_argument("--grace", type=float, metavar="SECONDS", help="drain time on SIGTERM")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("json", "text"))
    serve.add_argument(
        "--admin",
        metavar="HOST:PORT",
        type=_listen,
        help="serve the admin port (metrics, status page, drain, explain) here",
    )

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")

    demo = commands.add_parser("demo", help="run the gateway in front of two demo echo backends")
    demo.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT")
    demo.add_argument("--calls", type=int, default=8, help="sample calls to make at start")
    demo.add_argument("--once", action="store_true", help="exit after the sample calls")
    demo.add_argument(
        "--admin",
        metavar="HOST:PORT",
        type=_listen,
        help="the admin port and status page (default 127.0.0.1:9901; port 0 with --listen's 0)",
    )

    explain = commands.add_parser(
        "explain",
        help="ask a gateway's admin port where a call would go, and why",
        description="Print where the gateway would send a call now, and why: a dry run "
        "that changes nothing (GET /explain on the admin port).",
    )
    explain.add_argument("method", metavar="/pkg.Svc/Method")
    explain.add_argument("--admin", required=True, metavar="HOST:PORT", type=_listen)
    explain.add_argument(
        "-H",
        dest="headers",
        metavar="KEY:VALUE",
        action="append",
        default=[],
        help="request metadata (repeatable)",
    )
    explain.add_argument("--peer", metavar="IP", help="the client's IP (for hash_on = peer)")

    call = commands.add_parser("call", help="call the demo echo service through a gateway")
    call.add_argument("address", metavar="HOST:PORT")
    call.add_argument("--count", type=int, default=4)
    call.add_argument("--message", default="hello")
    call.add_argument("--timeout", type=float, default=5.0)
    return parser


def _serve_config(args: argparse.Namespace) -> Config:  # noqa: PLR0912, PLR0915 - a flag each
    quick = (
        args.listen
        or args.backend
        or args.strategy
        or args.method
        or args.reflection
        or args.health_check
        or args.health_interval is not None
        or args.hash_key
    )
    if args.config and quick:
        raise ConfigError(
            "command line", "--config", "either --config or the quick form flags, not both"
        )
    if args.config:
        config = load_config(args.config)
    else:
        if not args.backend:
            raise ConfigError("command line", "--backend", "at least one --backend HOST:PORT")
        addresses = [b["address"] for b in args.backend]
        for address in addresses:
            if addresses.count(address) > 1:
                raise ConfigError("command line", "--backend", "each address once", address)
        methods = [m for m, _ in args.method]
        for method in methods:
            if methods.count(method) > 1:
                raise ConfigError("command line", "--method", "each method once", method)
        cluster: dict[str, Any] = {
            "endpoints": args.backend,
            "strategy": args.strategy or "swrr",
            "methods": dict(args.method),
            "reflection": args.reflection,
        }
        hashing = cluster["strategy"] in HASH_STRATEGIES
        if hashing and not args.hash_key:
            raise ConfigError(
                "command line",
                "--hash-key",
                f"a metadata key such as x-session-id with --strategy {cluster['strategy']}",
            )
        if args.hash_key:
            if not hashing:
                raise ConfigError(
                    "command line", "--hash-key", "--strategy ring_hash or maglev as well"
                )
            if not is_metadata_key(args.hash_key):
                raise ConfigError(
                    "command line",
                    "--hash-key",
                    "a metadata key of lower-case letters, digits, '-', '_' and '.'",
                    args.hash_key,
                )
            cluster["params"] = {"hash_key": args.hash_key}
        health: dict[str, Any] = {}
        if args.health_check:
            health["mode"] = args.health_check
        if args.health_interval is not None:
            interval = args.health_interval
            if not 0 < interval <= 3600:  # also refuses nan
                raise ConfigError(
                    "command line",
                    "--health-interval",
                    "a positive number of seconds, up to 3600",
                    interval,
                )
            health["interval"] = interval
        if health:
            cluster["health_check"] = health
        config = config_from_mapping(
            {
                "listeners": [{"address": a} for a in (args.listen or ["127.0.0.1:50051"])],
                "clusters": {"default": cluster},
            },
            source="command line",
        )
    changes: dict[str, Any] = {}
    if args.workers is not None:
        if not 1 <= args.workers <= 256:
            raise ConfigError("command line", "--workers", "an integer from 1 to 256", args.workers)
        changes["workers"] = args.workers
    if args.grace is not None:
        if not (args.grace >= 0 and math.isfinite(args.grace)):
            raise ConfigError("command line", "--grace", "a number of seconds >= 0", args.grace)
        changes["grace_period"] = args.grace
    if args.admin:
        config = replace(config, admin=replace(config.admin, address=args.admin))
        refused = remote_admin_refused(config.admin)
        if refused is not None:
            raise ConfigError("command line", "--admin", refused, args.admin)
    log_config = config.log
    if args.log_level:
        log_config = replace(log_config, level=args.log_level)
    if args.log_format:
        log_config = replace(log_config, format=args.log_format)
    # The OTEL_* variables win over the file's [tracing], as they do for any OpenTelemetry SDK.
    tracing = tracing_from_env(config.tracing, os.environ)
    config = sticky_from_env(config, os.environ)
    return replace(config, log=log_config, tracing=tracing, **changes)


# A SIGTERM or SIGINT that arrives before the event loop takes the signals
# over (while lbgw imports and reads its config) is remembered here.
_early_stop = False


def _remember_stop(signum: int, frame: object) -> None:
    global _early_stop  # noqa: PLW0603 - set from a signal handler
    _early_stop = True


async def _run_gateway(config: Config, *, reuse_port: bool, admin_socket: str = "") -> int:
    from lbgw.server import Gateway  # noqa: PLC0415 - keep `check-config` light

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _early_stop:
        stop.set()
    gateway = Gateway(config, reuse_port=reuse_port, admin_socket=admin_socket)
    stopper = asyncio.ensure_future(stop.wait())
    starting = asyncio.ensure_future(gateway.start())
    await asyncio.wait((starting, stopper), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # stopped while starting: nothing is served yet
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        log.info("stopped before serving")
        return 0
    if starting.exception() is not None:
        stopper.cancel()
    starting.result()  # raises StartError (exit 1) if the gateway could not start
    waiter = asyncio.ensure_future(gateway.wait())
    await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
    log.info("draining", extra=fields(grace_period=config.grace_period))
    await gateway.stop(config.grace_period)
    waiter.cancel()
    stopper.cancel()
    log.info("stopped")
    return 0


def _die_with(parent: int) -> None:
    """Have the kernel SIGTERM this worker if its supervisor dies (Linux prctl)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _reserve_ports(config: Config) -> tuple[list[str], list[socket.socket]]:
    """Resolve port 0 for every worker alike: bind (not listen) with SO_REUSEPORT."""
    addresses: list[str] = []
    holders: list[socket.socket] = []
    for listener in config.listeners:
        host, port = parse_address(listener.address)
        if port == 0:
            bare = host.strip("[]")
            family = socket.AF_INET6 if ":" in bare else socket.AF_INET
            holder = socket.socket(family, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((bare, 0))
            holders.append(holder)
            port = holder.getsockname()[1]
        addresses.append(f"{host}:{port}")
    return addresses, holders


def _supervise(config: Config, argv: Sequence[str]) -> int:  # noqa: PLR0912 - with the admin fleet
    stopping = _early_stop

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    addresses, holders = _reserve_ports(config)
    env = dict(os.environ, **{_WORKER_LISTENERS_ENV: ",".join(addresses)})
    if any(c.sticky.enabled and not c.sticky.secret for c in config.clusters):
        # One secret for all the workers, so that each honours the others' tokens.
        env[STICKY_SECRET_ENV] = secrets.token_urlsafe(32)
    env[_WORKER_PARENT_ENV] = str(os.getpid())
    fleet = _fleet(config)  # the admin port over all the workers, if asked for
    workers: list[subprocess.Popen[bytes]] = []
    for n in range(config.workers):
        env[_WORKER_ENV] = str(n)
        if fleet is not None:
            env.update(fleet.worker_env(n))
        workers.append(subprocess.Popen([sys.executable, "-m", "lbgw", *argv], env=dict(env)))
    log.info("workers", extra=fields(pids=[w.pid for w in workers], addresses=addresses))
    status = 0
    try:
        while not stopping:
            exited = [w for w in workers if w.poll() is not None]
            if exited:
                for w in exited:
                    log.error("worker exited", extra=fields(pid=w.pid, code=w.returncode))
                status = 1
                break
            time.sleep(0.1)
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.grace_period + 10.0
        for w in workers:
            try:
                code = w.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop; killing it", extra=fields(pid=w.pid))
                w.kill()
                code = w.wait()
            # A worker stopped by SIGTERM before it could take the signal
            # over was not serving yet: that is a clean stop too.
            if code not in (0, -signal.SIGTERM) or (code != 0 and not stopping):
                status = 1
            if fleet is not None:
                fleet.worker_exited(w.pid)
        for holder in holders:
            holder.close()
        if fleet is not None:
            fleet.stop()
    log.info("stopped", extra=fields(code=status))
    return status


def _fleet(config: Config) -> Any:
    """The supervisor's admin port (``admin_fleet.Fleet``), started; None without one."""
    if config.admin.address is None:
        return None
    from lbgw.admin_fleet import Fleet  # noqa: PLC0415 - aiohttp only when asked

    fleet = Fleet(config)
    address = fleet.start()
    log.info("admin listening", extra=fields(address=address, url=f"http://{address}/"))
    return fleet


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    config = _serve_config(args)
    configure(config.log.level, config.log.format)
    worker = os.environ.get(_WORKER_ENV)
    if worker is not None:
        _die_with(int(os.environ[_WORKER_PARENT_ENV]))
        listeners = os.environ[_WORKER_LISTENERS_ENV].split(",")
        config = replace(config, listeners=tuple(ListenerConfig(a) for a in listeners))
        admin_socket = ""
        if config.admin.address is not None:  # the supervisor serves it; this worker, a socket
            from lbgw.admin_fleet import worker_socket  # noqa: PLC0415 - aiohttp only when asked

            admin_socket = worker_socket()
        return asyncio.run(_run_gateway(config, reuse_port=True, admin_socket=admin_socket))
    if config.workers > 1:
        return _supervise(config, argv)
    return asyncio.run(_run_gateway(config, reuse_port=False))


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    clusters = ", ".join(
        f"{c.name} ({c.strategy}, {len(c.endpoints)} endpoints)" for c in config.clusters
    )
    print(
        f"{args.file}: ok: {len(config.listeners)} listener(s), clusters: {clusters}; "
        f"{len(config.routes)} route(s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            signal.signal(signal.SIGTERM, _remember_stop)
            signal.signal(signal.SIGINT, _remember_stop)
            return _serve(args, argv)
        if args.command == "check-config":
            return _check_config(args)
        if args.command == "explain":
            from lbgw.admin import explain_command  # noqa: PLC0415 - aiohttp only when asked

            return asyncio.run(explain_command(args.admin, args.method, args.headers, args.peer))
        from lbgw import demo  # noqa: PLC0415 - the demo backend is not needed to serve

        if args.command == "demo":
            configure("info", "text")
            # The OTEL_* variables trace the demo too, e.g. into a local Jaeger.
            tracing = tracing_from_env(TracingConfig(), os.environ)
            admin = args.admin
            if admin is None:  # a free port when the gateway's is, as in tests
                admin = "127.0.0.1:0" if args.listen.endswith(":0") else "127.0.0.1:9901"
            return asyncio.run(
                demo.run_demo(args.listen, args.calls, once=args.once, tracing=tracing, admin=admin)
            )
        return asyncio.run(demo.call(args.address, args.count, args.message, args.timeout))
    except ConfigError as exc:
        print(f"lbgw: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LbgwError as exc:
        print(f"lbgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C while stopping
        return 130
