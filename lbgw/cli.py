"""The ``lbgw`` command: ``serve``, ``check-config``, ``demo`` and ``call``.

This module and ``lbgw.config`` are the only ones that read argv, files or
the environment (but for ``kernels.py``, which reads ``LBGW_NO_EXTENSIONS``).
``serve`` takes a config file or the quick-form flags, lays the ``OTEL_*``
variables and ``LBGW_STICKY_SECRET`` over it, runs the gateway and drains it
on SIGTERM or SIGINT. Exit status: 0 after a drain, 2 for a bad config or
command line, 1 if the gateway cannot start.

SIGHUP reloads the config (``reload.Reloader``): an invalid file is logged
and the gateway keeps serving the old one; SIGHUP never stops lbgw.

``serve --workers N`` runs N worker processes that share the listening ports
with ``SO_REUSEPORT``, looked after by this process (``supervisor.py``):
restarted when they die, reloaded on SIGHUP, drained on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from lbgw import loops
from lbgw.config import (
    EVENT_LOOPS,
    HASH_STRATEGIES,
    HEALTH_MODES,
    STRATEGIES,
    Config,
    ListenerConfig,
    LogConfig,
    MethodKind,
    TracingConfig,
    config_from_bytes,
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
from lbgw.reload import config_hash
from lbgw.supervisor import (
    WORKER_CONFIG_ENV,
    WORKER_ENV,
    WORKER_LISTENERS_ENV,
    WORKER_PARENT_ENV,
    WORKER_READY_ENV,
    Supervisor,
)

__all__ = ["main"]

log = logging.getLogger("lbgw.cli")

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


def _backend_dns(text: str) -> dict[str, Any]:
    name, sep, port = text.rpartition(":")
    if (
        not sep
        or not name
        or not (port.isascii() and port.isdigit())
        or not 1 <= int(port) <= 65535
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:PORT, a DNS name and a port 1-65535"
        )
    return {"name": name, "port": int(port)}


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
    serve.add_argument(
        "--backend-dns",
        metavar="NAME:PORT",
        action="append",
        type=_backend_dns,
        help="backends are what NAME resolves to (A and AAAA records), on PORT; re-resolved "
        "every --dns-refresh seconds (quick form; repeatable, instead of --backend)",
    )
    serve.add_argument(
        "--dns-server",
        metavar="HOST:PORT",
        action="append",
        type=_listen,
        help="with --backend-dns: the nameserver to ask (repeatable; default: resolv.conf)",
    )
    serve.add_argument(
        "--dns-refresh",
        type=float,
        metavar="SECONDS",
        help="with --backend-dns: seconds between resolutions (default 5)",
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
        action=argparse.BooleanOptionalAction,
        help="learn method kinds from the backends' server reflection (on by default; quick form)",
    )
    serve.add_argument(
        "--protoset",
        metavar="FILE",
        action="append",
        default=[],
        help="method kinds from a file written by protoc --include_imports "
        "--descriptor_set_out (quick form; repeatable)",
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
    _tls_flags(serve)
    serve.add_argument(
        "--health-rpc",
        choices=("check", "watch"),
        help="with grpc health checks: watch (a Watch stream beside Check probes, the "
        "default) or check (Check probes only) (quick form)",
    )
    serve.add_argument(
        "--max-requests",
        type=int,
        metavar="N",
        help="circuit breaker: calls in flight to the cluster before it refuses more "
        "with UNAVAILABLE (default 1024, Envoy's; quick form)",
    )
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes (default 1)")
    serve.add_argument("--grace", type=float, metavar="SECONDS", help="drain time on SIGTERM")
    serve.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        help="auto (uvloop when installed, the default), asyncio or uvloop",
    )
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
    demo.add_argument("--tls", action="store_true", help="mTLS on both sides, with a throwaway CA")
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
    call.add_argument("--ca", metavar="FILE", help="call over TLS, verified against this CA")
    call.add_argument("--cert", metavar="FILE", help="with --ca: the client certificate")
    call.add_argument("--key", metavar="FILE", help="with --ca: the client certificate's key")
    return parser


# -- TLS (issue 14): the quick form's flags -------------------------------------------------------

#: Quick-form flag -> (where, key) in the config it builds.
_TLS_FLAGS: Final = {
    "--tls-cert": ("listener", "cert_file"),
    "--tls-key": ("listener", "key_file"),
    "--tls-client-ca": ("listener", "client_ca_file"),
    "--backend-ca": ("cluster", "ca_file"),
    "--backend-cert": ("cluster", "cert_file"),
    "--backend-key": ("cluster", "key_file"),
    "--backend-server-name": ("cluster", "server_name"),
}


def _tls_flags(serve: argparse.ArgumentParser) -> None:
    helps = {
        "--tls-cert": "the listeners' certificate chain, PEM: TLS on every listener (quick form)",
        "--tls-key": "the key of --tls-cert, PEM (quick form)",
        "--tls-client-ca": "require client certificates chaining to this CA, PEM: mTLS "
        "(quick form)",
        "--backend-ca": "TLS to the backends, verified against this CA, PEM (quick form)",
        "--backend-cert": "with --backend-ca: lbgw's client certificate to the backends, PEM",
        "--backend-key": "the key of --backend-cert, PEM",
        "--backend-server-name": "with --backend-ca: the name verified in the backends' "
        "certificates, and sent as SNI and :authority",
    }
    for flag, text in helps.items():
        serve.add_argument(flag, metavar="NAME" if flag.endswith("name") else "FILE", help=text)


def _tls_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, flag[2:].replace("-", "_")) for flag in _TLS_FLAGS)


def _tls_quick(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The quick form's listener ``tls`` table and cluster ``tls`` table, or None for each."""
    listener: dict[str, Any] = {}
    cluster: dict[str, Any] = {}
    for flag, (where, key) in _TLS_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value:
            (listener if where == "listener" else cluster)[key] = value
    for a, b in (("--tls-cert", "--tls-key"), ("--tls-key", "--tls-cert")):
        if getattr(args, a[2:].replace("-", "_")) and not getattr(args, b[2:].replace("-", "_")):
            raise ConfigError("command line", b, f"a PEM file with {a}")
    if listener.get("client_ca_file") and not listener.get("cert_file"):
        raise ConfigError("command line", "--tls-cert", "a certificate with --tls-client-ca")
    if listener.get("client_ca_file"):  # in the quick form, a client CA means mTLS
        listener["require_client_cert"] = True
    if cluster and "ca_file" not in cluster:
        raise ConfigError("command line", "--backend-ca", "a CA file with the other --backend-*")
    for a, b in (("--backend-cert", "--backend-key"), ("--backend-key", "--backend-cert")):
        if getattr(args, a[2:].replace("-", "_")) and not getattr(args, b[2:].replace("-", "_")):
            raise ConfigError("command line", b, f"a PEM file with {a}")
    return listener or None, cluster or None


