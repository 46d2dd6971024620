"""The admin port of a gateway run with ``--workers N``: one address for all the workers.

The supervisor has no event loop of its own and no clusters; its workers
have both. So each worker serves its own admin app (``admin.py``) on a Unix
socket in a private directory, and the supervisor serves the one admin
address, in a thread with its own event loop, answering from the workers:

* ``/metrics``: prometheus_client's multiprocess mode. Each worker mirrors
  its metrics into files under ``PROMETHEUS_MULTIPROC_DIR`` once a second
  (``metrics.Mirror``); ``MultiProcessCollector`` sums them, the files of
  workers that have exited included, so counters never go back. Gauges
  combine as ``metrics.MULTIPROCESS_MODES`` says. The process metrics are
  the supervisor's own.
* ``/clusters``: every worker's view, and the merged one (``clusters``).
* ``/ready``: 200 when every worker is ready.
* a POST action goes to every worker, and the answer lists each one's
  (but for the actions registered in this process, ``admin.register_action``,
  such as ``/reload``, which run here).
* ``/explain`` asks one worker: each worker picks on its own.

The supervisor's side is three calls (``supervisor.py``)::

    fleet = Fleet(config)            # before the workers start
    env.update(fleet.worker_env(n))  # each worker's environment
    fleet.start()                    # the admin address; raises StartError
    ...
    fleet.worker_exited(pid)         # a worker is gone (its live gauges go)
    fleet.stop()                     # at the end

and the worker's, one: ``worker_socket()`` gives the socket path that
``Gateway(admin_socket=...)`` serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.process_collector import ProcessCollector

from lbgw import __version__
from lbgw.admin import ACTIONS, AdminServer, build_app, config_hash, config_json
from lbgw.config import Config
from lbgw.exceptions import StartError

__all__ = ["SOCKET_ENV", "Fleet", "merge_clusters", "worker_socket"]

#: Where a worker serves its admin app: set by the supervisor in its environment.
SOCKET_ENV: Final = "LBGW_ADMIN_SOCKET"
_MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_TIMEOUT: Final = 5.0


def worker_socket() -> str:
    """The Unix socket this worker's admin app listens on ("" when not a fleet's worker)."""
    return os.environ.get(SOCKET_ENV, "")


def merge_clusters(views: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The workers' ``/clusters`` views as one: counts and rates summed, states by majority."""
    merged: dict[str, dict[str, Any]] = {}
    for view in views:
        for c in view:
            into = merged.get(c["name"])
            if into is None:
                merged[c["name"]] = into = {**c, "endpoints": [], "in_flight": 0, "_eps": {}}
                into["retries"] = dict.fromkeys(c["retries"], 0)
                into["serving"] = False
            into["in_flight"] += c["in_flight"]
            into["serving"] = into["serving"] or c["serving"]
            for k, v in c["retries"].items():
                into["retries"][k] = into["retries"].get(k, 0) + v
            for e in c["endpoints"]:
                into["_eps"].setdefault(e["address"], []).append(e)
    out = []
    for c in merged.values():
        endpoints = []
        for address, seen in c.pop("_eps").items():
            states = Counter(e["state"] for e in seen)
            first = seen[0]
            e = {**first, "state": states.most_common(1)[0][0]}
            e["states"] = dict(states)
            for key in ("in_flight", "calls_total", "calls_per_second", "calls_1m", "ejections"):
                e[key] = sum(x.get(key) or 0 for x in seen)
            latencies = [x["latency_ms"] for x in seen if x.get("latency_ms") is not None]
            e["latency_ms"] = round(sum(latencies) / len(latencies), 3) if latencies else None
            if any("history" in x for x in seen):
                length = max(len(x.get("history", [])) for x in seen)
                total = [0.0] * length
                for x in seen:  # aligned on the latest second
                    h = x.get("history", [])
                    for i, v in enumerate(h):
                        total[length - len(h) + i] += v
                e["history"] = [round(v, 2) for v in total]
            e["address"] = address
            endpoints.append(e)
        minute = sum(e["calls_1m"] for e in endpoints)
        for e in endpoints:
            e["share_1m"] = round(e["calls_1m"] / minute, 4) if minute else None
        c["endpoints"] = endpoints
        out.append(c)
    return out


