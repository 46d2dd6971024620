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
  A valid one is written to a snapshot file that every worker reads, so
  all of them run the same bytes; each logs the config's hash
  (``config``). If only clusters, routes or the log level changed, each
  worker gets SIGHUP and applies the diff in place (``reload.Reloader``).
  If the listeners, the limits or the number of workers changed, it is done
  the NGINX way: a new generation of workers starts with the new config on
  the (shared) ports, and once every one of them serves, the old
  generation gets SIGTERM and drains. A new generation that fails to come
  up is stopped, and the old one keeps serving.
* **SIGTERM or SIGINT** is passed to every worker; the supervisor exits 0
  once all have drained, killing one still running ``grace_period`` + 10 s
  later.

The structure, for a later hook (one admin address shared by the workers,
say): ``Supervisor._spawn`` makes one worker (its environment is built in
``_env``), ``_tick`` looks after them once, ``_reload`` handles a SIGHUP.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from lbgw.config import STICKY_SECRET_ENV, Config, parse_address
from lbgw.exceptions import ConfigError
from lbgw.logs import fields
from lbgw.reload import plan

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
WORKER_LISTENERS_ENV: Final = "LBGW_WORKER_LISTENERS"
WORKER_PARENT_ENV: Final = "LBGW_WORKER_PARENT"
#: The snapshot of the config file the supervisor validated (absent in the quick form).
WORKER_CONFIG_ENV: Final = "LBGW_WORKER_CONFIG"
#: A pipe's write end: a worker writes its PID there once it serves.
WORKER_READY_ENV: Final = "LBGW_WORKER_READY_FD"

CRASH_LOOP_DEATHS: Final = 5
CRASH_LOOP_WINDOW: Final = 30.0
RESTART_BACKOFF: Final = (0.1, 5.0)  # first delay, largest
#: How long a new generation has to serve before a reload gives up on it.
START_TIMEOUT: Final = 30.0

#: Reads and validates the config: (config, its hash, the file's bytes or None).
Loader = Callable[[], tuple[Config, str, bytes | None]]


@dataclass(eq=False)
class Worker:
    slot: int
    generation: int
    process: subprocess.Popen[bytes]
    started: float
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Generation:
    """The workers that run one config on one set of listeners."""

    number: int
    config: Config
    config_id: str
    addresses: list[str]
    holders: list[socket.socket] = field(default_factory=list)
    #: The validated config file's bytes, which this generation's workers read.
    snapshot: str | None = None


