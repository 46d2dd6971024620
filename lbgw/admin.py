"""The admin HTTP port: health of the gateway, metrics, the status page, drain, explain.

An ``aiohttp.web`` application on the gateway's own event loop (the admin
port never carries gRPC). Off unless ``[admin] address`` or ``--admin`` is
set; a non-loopback address needs ``allow_remote = true`` (config rules).
What it serves, as Envoy's and linkerd2-proxy's admin ports do:

==============================  =====================================================
GET /                           the status page (``admin_page.html``, self-contained)
GET /live                       200 while the process runs
GET /ready                      200 once listening with every cluster in rotation;
                                503 while draining or after ``/healthcheck/fail``
GET /metrics                    Prometheus text format (``metrics.py``)
GET /clusters                   JSON: each cluster's endpoints, what they are doing
GET /config                     the config in force, secrets redacted
GET /server_info                version, uptime, pids, config hash, kernels, event loop
GET /explain                    where a call would go, and why: a dry run
POST /healthcheck/fail|ok       lbgw's own health ``""`` NOT_SERVING, and back
POST /endpoints/drain|undrain   ``?cluster=C&address=A``: out of rotation by hand, and back
POST /logging                   ``?level=debug``: the log level
==============================  =====================================================

A GET on a POST path answers 405 and an unknown path 404 (aiohttp's router).
Every POST is logged. ``register_action`` adds a POST path (``/reload``).

With ``--workers N``, each worker serves this on a Unix socket of its own
and the supervisor serves the one admin address (``admin_fleet.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from lbgw import __version__, kernels
from lbgw.config import Config, parse_address
from lbgw.exceptions import NoEligibleEndpointError, StartError
from lbgw.logs import fields
from lbgw.metrics import GatewayCollector, Mirror, build_info

if TYPE_CHECKING:
    from lbgw.cluster import Cluster
    from lbgw.decision import Decision
    from lbgw.endpoints import Endpoint
    from lbgw.server import Gateway

__all__ = [
    "ACTIONS",
    "HISTORY_SECONDS",
    "POST_PATHS",
    "SECRET_KEYS",
    "Action",
    "AdminServer",
    "GatewayAdmin",
    "build_app",
    "config_hash",
    "config_json",
    "explain_command",
    "explain_json",
    "explain_table",
    "redact",
    "register_action",
    "start_gateway_admin",
]

log = logging.getLogger("lbgw.admin")

#: A POST action: the query's parameters in, a JSON-able answer out (``register_action``).
Action: TypeAlias = Callable[[Mapping[str, str]], Awaitable[Mapping[str, Any]]]
#: Config keys whose values ``/config`` never shows (the sticky secret; later, TLS keys).
SECRET_KEYS: Final = frozenset({"secret", "password", "private_key", "token"})
#: How far back the per-endpoint call rates go (the status page's chart).
HISTORY_SECONDS: Final = 300
REDACTED: Final = "<redacted>"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_PAGE: Final = "admin_page.html"


#: The POST actions added to the built-in ones, by path (``register_action``).
ACTIONS: dict[str, Action] = {}


def register_action(path: str, action: Action) -> None:
    """Serve ``POST path`` with ``action`` on admin ports started from now on.

    For actions that belong to the process rather than to the gateway, such
    as ``/reload`` (the supervisor's, with ``--workers``; ``cli.py``'s
    otherwise). ``action(query)`` gets the query's parameters and returns
    JSON-able data; it is logged like every admin action.
    """
    if not path.startswith("/") or path in POST_PATHS:
        raise ValueError(f"{path!r}: expected a new path such as /reload")
    ACTIONS[path] = action


def redact(value: Any) -> Any:
    """``value`` (a config as JSON-able data) with every secret's value replaced."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if k in SECRET_KEYS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):  # a grpc.StatusCode's value is a tuple: its name
        return value.value if not isinstance(value.value, tuple) else value.name
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def config_json(config: Config) -> dict[str, Any]:
    """The config in force as JSON, secrets redacted (``/config``)."""
    data: dict[str, Any] = redact(_jsonable(config))
    return data