class _FleetAnswers:
    """``admin.build_app``'s view of the workers, asked over their sockets."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def _ask(
        self, path: str, method: str = "GET", params: Any = None
    ) -> list[tuple[str, int, Any]]:
        """(socket, status, JSON) of every worker that answers, in worker order."""

        async def one(sock: str) -> tuple[str, int, Any] | None:
            connector = aiohttp.UnixConnector(path=sock)
            timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.request(method, f"http://worker{path}", params=params) as response,
                ):
                    return sock, response.status, await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
                return None

        answers = await asyncio.gather(*(one(s) for s in self._fleet.sockets()))
        return [a for a in answers if a is not None]

    async def ready(self) -> tuple[bool, list[str]]:
        answers = await self._ask("/ready")
        why = [f"worker {data.get('pid', sock)}: {w}" for sock, _, data in answers
               for w in data.get("why", [])]  # fmt: skip
        expected = self._fleet.config.workers
        if len(answers) < expected:
            why.append(f"{expected - len(answers)} of {expected} workers not answering")
        return not why, why

    async def clusters_json(self, *, history: bool = False) -> dict[str, Any]:
        answers = await self._ask("/clusters", params={"history": "1"} if history else None)
        workers = [{"pid": data.get("pid"), "clusters": data["clusters"]} for _, _, data in answers]
        return {
            "clusters": merge_clusters([w["clusters"] for w in workers]),
            "workers": workers,
            "pid": os.getpid(),
        }

    def config_json(self) -> dict[str, Any]:
        return config_json(self._fleet.config)

    async def server_info(self) -> dict[str, Any]:
        answers = await self._ask("/server_info")
        workers = [data for _, _, data in answers]
        config = self._fleet.config
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self._fleet.started, 1),
            "pid": os.getpid(),
            "pids": [os.getpid(), *(w.get("pid") for w in workers)],
            "workers": config.workers,
            "config_hash": self._fleet.config_id,
            "config_source": config.source,
            "certificates": workers[0].get("certificates", []) if workers else [],
            "implementation": workers[0].get("implementation") if workers else None,
            "event_loop": workers[0].get("event_loop") if workers else None,
            "worker_info": workers,
        }

    async def explain(
        self, query: Mapping[str, str], metadata: list[tuple[str, str]]
    ) -> tuple[int, Any]:
        params = [(k, v) for k, v in query.items() if k != "metadata"]
        params += [("metadata", f"{k}:{v}") for k, v in metadata]
        for _, status, data in (await self._ask("/explain", params=params))[:1]:
            return status, {**data, "worker": data.get("pid")}
        return 503, {"error": "no worker answers"}

    async def act(self, path: str, query: Mapping[str, str]) -> tuple[int, Any]:
        action = ACTIONS.get(path)
        if action is not None:  # the supervisor's own (such as /reload)
            return 200, dict(await action(query))
        answers = await self._ask(path, "POST", params=dict(query))
        if not answers:
            return 503, {"error": "no worker answers"}
        status = max(s for _, s, _ in answers)
        return status, {"workers": [{"status": s, **data} for _, s, data in answers]}

    def metrics(self) -> bytes:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self._fleet.metrics_dir)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=registry)
        return generate_latest(registry)


class Fleet:
    """The supervisor's admin port over its workers (see the module's docstring)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: The hash the log gives for the config in force (``reload.config_hash``).
        self.config_id = config_hash(config)
        self.started = time.time()
        self.dir = tempfile.mkdtemp(prefix="lbgw-admin-")
        self.metrics_dir = os.path.join(self.dir, "metrics")
        os.mkdir(self.metrics_dir)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.server: AdminServer | None = None

    def __repr__(self) -> str:
        where = self.server.address if self.server is not None else "stopped"
        return f"<Fleet admin {where} workers={len(self.sockets())}>"

    def worker_env(self, n: int) -> dict[str, str]:
        """Worker ``n``'s environment: its admin socket and the multiprocess directory."""
        return {
            SOCKET_ENV: os.path.join(self.dir, f"worker-{n}.sock"),
            _MULTIPROC_ENV: self.metrics_dir,
        }

    def sockets(self) -> list[str]:
        return sorted(
            glob.glob(os.path.join(self.dir, "worker-*.sock")),
            key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]),
        )

    def start(self) -> str:
        """Serve the admin address in a thread of its own; its address. Raises StartError."""
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = AdminServer(build_app(_FleetAnswers(self)))
            try:
                await server.start(self.config.admin.address or "")
            except OSError as exc:
                failure.append(exc)
                started.set()
                await server.stop()
                return
            self.server = server
            started.set()
            await self._stop.wait()
            await server.stop()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="lbgw-admin", daemon=True
        )
        self._thread.start()
        started.wait(30)
        if failure or self.server is None:
            self.stop()
            why = failure[0] if failure else "timed out"
            raise StartError(f"cannot serve the admin port on {self.config.admin.address}: {why}")
        return self.server.address

    def worker_exited(self, pid: int) -> None:
        """A worker has exited: its live gauges no longer count (its counters still do)."""
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(10)
        self._thread = None
        shutil.rmtree(self.dir, ignore_errors=True)
