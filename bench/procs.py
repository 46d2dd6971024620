"""Processes a benchmark starts: their CPU from ``/proc``, and stopping them by PID.

``Proc`` wraps one ``subprocess.Popen``. Its ``cpu()`` reads ``utime + stime``
(and ``cutime + cstime``, the children it reaped) from ``/proc/<pid>/stat``
for the process and every live descendant, so a server with worker processes
(``lbgw --workers N``, nginx's master and worker) is charged for all of them.
Every descendant seen is remembered with its start time, so ``stop()`` can
signal exactly the processes this benchmark caused to exist, by PID, and never
a process that took over a reused PID. Linux only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

#: SIGTERM, then this long, then SIGKILL.
STOP_TIMEOUT = 5.0
#: Clock ticks per second, the unit of the CPU times in ``/proc/<pid>/stat``.
TICKS = os.sysconf("SC_CLK_TCK")

# Indices into the fields after the command name (field 3 of proc(5) is [0]).
_STATE, _UTIME, _CSTIME, _STARTTIME = 0, 11, 14, 19


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after ``(comm)``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids.extend(int(k) for k in (task / "children").read_text().split())
    return kids


def _alive(pid: int, started: str) -> bool:
    """Whether ``pid`` is still the process that started at ``started``, and no zombie."""
    fields = _stat(pid)
    return fields is not None and fields[_STARTTIME] == started and fields[_STATE] != "Z"


def _gone(pid: int, started: str) -> bool:
    return not _alive(pid, started)


def _terminate(send: Callable[[int], None], done: Callable[[], bool]) -> None:
    """Send SIGTERM; if ``done()`` stays false for STOP_TIMEOUT, send SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        send(signal.SIGKILL)


def free_port() -> int:
    """A port the OS chose on 127.0.0.1, for servers that cannot report the port they bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A process started here, its descendants as last seen, and how to stop them all by PID.

    Its stdout and stderr go to ``<workdir>/<name>.out`` and ``.err``, unless
    ``pipes``: then stdin and stdout are pipes for the caller.
    """

    def __init__(self, name: str, argv: Sequence[str], workdir: Path, *, pipes: bool = False):
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with self.err_path.open("wb") as err:
            if pipes:
                self.popen = subprocess.Popen(
                    list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
                )
            else:
                with self.out_path.open("wb") as out:
                    self.popen = subprocess.Popen(
                        list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err
                    )
        self.pid = self.popen.pid
        #: pid -> start time, for every process of the tree seen so far.
        self._family: dict[int, str] = {}

    def __repr__(self) -> str:
        code = self.popen.poll()
        state = "running" if code is None else f"exited {code}"
        return f"<Proc {self.name} pid={self.pid} {state}, {len(self._family)} seen in tree>"

    def cpu(self) -> dict[int, int]:
        """CPU clock ticks of each live process in the tree, each one's reaped children included."""
        ticks: dict[int, int] = {}
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            fields = _stat(pid)
            if fields is None or pid in ticks:
                continue
            ticks[pid] = sum(int(x) for x in fields[_UTIME : _CSTIME + 1])
            self._family.setdefault(pid, fields[_STARTTIME])
            todo.extend(_children(pid))
        return ticks

    def first_line(self, timeout: float) -> str:
        """The first line the process wrote on stdout, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out_path.read_text(encoding="utf-8", errors="replace")
            if "\n" in text:
                return text.split("\n", 1)[0].strip()
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} wrote no line in {timeout:g} s: {self.stderr_tail()}")

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.err_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        code = self.popen.poll()
        state = "running" if code is None else f"exit {code}"
        return f"{self.name} {state}: {' | '.join(text.splitlines()[-lines:]) or '(no stderr)'}"

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT; then the same for any descendant left over."""
        if self.popen.poll() is None:
            self.cpu()  # see the tree as it is now
            _terminate(self.popen.send_signal, lambda: self.popen.poll() is not None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT)
        for pid, started in self._family.items():
            if pid != self.pid and _alive(pid, started):
                _terminate(functools.partial(os.kill, pid), functools.partial(_gone, pid, started))
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process in ``procs`` (also those appended inside), last first, on the way out."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc!r}: {exc}", file=sys.stderr, flush=True)