def config_hash(config: Config) -> str:
    """A short hash of the config in force, as ``/config`` shows it.

    Of the redacted config: a hash of a secret would let anyone who can read
    the admin port try guesses at it offline.
    """
    text = json.dumps(config_json(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _peer(ip: str) -> str:
    """grpcio's form of a peer address, as ``affinity.peer_host`` reads it."""
    return f"ipv6:[{ip}]:0" if ":" in ip else f"ipv4:{ip}:0"


def explain_json(method: str, route: str, cluster: Cluster, decision: Decision) -> dict[str, Any]:
    """``/explain``'s answer: the route, the cluster, the figures compared, the endpoint."""
    from lbgw.kernels import hash64  # noqa: PLC0415

    balancer = cluster.balancer
    keyed = decision.pinned or decision.hash_key is not None
    p2c = not keyed and balancer.draws_two()
    hashed = None
    if decision.hash_key is not None:
        hashed = {
            "key": decision.hash_key,
            "hash": f"{hash64(decision.hash_key.encode()):016x}",
            "position": decision.ring_position,
        }
    return {
        "method": method,
        "route": route,
        "cluster": cluster.name,
        "strategy": decision.strategy,
        "kernel": balancer.fallback,
        "candidates": [{"address": a, **scores} for a, scores in decision.candidates],
        "draw": [a for a, _ in decision.candidates] if p2c else None,
        "skipped": [{"address": a, "reason": why} for a, why in decision.skipped],
        "hash": hashed,
        "sticky_pin": decision.endpoint.address if decision.pinned else None,
        "fallback": decision.fallback,
        "endpoint": decision.endpoint.address,
    }


def _params(request: web.Request) -> dict[str, str]:
    return dict(request.query)


class _Counts:
    """One endpoint's per-second samples: (time, calls, busy ns), the last five minutes."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque(
            maxlen=HISTORY_SECONDS + 1
        )

    def since(self, seconds: int) -> tuple[int, int]:
        """Calls and busy ns over the last ``seconds`` samples."""
        s = self.samples
        if len(s) < 2:
            return 0, 0
        back = s[max(0, len(s) - 1 - seconds)]
        return s[-1][1] - back[1], s[-1][2] - back[2]

    def rates(self) -> list[float]:
        s = list(self.samples)
        return [(b[1] - a[1]) / max(b[0] - a[0], 1e-3) for a, b in itertools.pairwise(s)]


def _calls(e: Endpoint) -> int:
    return sum(e.codes.values())


class GatewayAdmin:
    """The admin port of one gateway process: each path's answer, from the gateway's state."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.started = time.time()
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._sampler: asyncio.Task[None] | None = None
        self._mirror: Mirror | None = None
        config = gateway.config
        self.collector = GatewayCollector(
            gateway,
            build_info(kernels.IMPLEMENTATION, self.event_loop()),
            per_endpoint=config.admin.per_endpoint_metrics,
        )
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)

    def __repr__(self) -> str:
        return f"<GatewayAdmin {len(self.gateway.clusters)} clusters sampled={len(self._counts)}>"

    @staticmethod
    def event_loop() -> str:
        loop = asyncio.get_running_loop()
        return f"{type(loop).__module__}.{type(loop).__name__}"

    # -- the per-second sampler: rates, shares, the status page's history ------------------

    def start(self, *, mirror: bool = False) -> None:
        """Sample every second; with ``mirror``, also write the multiprocess metrics."""
        if mirror:
            self._mirror = Mirror(self.collector)
        self.sample()
        self._sampler = asyncio.ensure_future(self._sample_forever())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._mirror is not None:
            self._mirror.sync()

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.sample()
            except Exception:  # a sampler must not die: the page would freeze
                log.exception("admin sampler failed")

    def sample(self) -> None:
        now = time.monotonic()
        live: set[tuple[str, str]] = set()
        for c in self.gateway.clusters.values():
            for e in c.endpoints:
                key = (c.name, e.address)
                live.add(key)
                counts = self._counts.get(key)
                if counts is None:
                    counts = self._counts[key] = _Counts()
                calls = _calls(e)
                if counts.samples and calls < counts.samples[-1][1]:
                    counts.samples.clear()  # a new Endpoint (its cluster rebuilt by a reload)
                counts.samples.append((now, calls, e.busy_ns))
        for gone in set(self._counts) - live:
            del self._counts[gone]
        if self._mirror is not None:
            self._mirror.sync()

    # -- what the paths answer ----------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Whether ``/ready`` says 200, and if not, why."""
        gateway = self.gateway
        why: list[str] = []
        if not gateway.serving:
            why.append("not listening")
        if not gateway.health.serving:
            why.append(
                "failed by hand (/healthcheck/fail)" if gateway.health.failed else "draining"
            )
        why += [f"cluster {c.name}: no endpoint in rotation" for c in gateway.clusters.values()
                if not c.health.serving]  # fmt: skip
        return not why, why

    def clusters(self, *, history: bool = False) -> list[dict[str, Any]]:
        """``/clusters``: per cluster, per endpoint, its state and what it is doing."""
        loop_now = asyncio.get_running_loop().time()
        out = []
        for c in self.gateway.clusters.values():
            kernel = c.balancer.kernel
            members = c.endpoints
            in_rotation = [e for e in members if kernel.is_eligible(e.index)]
            rotation_weight = sum(e.weight * e.share for e in in_rotation) or 1.0
            minute = {e.address: self._since(c.name, e, 60) for e in members}
            minute_calls = sum(n for n, _ in minute.values()) or 0
            endpoints = []
            for e in members:
                calls_1m, _ = minute[e.address]
                counts = self._counts.get((c.name, e.address))
                rates = counts.rates() if counts is not None else []
                ten, busy_10 = self._since(c.name, e, 10)
                cost = None
                if c.balancer.fallback == "ewma":
                    cost = round(kernel.cost(e.index, time.monotonic_ns()) / 1e6, 3)  # type: ignore[attr-defined]
                check = None
                if e.last_check is not None:
                    at, result, reason = e.last_check
                    check = {"result": result, "reason": reason, "age_s": round(loop_now - at, 1)}
                eligible = kernel.is_eligible(e.index)
                item: dict[str, Any] = {
                    "address": e.address,
                    "state": "drained" if e.drained else e.state.value,
                    "health": e.state.value,
                    "reason": "drained by hand (/endpoints/drain)" if e.drained else e.reason,
                    "in_rotation": eligible,
                    "weight": e.weight,
                    "effective_weight": round(e.weight * e.share, 3),
                    "in_flight": kernel.in_flight(e.index),
                    "ewma_cost_ms": cost,
                    "latency_ms": round(busy_10 / ten / 1e6, 3) if ten else None,
                    "calls_total": _calls(e),
                    "calls_per_second": round(rates[-1], 2) if rates else 0.0,
                    "calls_1m": calls_1m,
                    "share_1m": round(calls_1m / minute_calls, 4) if minute_calls else None,
                    "configured_share": round(e.weight * e.share / rotation_weight, 4)
                    if eligible
                    else 0.0,
                    "ejections": e.ejections_total,
                    "last_check": check,
                }
                if history:
                    item["history"] = [round(r, 2) for r in rates[-HISTORY_SECONDS:]]
                endpoints.append(item)
            out.append(
                {
                    "name": c.name,
                    "strategy": c.strategy,
                    "serving": c.health.serving,
                    "panic": c.health.panic,
                    "in_flight": c.budget.active,
                    "retries": c.retry_stats,
                    "endpoints": endpoints,
                }
            )
        return out

    def clusters_json(self, *, history: bool = False) -> dict[str, Any]:
        """``/clusters``: this process's view (``workers`` is the supervisor's)."""
        return {"clusters": self.clusters(history=history), "workers": None, "pid": os.getpid()}

    def config_json(self) -> dict[str, Any]:
        return config_json(self.gateway.config)

    def _since(self, cluster: str, e: Endpoint, seconds: int) -> tuple[int, int]:
        counts = self._counts.get((cluster, e.address))
        return (0, 0) if counts is None else counts.since(seconds)

    def server_info(self) -> dict[str, Any]:
        config = self.gateway.config
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "pids": [os.getpid()],
            "workers": config.workers,
            # The hash the log gives (reload.config_hash: of the file's bytes), when known.
            "config_hash": getattr(getattr(self.gateway, "reloader", None), "config_id", None)
            or config_hash(config),
            "config_source": config.source,
            "implementation": kernels.IMPLEMENTATION,
            "event_loop": self.event_loop(),
            "listeners": list(self.gateway.addresses),
            "certificates": self._certificates(),
        }

    def _certificates(self) -> list[dict[str, Any]]:
        """The TLS certificates in use: subject, SANs, expiry (issue 14)."""
        state = getattr(self.gateway, "tls", None)
        if state is None:
            return []
        from lbgw.tls import describe  # noqa: PLC0415 - cryptography only with TLS

        return describe(state.in_use())

    def explain(self, query: Mapping[str, str], metadata: list[tuple[str, str]]) -> tuple[int, Any]:
        """``/explain``: (status, JSON). Changes nothing: the kernels peek."""
        method = query.get("method", "")
        router = self.gateway.router
        if not method or router is None:
            return 400, {"error": "expected ?method=/package.Service/Method"}
        target = router.match(method)
        if target is None:
            return 404, {"error": f"no route for {method}", "method": method}
        cluster = target.cluster
        peer = _peer(query.get("peer", "127.0.0.1"))
        try:
            decision = cluster.decide(metadata, peer, method, explain=True, dry_run=True)
        except NoEligibleEndpointError as exc:
            return 503, {
                "method": method,
                "route": target.route,
                "cluster": cluster.name,
                "error": str(exc),
                "skipped": [{"address": a, "reason": why} for a, why in exc.skipped],
                "endpoint": None,
                "pid": os.getpid(),
            }
        return 200, {**explain_json(method, target.route, cluster, decision), "pid": os.getpid()}

    async def act(self, path: str, query: Mapping[str, str]) -> tuple[int, Any]:
        """Run a POST action: (status, JSON)."""
        gateway = self.gateway
        if path in ("/healthcheck/fail", "/healthcheck/ok"):
            gateway.health.fail(path.endswith("fail"))
            return 200, {"health": "NOT_SERVING" if gateway.health.failed else "SERVING"}
        if path in ("/endpoints/drain", "/endpoints/undrain"):
            name, address = query.get("cluster", ""), query.get("address", "")
            if not name or not address:
                return 400, {"error": "expected ?cluster=NAME&address=HOST:PORT"}
            cluster = gateway.clusters.get(name)
            if cluster is None:
                return 404, {"error": f"no cluster {name!r}", "clusters": sorted(gateway.clusters)}
            found = [e for e in cluster.endpoints if e.address == address]
            if not found:
                return 404, {"error": f"no endpoint {address!r} in cluster {name!r}"}
            cluster.health.set_drained(found[0], path.endswith("/drain"))
            e = found[0]
            return 200, {
                "cluster": name,
                "address": address,
                "drained": e.drained,
                "in_rotation": cluster.balancer.is_eligible(e.index),
                "in_flight": cluster.balancer.kernel.in_flight(e.index),
            }
        if path == "/logging":
            level = query.get("level", "")
            if level not in _LOG_LEVELS:
                return 400, {"error": f"expected ?level= one of {', '.join(_LOG_LEVELS)}"}
            logging.getLogger().setLevel(level.upper())
            return 200, {"level": level}
        action = ACTIONS.get(path)
        if action is None:
            return 404, {"error": f"no action {path}"}
        return 200, dict(await action(query))

    def metrics(self) -> bytes:
        return generate_latest(self.registry)