def reserve_ports(
    config: Config, known: dict[str, str] | None = None
) -> tuple[list[str], list[socket.socket]]:
    """Resolve port 0 once for every worker alike: bind (not listen) with SO_REUSEPORT.

    ``known``: listener addresses already resolved (by the generation before).
    """
    addresses: list[str] = []
    holders: list[socket.socket] = []
    for listener in config.listeners:
        if known and listener.address in known:
            addresses.append(known[listener.address])
            continue
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
        self.stopping = stop_early
        self._reload_asked = False
        self.deaths: collections.deque[float] = collections.deque()
        self.workers: list[Worker] = []
        self.retiring: list[tuple[Worker, float]] = []  # old generation, draining; deadline
        self._restarts: list[tuple[float, int]] = []  # (when, slot) of dead workers
        self._snapshots = tempfile.TemporaryDirectory(prefix="lbgw-")
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self._ready_buf = b""
        self._secret = os.environ.get(STICKY_SECRET_ENV) or secrets.token_urlsafe(32)
        addresses, holders = reserve_ports(config)
        snapshot = self._write_snapshot(0, data)
        self.generation = Generation(0, config, config_id, addresses, holders, snapshot)

    def __repr__(self) -> str:
        return (
            f"<Supervisor generation={self.generation.number} workers={len(self.workers)} "
            f"retiring={len(self.retiring)} deaths={len(self.deaths)}>"
        )

    # -- signals ----------------------------------------------------------------------------

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: object) -> None:
        self._reload_asked = True

    # -- the workers ------------------------------------------------------------------------

    def _write_snapshot(self, generation: int, data: bytes | None) -> str | None:
        """The generation's snapshot file, written whole (then renamed) with ``data``."""
        if data is None:
            return None
        path = os.path.join(self._snapshots.name, f"generation-{generation}.toml")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path

    def _env(self, generation: Generation, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_LISTENERS_ENV] = ",".join(generation.addresses)
        # One secret for all the workers, so that each honours the others' tokens.
        env[STICKY_SECRET_ENV] = self._secret
        env[WORKER_PARENT_ENV] = str(os.getpid())
        env[WORKER_ENV] = str(slot)
        env[WORKER_READY_ENV] = str(self._ready_w)
        if generation.snapshot is not None:
            env[WORKER_CONFIG_ENV] = generation.snapshot
        return env

    def _spawn(self, generation: Generation, slot: int) -> Worker:
        process = subprocess.Popen(
            [sys.executable, "-m", "lbgw", *self._argv],
            env=self._env(generation, slot),
            pass_fds=(self._ready_w,),
        )
        worker = Worker(slot, generation.number, process, time.monotonic())
        log.info(
            "worker started",
            extra=fields(
                pid=worker.pid, slot=slot, generation=generation.number, config=generation.config_id
            ),
        )
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
                self.workers.append(self._spawn(self.generation, slot))
        for w, deadline in list(self.retiring):
            if w.process.poll() is not None:
                self.retiring.remove((w, deadline))
                log.info("old worker exited", extra=fields(pid=w.pid, code=w.process.returncode))
            elif now > deadline:
                log.error("old worker did not stop; killing it", extra=fields(pid=w.pid))
                w.process.kill()
        return None

    # -- reloads ----------------------------------------------------------------------------

    def _reload(self) -> None:
        current = self.generation
        try:
            config, config_id, data = self._load()
        except ConfigError as exc:
            log.error(
                "reload refused: config invalid, still running the old one",
                extra=fields(
                    source=exc.source, key=exc.key, error=str(exc), config=current.config_id
                ),
            )
            return
        change = plan(current.config, config)
        log.info("reload", extra=fields(config=config_id, **change.summary()))
        if not (change.listeners or change.workers):
            self._write_snapshot(current.number, data)
            self.generation = replace(current, config=config, config_id=config_id)
            for w in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    w.process.send_signal(signal.SIGHUP)
            return
        self._next_generation(config, config_id, data)

    def _next_generation(self, config: Config, config_id: str, data: bytes | None) -> None:
        current = self.generation
        olds = (lc.address for lc in current.config.listeners)
        known = dict(zip(olds, current.addresses, strict=True))
        try:
            addresses, holders = reserve_ports(config, known)
        except OSError as exc:
            log.error("reload failed: cannot reserve ports", extra=fields(error=str(exc)))
            return
        number = current.number + 1
        snapshot = self._write_snapshot(number, data)
        new = Generation(number, config, config_id, addresses, holders, snapshot)
        starting = [self._spawn(new, slot) for slot in range(config.workers)]
        self.workers.extend(starting)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and not self.stopping:
            self._read_ready()
            if all(w.ready for w in starting) or any(
                w.process.poll() is not None for w in starting
            ):
                break
            time.sleep(0.05)
        if not all(w.ready and w.process.poll() is None for w in starting):
            log.error(
                "reload failed: the new workers did not start; the old ones keep serving",
                extra=fields(config=config_id, generation=new.number),
            )
            for w in starting:
                self.workers.remove(w)
                if w.process.poll() is None:
                    w.process.send_signal(signal.SIGTERM)
                self.retiring.append((w, time.monotonic() + 10.0))
            for holder in holders:
                holder.close()
            return
        old = [w for w in self.workers if w not in starting]
        deadline = time.monotonic() + current.config.grace_period + 10.0
        for w in old:
            self.workers.remove(w)
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)
            self.retiring.append((w, deadline))
        self._restarts.clear()
        self.generation = new
        for holder in current.holders:  # resolved ports still in use are held by workers
            holder.close()
        log.info(
            "new workers serving; old ones draining",
            extra=fields(
                generation=new.number,
                config=config_id,
                pids=[w.pid for w in starting],
                draining=[w.pid for w in old],
                addresses=addresses,
            ),
        )

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        generation = self.generation
        self.workers = [self._spawn(generation, n) for n in range(generation.config.workers)]
        log.info(
            "workers",
            extra=fields(
                pids=[w.pid for w in self.workers],
                addresses=generation.addresses,
                config=generation.config_id,
            ),
        )
        status = 0
        try:
            while not self.stopping:
                if self._reload_asked:
                    self._reload_asked = False
                    self._reload()
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
        everyone = self.workers + [w for w, _ in self.retiring]
        for w in everyone:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.generation.config.grace_period + 10.0
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
        for holder in self.generation.holders:
            holder.close()
        os.close(self._ready_r)
        os.close(self._ready_w)
        self._snapshots.cleanup()
        return status