def _check_tls(config: Config) -> list[str]:
    """Every TLS file, loaded and checked (``tls.check_config``); the quick form's flags named."""
    from lbgw import tls  # noqa: PLC0415 - cryptography only when needed

    try:
        return tls.check_config(config)
    except ConfigError as exc:
        if config.source != "command line":
            raise
        where = exc.key.split(".")[0].split("[")[0]  # listeners | clusters
        for flag, (kind, key) in _TLS_FLAGS.items():
            if exc.key.endswith(f".tls.{key}") and where.startswith(kind):
                raise ConfigError(config.source, flag, exc.expected, exc.got) from None
        raise


def _serve_config(  # noqa: PLR0912, PLR0915 - a flag each
    args: argparse.Namespace, data: bytes | None = None
) -> Config:
    """The config ``serve`` runs: the file (or ``data``, its bytes read before) or the flags."""
    quick = (
        args.listen
        or args.backend
        or args.strategy
        or args.method
        or args.reflection is not None
        or args.protoset
        or args.health_check
        or args.health_interval is not None
        or args.health_rpc
        or args.hash_key
        or _tls_given(args)
        or args.backend_dns
        or args.dns_server
        or args.dns_refresh is not None
        or args.max_requests is not None
    )
    if args.config and quick:
        raise ConfigError(
            "command line", "--config", "either --config or the quick form flags, not both"
        )
    if args.config:
        config = load_config(args.config) if data is None else config_from_bytes(data, args.config)
    else:
        dns = _quick_dns(args)
        if not args.backend and not dns:
            raise ConfigError("command line", "--backend", "at least one --backend HOST:PORT")
        if args.backend and dns:
            raise ConfigError(
                "command line", "--backend-dns", "either --backend or --backend-dns, not both"
            )
        addresses = [b["address"] for b in args.backend or ()]
        for address in addresses:
            if addresses.count(address) > 1:
                raise ConfigError("command line", "--backend", "each address once", address)
        methods = [m for m, _ in args.method]
        for method in methods:
            if methods.count(method) > 1:
                raise ConfigError("command line", "--method", "each method once", method)
        cluster: dict[str, Any] = {
            **({"dns": dns} if dns else {"endpoints": args.backend}),
            "strategy": args.strategy or "swrr",
            "methods": dict(args.method),
            "reflection": args.reflection is not False,
            "descriptor_sets": args.protoset,
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
        if args.health_rpc:
            health["rpc"] = args.health_rpc
        if health:
            cluster["health_check"] = health
        listener_tls, cluster_tls = _tls_quick(args)
        if cluster_tls is not None:
            cluster["tls"] = cluster_tls
        tls_key = {} if listener_tls is None else {"tls": listener_tls}
        if args.max_requests is not None:
            if not 1 <= args.max_requests <= 2**31 - 1:
                expected = "an integer from 1 to 2^31-1"
                raise ConfigError("command line", "--max-requests", expected, args.max_requests)
            cluster["circuit_breakers"] = {"max_requests": args.max_requests}
        config = config_from_mapping(
            {
                "listeners": [
                    {"address": a, **tls_key} for a in (args.listen or ["127.0.0.1:50051"])
                ],
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
    if args.event_loop is not None:
        changes["event_loop"] = args.event_loop
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


# A SIGHUP before the gateway serves (its default action would kill lbgw) is
# remembered and reloads once it serves.
_early_hup = False


def _remember_hup(signum: int, frame: object) -> None:
    global _early_hup  # noqa: PLW0603 - set from a signal handler
    _early_hup = True


def remember_early(signals: Sequence[int]) -> None:
    """Signals that came before this module was imported (``python -m lbgw``)."""
    for signum in signals:
        if signum == signal.SIGHUP:
            _remember_hup(signum, None)
        else:
            _remember_stop(signum, None)


def _admin_reload(reloader: Any, draining: Callable[[], bool]) -> None:
    """``POST /reload`` on the admin port: the same as SIGHUP, answered with the outcome."""
    from lbgw.admin import register_action  # noqa: PLC0415 - aiohttp only when asked

    async def reload_action(query: Mapping[str, str]) -> Mapping[str, Any]:
        if draining():
            return {"ok": False, "error": "draining", "config": reloader.config_id}
        log.info("POST /reload: reloading", extra=fields(config=reloader.config_id))
        result: Mapping[str, Any] = await reloader.reload()
        return result

    register_action("/reload", reload_action)


async def _run_gateway(  # noqa: PLR0913, PLR0915 - a worker's inputs; start, serve, drain
    config: Config,
    *,
    reuse_port: bool,
    load: Loader,
    config_id: str,
    ready_fd: int | None = None,
    admin_socket: str = "",
) -> int:
    from lbgw.reload import Reloader  # noqa: PLC0415 - keep `check-config` light
    from lbgw.server import Gateway  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if _early_stop:
        stop.set()
    log.info("event loop", extra=fields(loop=loops.loop_name(loop), chosen=config.event_loop))
    gateway = Gateway(config, reuse_port=reuse_port, admin_socket=admin_socket)
    reloader = Reloader(gateway, load, config_id=config_id, on_log=_relog)
    gateway.reloader = reloader
    if config.admin.address is not None and not admin_socket:
        # A fleet's worker reloads at its supervisor's word, which serves /reload itself.
        _admin_reload(reloader, lambda: draining)
    reloads: set[asyncio.Task[Any]] = set()
    draining = False

    def on_hup() -> None:
        if draining:  # SIGHUP never stops lbgw, nor reloads a draining one
            log.info("SIGHUP while draining: ignored")
            return
        log.info("SIGHUP: reloading", extra=fields(config=reloader.config_id))
        task = asyncio.ensure_future(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

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
    log.info("serving", extra=fields(config=config_id, worker=os.environ.get(WORKER_ENV)))
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    if _early_hup:
        on_hup()
    if ready_fd is not None:  # tell the supervisor this worker serves
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"{os.getpid()}\n".encode())
            os.close(ready_fd)
    waiter = asyncio.ensure_future(gateway.wait())
    await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
    draining = True
    grace = gateway.config.grace_period  # the config running now, reloads included
    log.info("draining", extra=fields(grace_period=grace))
    for task in list(reloads):
        task.cancel()
    await gateway.stop(grace)
    waiter.cancel()
    stopper.cancel()
    log.info("stopped")
    return 0


def _quick_dns(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``dns`` tables of the quick form's cluster (none without --backend-dns)."""
    if not args.backend_dns:
        if args.dns_server or args.dns_refresh is not None:
            flag = "--dns-server" if args.dns_server else "--dns-refresh"
            raise ConfigError("command line", flag, "--backend-dns NAME:PORT as well")
        return []
    extra: dict[str, Any] = {}
    if args.dns_server:
        extra["nameservers"] = args.dns_server
    if args.dns_refresh is not None:
        extra["refresh_interval"] = args.dns_refresh
    return [{**d, **extra} for d in args.backend_dns]


def _die_with(parent: int) -> None:
    """Have the kernel SIGTERM this worker if its supervisor dies (Linux prctl)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


Loader = Any  # reload.Loader: () -> (Config, its hash)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, "(file)", f"a readable TOML file ({exc.strerror})") from exc


def _loader(args: argparse.Namespace, snapshot: str | None = None) -> Any:
    """Reads and validates the config again (SIGHUP): (config, hash, the file's bytes)."""

    def load() -> tuple[Config, str, bytes | None]:
        if not args.config:  # the quick form: the same flags, the same config
            config = _serve_config(args)
            return config, config_hash(config), None
        data = _read(snapshot or args.config)
        return _serve_config(args, data), config_hash(data), data

    return load


def _worker_listeners(config: Config) -> tuple[ListenerConfig, ...]:
    """A worker's listeners: ``config``'s, at the addresses of the supervisor's file.

    The supervisor writes the file in the listeners' order, each port 0
    resolved once for all the workers; the rest of each listener (its TLS)
    is the config's.
    """
    with open(os.environ[WORKER_LISTENERS_ENV], encoding="utf-8") as f:
        addresses = f.read().split(",")
    if len(addresses) != len(config.listeners):
        raise ConfigError(
            os.environ[WORKER_LISTENERS_ENV],
            "listeners",
            f"{len(config.listeners)} addresses, one per listener",
            len(addresses),
        )
    return tuple(replace(lc, address=a) for lc, a in zip(config.listeners, addresses, strict=True))


def _relog(log_config: LogConfig) -> None:
    configure(log_config.level, log_config.format)


def _supervise(
    config: Config, argv: Sequence[str], load: Any, config_id: str, data: bytes | None
) -> int:
    """``--workers N``: this process supervises the workers (``supervisor.py``)."""
    supervisor = Supervisor(
        config, argv, load, config_id=config_id, data=data, stop_early=_early_stop
    )
    return supervisor.run()


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    worker = os.environ.get(WORKER_ENV)
    load = _loader(args, os.environ.get(WORKER_CONFIG_ENV) if worker is not None else None)
    config, config_id, data = load()
    configure(config.log.level, config.log.format)
    # A bad TLS file stops here, exit 2, before any worker; the gateway logs the warnings.
    _check_tls(config)
    if worker is not None:
        _die_with(int(os.environ[WORKER_PARENT_ENV]))
        listeners = _worker_listeners(config)

        def worker_load() -> tuple[Config, str]:
            # The supervisor validated this snapshot; the listeners are the ones it resolved.
            new, new_id, _ = load()
            return replace(new, listeners=_worker_listeners(new)), new_id

        ready = os.environ.get(WORKER_READY_ENV)
        admin_socket = ""
        if config.admin.address is not None:  # the supervisor serves it; this worker, a socket
            from lbgw.admin_fleet import worker_socket  # noqa: PLC0415 - aiohttp only when asked

            admin_socket = worker_socket()
            if not admin_socket:  # [admin] added by a reload: served from the next start
                config = replace(config, admin=replace(config.admin, address=None))
        return loops.run(
            _run_gateway(
                replace(config, listeners=listeners),
                reuse_port=True,
                load=worker_load,
                config_id=config_id,
                ready_fd=int(ready) if ready else None,
                admin_socket=admin_socket,
            ),
            config.event_loop,
        )
    if config.workers > 1:
        return _supervise(config, argv, load, config_id, data)

    def single_load() -> tuple[Config, str]:
        new, new_id, _ = load()
        return new, new_id

    return loops.run(
        _run_gateway(config, reuse_port=False, load=single_load, config_id=config_id),
        config.event_loop,
    )


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    for warning in _check_tls(config):
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    clusters = ", ".join(
        f"{c.name} ({c.strategy}, {len(c.endpoints)} endpoints)" for c in config.clusters
    )
    print(
        f"{args.file}: ok: {len(config.listeners)} listener(s), clusters: {clusters}; "
        f"{len(config.routes)} route(s)"
    )
    return 0


def _call_credentials(args: argparse.Namespace) -> Any:
    """``lbgw call``'s TLS credentials from --ca, --cert, --key; None: plaintext."""
    if not args.ca:
        if args.cert or args.key:
            raise ConfigError("command line", "--ca", "a CA file with --cert and --key")
        return None
    if bool(args.cert) != bool(args.key):
        raise ConfigError("command line", "--key" if args.cert else "--cert", "both or neither")
    import grpc  # noqa: PLC0415 - lbgw call only

    files: list[bytes | None] = []
    for flag, path in (("--ca", args.ca), ("--key", args.key), ("--cert", args.cert)):
        if path is None:
            files.append(None)
            continue
        try:
            with open(path, "rb") as f:
                files.append(f.read())
        except OSError as exc:
            raise ConfigError(
                "command line", flag, f"a readable file ({exc.strerror})", path
            ) from None
    return grpc.ssl_channel_credentials(*files)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            signal.signal(signal.SIGTERM, _remember_stop)
            signal.signal(signal.SIGINT, _remember_stop)
            signal.signal(signal.SIGHUP, _remember_hup)
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
                demo.run_demo(
                    args.listen,
                    args.calls,
                    once=args.once,
                    tracing=tracing,
                    tls=args.tls,
                    admin=admin,
                )
            )
        return asyncio.run(
            demo.call(
                args.address,
                args.count,
                args.message,
                args.timeout,
                credentials=_call_credentials(args),
            )
        )
    except ConfigError as exc:
        print(f"lbgw: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LbgwError as exc:
        print(f"lbgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C while stopping
        return 130