def _json(status: int, data: Any) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, indent=1))


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    pairs = []
    for item in request.query.getall("metadata", []):
        key, _, value = item.partition(":")
        pairs.append((key.strip().lower(), value.strip()))
    return pairs


POST_PATHS: Final = (
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/endpoints/drain",
    "/endpoints/undrain",
    "/logging",
)


def page() -> str:
    """The status page: one self-contained HTML file shipped in the package."""
    return resources.files("lbgw").joinpath(_PAGE).read_text(encoding="utf-8")


def build_app(admin: Any) -> web.Application:
    """The routes, over ``admin`` (a ``GatewayAdmin`` or the supervisor's ``FleetAdmin``).

    ``admin`` answers: ``ready()``, ``clusters_json(history=)``,
    ``config_json()``, ``server_info()``, ``explain(query, metadata)``,
    ``act(path, query)``, ``metrics()``; each may be a coroutine function.
    The POST paths are the built-in ones and those registered
    (``register_action``) by the time the app is built.
    """
    app = web.Application()

    async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page(), content_type="text/html", charset="utf-8")

    async def live(request: web.Request) -> web.Response:
        return _json(200, {"live": True})

    async def ready(request: web.Request) -> web.Response:
        ok, why = await call(admin.ready)
        return _json(200 if ok else 503, {"ready": ok, "why": why})

    async def metrics(request: web.Request) -> web.Response:
        body = await call(admin.metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def clusters(request: web.Request) -> web.Response:
        history = request.query.get("history", "") not in ("", "0")
        return _json(200, await call(admin.clusters_json, history=history))

    async def config(request: web.Request) -> web.Response:
        return _json(200, await call(admin.config_json))

    async def server_info(request: web.Request) -> web.Response:
        return _json(200, await call(admin.server_info))

    async def explain(request: web.Request) -> web.Response:
        status, data = await call(admin.explain, _params(request), _metadata(request))
        return _json(status, data)

    async def act(request: web.Request) -> web.Response:
        query = _params(request)
        log.info(
            "admin action",
            extra=fields(action=request.path, params=query, remote=request.remote),
        )
        status, data = await call(admin.act, request.path, query)
        if status >= 400:
            log.warning(
                "admin action refused", extra=fields(action=request.path, status=status, **data)
            )
        return _json(status, data)

    app.router.add_get("/", index)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/clusters", clusters)
    app.router.add_get("/config", config)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/explain", explain)
    for path in (*POST_PATHS, *sorted(ACTIONS)):
        app.router.add_post(path, act)
    return app


class AdminServer:
    """An aiohttp server for an admin app, on host:port or a Unix socket (a worker's)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._runner: web.AppRunner | None = None
        self.address = ""

    def __repr__(self) -> str:
        return f"<AdminServer {self.address or 'stopped'}>"

    @property
    def url(self) -> str:
        return f"http://{self.address}/"

    async def start(self, address: str = "", *, path: str = "") -> None:
        """Listen on ``address`` (host:port, port 0 for any) or the Unix socket ``path``."""
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        site: web.BaseSite
        if path:
            with contextlib.suppress(FileNotFoundError):  # a previous worker's
                os.unlink(path)
            site = web.UnixSite(runner, path)
            await site.start()
            self.address = f"unix:{path}"
            return
        host, port = parse_address(address)
        bare = host.removeprefix("[").removesuffix("]")
        site = web.TCPSite(runner, bare, port, reuse_address=True)
        await site.start()
        server = site._server  # the bound port, for port 0
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        self.address = f"{host}:{bound}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def start_gateway_admin(
    gateway: Gateway, *, path: str = ""
) -> tuple[GatewayAdmin, AdminServer]:
    """The gateway's admin port, started on ``[admin] address`` or a worker's socket ``path``."""
    admin = GatewayAdmin(gateway)
    app = build_app(admin)
    server = AdminServer(app)
    address = gateway.config.admin.address or ""
    try:
        await server.start(address, path=path)
    except OSError as exc:
        await server.stop()
        raise StartError(f"cannot serve the admin port on {address or path}: {exc}") from exc
    admin.start(mirror=bool(path))
    log.info("admin listening", extra=fields(address=server.address, url=server.url))
    return admin, server


# -- `lbgw explain`: the same answer, as a table ------------------------------------------------


def explain_table(data: Mapping[str, Any]) -> str:
    """``/explain``'s JSON as the readable table ``lbgw explain`` prints."""
    lines = [
        f"method    {data.get('method', '')}",
        f"route     {data.get('route', '')}  ->  cluster {data.get('cluster', '')}",
    ]
    if "error" in data:
        lines.append(f"error     {data['error']}")
    else:
        strategy = data.get("strategy", "")
        kernel = data.get("kernel", strategy)
        by = f" (without a key: {kernel})" if kernel != strategy else ""
        lines.append(f"strategy  {strategy}{by}")
        hashed = data.get("hash")
        if hashed:
            lines.append(
                f"hash      key {hashed['key']!r}  hash {hashed['hash']}  "
                f"position {hashed['position']}"
            )
        if data.get("sticky_pin"):
            lines.append(f"sticky    pinned to {data['sticky_pin']}")
        if data.get("fallback"):
            lines.append(f"fallback  {data['fallback']}")
        if data.get("draw"):
            lines.append(f"draw      {' vs '.join(data['draw'])} (power of two choices)")
    candidates = list(data.get("candidates") or [])
    if candidates:
        keys = [k for k in candidates[0] if k != "address"]
        width = max(len("candidate"), *(len(c["address"]) for c in candidates))
        lines.append("")
        lines.append("  ".join(["candidate".ljust(width), *(k.rjust(14) for k in keys)]))
        for c in candidates:
            mark = " *" if c["address"] == data.get("endpoint") else ""
            cells = [c["address"].ljust(width), *(str(c.get(k, "")).rjust(14) for k in keys)]
            lines.append("  ".join(cells) + mark)
    skipped = list(data.get("skipped") or [])
    if skipped:
        lines.append("")
        lines += [f"skipped   {s['address']}: {s['reason']}" for s in skipped]
    lines.append("")
    lines.append(f"endpoint  {data.get('endpoint') or '(none: no endpoint in rotation)'}")
    return "\n".join(lines)


async def explain_command(
    admin: str, method: str, headers: list[str], peer: str | None, timeout: float = 5.0
) -> int:
    """``lbgw explain``: ask the admin port at ``admin`` and print the table. Exit status."""
    import aiohttp  # noqa: PLC0415

    query: list[tuple[str, str]] = [("method", method)]
    query += [("metadata", h) for h in headers]
    if peer:
        query.append(("peer", peer))
    url = f"http://{admin}/explain"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, params=query) as response,
        ):
            data = await response.json()
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        print(f"lbgw explain: cannot ask {url}: {exc or type(exc).__name__}")
        return 1
    print(explain_table(data))
    return 0 if status == 200 else 1
