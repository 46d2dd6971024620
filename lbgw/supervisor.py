"""``serve --workers N``: the supervisor process, its workers, their restarts and reloads.

N worker processes (``python -m lbgw serve ...`` again, told their role by
the environment) share the listening ports with ``SO_REUSEPORT``; the kernel
spreads new connections over them. A port 0 is resolved, and an unset
sticky secret made, once for all of them. The supervisor serves nothing
itself. What it does:

* **A worker that dies is restarted**, with backoff (0.1 s, doubling with
  each recent death, at most 5 s), while the others keep serving. Only a
  crash loop stops the gateway: ``CRASH_LOOP_DEATHS`` deaths within
  ``CRASH_LOOP_WINDOW`` seconds (5 in 30 s; systemd's default start limit
  is 5 in 10 s, and a worker takes about a second to start, so the window
  is wider), after which every worker is stopped and the supervisor exits 1
  for the service manager to restart the whole gateway.
* **SIGHUP reloads.** The supervisor reads and validates the config once;
  an invalid one is logged (file, key, expectation) and changes nothing.
  A valid one is written to a snapshot file that every worker reads (with
  the listeners' addresses, port 0 resolved once, in a file beside it), so
  all of them run the same bytes; each worker logs the config's hash
  (``config``) and applies the diff in place (``reload.Reloader``): new
  listeners get a server of their own in every worker (the port shared with
  ``SO_REUSEPORT``), removed ones stop, the others are never touched. A
  change in the number of workers starts the new ones, or stops (drains)
  the ones past the new number.

  Why not NGINX's way (a new generation of workers, then the old one
  drains): stopping a grpc server fails the calls it has received on its
  connections but not yet handed to the application, so the old
  generation's drain lost calls under load (18, CANCELLED, at the two
  listener changes of one run of the reload test); a server whose port
  stays is never stopped here.
* **SIGTERM or SIGINT** is passed to every worker; the supervisor exits 0
  once all have drained, killing one still running ``grace_period`` + 10 s
  later.

* **The admin port** (``[admin] address``, ``--admin``) is the
  supervisor's: one address for the whole gateway (``admin_fleet.Fleet``,
  in a thread of its own), answering from the workers' own admin apps on
  Unix sockets. ``POST /reload`` there is a SIGHUP to the supervisor, and
  answers once the new config is validated and sent to the workers.

The structure: ``Supervisor._spawn`` makes one worker (its environment is
built in ``_env``), ``_tick`` looks after them once, ``_reload`` handles a
SIGHUP or a ``POST /reload``, ``_resize`` follows a new number of workers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from lbgw.config import STICKY_SECRET_ENV, Config, parse_address
from lbgw.exceptions import ConfigError
from lbgw.logs import fields
from lbgw.reload import plan

if TYPE_CHECKING:
    from lbgw.admin_fleet import Fleet

__all__ = [
    "CRASH_LOOP_DEATHS",
    "CRASH_LOOP_WINDOW",
    "WORKER_CONFIG_ENV",
    "WORKER_ENV",
    "WORKER_LISTENERS_ENV",
    "WORKER_PARENT_ENV",
    "WORKER_READY_ENV",
    "Supervisor",
]

log = logging.getLogger("lbgw.supervisor")

# A worker process learns its role, its (already resolved) listeners and more here.
WORKER_ENV: Final = "LBGW_WORKER"
#: A file with the listeners' addresses (port 0 resolved), comma-separated.
WORKER_LISTENERS_ENV: Final = "LBGW_WORKER_LISTENERS_FILE"
WORKER_PARENT_ENV: Final = "LBGW_WORKER_PARENT"
#: The snapshot of the config file the supervisor validated (absent in the quick form).
WORKER_CONFIG_ENV: Final = "LBGW_WORKER_CONFIG"
#: A pipe's write end: a worker writes its PID there once it serves.
WORKER_READY_ENV: Final = "LBGW_WORKER_READY_FD"

CRASH_LOOP_DEATHS: Final = 5
CRASH_LOOP_WINDOW: Final = 30.0
RESTART_BACKOFF: Final = (0.1, 5.0)  # first delay, largest

#: Reads and validates the config: (config, its hash, the file's bytes or None).
Loader = Callable[[], tuple[Config, str, bytes | None]]


@dataclass(eq=False)
class Worker:
    slot: int
    process: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    #: A reload came before it served: SIGHUP it once it does (until then, SIGHUP's
    #: default action, before lbgw takes the signal over, would kill it).
    reload_pending: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


def reserve_ports(
    config: Config, held: dict[str, tuple[str, socket.socket | None]]
) -> dict[str, tuple[str, socket.socket | None]]:
    """Each listener's address with port 0 resolved once for every worker alike.

    A port 0 is resolved by binding (not listening) with SO_REUSEPORT, and
    that socket is held while the listener exists; ``held``: the listeners
    resolved before (kept as they are).
    """
    out: dict[str, tuple[str, socket.socket | None]] = {}
    for listener in config.listeners:
        if listener.address in held:
            out[listener.address] = held[listener.address]
            continue
        host, port = parse_address(listener.address)
        holder = None
        if port == 0:
            bare = host.strip("[]")
            family = socket.AF_INET6 if ":" in bare else socket.AF_INET
            holder = socket.socket(family, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            holder.bind((bare, 0))
            port = holder.getsockname()[1]
        out[listener.address] = (f"{host}:{port}", holder)
    return out


class Supervisor:
    """Runs and looks after the workers (see the module docstring)."""

    def __init__(  # noqa: PLR0913 - the config, as read, and how to read it again
        self,
        config: Config,
        argv: Sequence[str],
        load: Loader,
        *,
        config_id: str,
        data: bytes | None,
        stop_early: bool = False,
    ) -> None:
        self._argv = list(argv)
        self._load = load
        self.config = config
        self.config_id = config_id
        self.stopping = stop_early
        self._reload_asked = False
        self.deaths: collections.deque[float] = collections.deque()
        self.workers: list[Worker] = []
        self.retiring: list[tuple[Worker, float]] = []  # stopped by a reload, draining; deadline
        self._restarts: list[tuple[float, int]] = []  # (when, slot) of dead workers
        self._files = tempfile.TemporaryDirectory(prefix="lbgw-")
        self._snapshot: str | None = None
        self._listeners_file = os.path.join(self._files.name, "listeners")
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._ready_buf = b""
        self._secret = os.environ.get(STICKY_SECRET_ENV) or secrets.token_urlsafe(32)
        self._held = reserve_ports(config, {})
        self._write(data)
        #: The admin port over the workers (``[admin] address``); None without one.
        self.fleet: Fleet | None = None
        # POST /reload on the admin port: futures the run loop answers (``_reload``).
        self._asked: queue.SimpleQueue[concurrent.futures.Future[dict[str, Any]]] = (
            queue.SimpleQueue()
        )

    def __repr__(self) -> str:
        return (
            f"<Supervisor config={self.config_id} workers={len(self.workers)} "
            f"retiring={len(self.retiring)} deaths={len(self.deaths)}>"
        )

    @property
    def addresses(self) -> list[str]:
        return [address for address, _ in self._held.values()]

    # -- signals ----------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload_asked = True

    # -- the workers ------------------------------------------------------------------------

    def _write(self, data: bytes | None) -> None:
        """The snapshot and the listeners file, each written whole, then renamed."""
        files = [(self._listeners_file, ",".join(self.addresses).encode())]
        if data is not None:
            self._snapshot = os.path.join(self._files.name, "config.toml")
            files.append((self._snapshot, data))
        for path, content in files:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(content)
            os.replace(tmp, path)

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_LISTENERS_ENV] = self._listeners_file
        # One secret for all the workers, so that each honours the others' tokens.
        env[STICKY_SECRET_ENV] = self._secret
        env[WORKER_PARENT_ENV] = str(os.getpid())
        env[WORKER_ENV] = str(slot)
        env[WORKER_READY_ENV] = str(self._ready_w)
        if self.fleet is not None:  # the worker's admin socket and the metrics directory
            env.update(self.fleet.worker_env(slot))
        if self._snapshot is not None:
            env[WORKER_CONFIG_ENV] = self._snapshot
        return env

    def _spawn(self, slot: int) -> Worker:
        process = subprocess.Popen(
            [sys.executable, "-m", "lbgw", *self._argv],
            env=self._env(slot),
            pass_fds=(self._ready_w,),
        )
        worker = Worker(slot, process, time.monotonic())
        log.info("worker started", extra=fields(pid=worker.pid, slot=slot, config=self.config_id))
        return worker

    def _read_ready(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._ready_r, 4096):
                self._ready_buf += chunk
        *lines, self._ready_buf = self._ready_buf.split(b"\n")
        ready = {int(line) for line in lines if line.strip().isdigit()}
        for w in self.workers:
            if w.pid in ready:
                w.ready = True
            if w.ready and w.reload_pending:
                w.reload_pending = False
                self._hup(w)

    def _hup(self, w: Worker) -> None:
        if not w.ready:
            w.reload_pending = True
            return
        with contextlib.suppress(ProcessLookupError):
            w.process.send_signal(signal.SIGHUP)

    def _backoff(self) -> float:
        first, largest = RESTART_BACKOFF
        return min(largest, first * (1 << min(max(0, len(self.deaths) - 1), 16)))

    def _tick(self) -> int | None:
        """Look after the workers once; an exit status when the gateway must stop."""
        now = time.monotonic()
        self._read_ready()
        for w in list(self.workers):
            code = w.process.poll()
            if code is None:
                continue
            self.workers.remove(w)
            self._gone(w)
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - CRASH_LOOP_WINDOW:
                self.deaths.popleft()
            if len(self.deaths) >= CRASH_LOOP_DEATHS:
                log.error(
                    "workers crash-looping: stopping the gateway",
                    extra=fields(
                        pid=w.pid, code=code, deaths=len(self.deaths), window=CRASH_LOOP_WINDOW
                    ),
                )
                return 1
            delay = self._backoff()
            log.error(
                "worker died; restarting it",
                extra=fields(pid=w.pid, code=code, slot=w.slot, restart_in=delay),
            )
            self._restarts.append((now + delay, w.slot))
        for when, slot in list(self._restarts):
            if when <= now:
                self._restarts.remove((when, slot))
                self.workers.append(self._spawn(slot))
        for w, deadline in list(self.retiring):
            if w.process.poll() is not None:
                self.retiring.remove((w, deadline))
                self._gone(w)
                log.info("old worker exited", extra=fields(pid=w.pid, code=w.process.returncode))
            elif now > deadline:
                log.error("old worker did not stop; killing it", extra=fields(pid=w.pid))
                w.process.kill()
        return None

    # -- reloads ----------------------------------------------------------------------------

    def _gone(self, w: Worker) -> None:
        if self.fleet is not None:  # its live gauges no longer count; its counters do
            self.fleet.worker_exited(w.pid)

    def _reload(self) -> dict[str, Any]:
        """Validate the config once, write it for the workers and SIGHUP them; the outcome.

        The answer (``POST /reload``'s) says whether the config was taken;
        each worker then applies it and logs ``reloaded`` with its hash.
        """
        try:
            config, config_id, data = self._load()
            # Every TLS file, as at start: a worker (re)started on a bad one would exit 2.
            from lbgw.tls import check_config  # noqa: PLC0415 - cryptography only here

            check_config(config)
        except ConfigError as exc:
            log.error(
                "reload refused: config invalid, still running the old one",
                extra=fields(source=exc.source, key=exc.key, error=str(exc), config=self.config_id),
            )
            return {"ok": False, "config": self.config_id, "error": str(exc)}
        change = plan(self.config, config)
        try:
            held = reserve_ports(config, self._held)
        except OSError as exc:
            log.error("reload failed: cannot reserve a port", extra=fields(error=str(exc)))
            return {"ok": False, "config": self.config_id, "error": str(exc)}
        for listener, (_, holder) in self._held.items():
            if listener not in held and holder is not None:
                holder.close()
        self._held = held
        old_grace = self.config.grace_period
        self.config, self.config_id = config, config_id
        self._write(data)
        log.info(
            "reload", extra=fields(config=config_id, addresses=self.addresses, **change.summary())
        )
        if self.fleet is not None:
            self.fleet.config, self.fleet.config_id = config, config_id
        for w in self.workers:
            self._hup(w)
        if change.workers:
            self._resize(config.workers, old_grace)
        return {
            "ok": True,
            "config": config_id,
            "error": None,
            "plan": change.summary(),
            "workers": [w.pid for w in self.workers],
        }

    def _start_fleet(self) -> Fleet:
        """The admin port over the workers, with ``POST /reload`` answered by the run loop."""
        from lbgw.admin import register_action  # noqa: PLC0415 - aiohttp only when asked
        from lbgw.admin_fleet import Fleet  # noqa: PLC0415

        async def reload_action(query: Any) -> dict[str, Any]:
            if self.stopping:
                return {"ok": False, "config": self.config_id, "error": "stopping"}
            future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
            self._asked.put(future)
            return await asyncio.wrap_future(future)

        register_action("/reload", reload_action)
        fleet = Fleet(self.config)
        fleet.config_id = self.config_id
        address = fleet.start()  # raises StartError
        log.info("admin listening", extra=fields(address=address, url=f"http://{address}/"))
        return fleet

    def _answer_reloads(self, *, refuse: bool = False) -> None:
        """Answer each ``POST /reload`` asked since the last look (``refuse``: stopping)."""
        while True:
            try:
                future = self._asked.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            if refuse:
                future.set_result({"ok": False, "config": self.config_id, "error": "stopping"})
                continue
            log.info("POST /reload: reloading", extra=fields(config=self.config_id))
            try:
                future.set_result(self._reload())
            except Exception as exc:  # a snapshot that cannot be written, say: keep running
                log.exception("reload failed", extra=fields(config=self.config_id))
                future.set_result({"ok": False, "config": self.config_id, "error": str(exc)})

    def _resize(self, n: int, grace: float) -> None:
        """Start workers up to ``n``, or stop (drain) those past it."""
        slots = {w.slot for w in self.workers} | {slot for _, slot in self._restarts}
        for slot in range(n):
            if slot not in slots:
                self.workers.append(self._spawn(slot))
        self._restarts = [(when, slot) for when, slot in self._restarts if slot < n]
        deadline = time.monotonic() + grace + 10.0
        for w in [w for w in self.workers if w.slot >= n]:
            self.workers.remove(w)
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)
            self.retiring.append((w, deadline))
        log.info("workers", extra=fields(pids=[w.pid for w in self.workers], workers=n))

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        if self.config.admin.address is not None:
            self.fleet = self._start_fleet()
        self.workers = [self._spawn(n) for n in range(self.config.workers)]
        log.info(
            "workers",
            extra=fields(
                pids=[w.pid for w in self.workers],
                addresses=self.addresses,
                config=self.config_id,
            ),
        )
        status = 0
        try:
            while not self.stopping:
                if self._reload_asked:
                    self._reload_asked = False
                    self._reload()
                self._answer_reloads()
                failed = self._tick()
                if failed is not None:
                    status = failed
                    break
                with contextlib.suppress(InterruptedError):
                    select.select([self._ready_r], [], [], 0.1)
        finally:
            status = self._stop_all(status)
        log.info("stopped", extra=fields(code=status))
        return status

    def _stop_all(self, status: int) -> int:
        self.stopping = True  # POST /reload from now on: refused at once
        self._answer_reloads(refuse=True)
        everyone = self.workers + [w for w, _ in self.retiring]
        for w in everyone:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_period + 10.0
        for w in everyone:
            try:
                code = w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop; killing it", extra=fields(pid=w.pid))
                w.process.kill()
                code = w.process.wait()
            # A worker stopped by SIGTERM before it could take the signal over
            # was not serving yet: that is a clean stop too.
            if code not in (0, -signal.SIGTERM):
                status = 1
            self._gone(w)
        if self.fleet is not None:
            self._answer_reloads(refuse=True)  # any that came during the drain
            self.fleet.stop()
        for _, holder in self._held.values():
            if holder is not None:
                holder.close()
        os.close(self._ready_r)
        os.close(self._ready_w)
        self._files.cleanup()
        return status
