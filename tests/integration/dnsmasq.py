"""A real DNS server for the discovery tests: Debian's dnsmasq, on a free loopback port.

``Dnsmasq`` runs ``dnsmasq`` in the foreground (``--keep-in-foreground``)
answering only from an ``--addn-hosts`` file the test writes (``--no-resolv
--no-hosts``), bound to 127.0.0.1 alone (``--bind-interfaces``). It stays
the user that started it (``--user`` is that user, no pid file), so it runs
as root and as not-root alike. ``write(...)`` rewrites the hosts file and
sends SIGHUP, which makes dnsmasq read it again. Stopped by its PID.

``serve_at`` serves a backend on a given address (127.0.0.2:P, ...), so
that endpoints found by one name can share one port on distinct addresses.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import dns.resolver
import pytest
from grpc import aio

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def free_port(hosts: Sequence[str] = ("127.0.0.1",)) -> int:
    """A port free for TCP and UDP on every one of ``hosts`` (as of now)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((hosts[0], 0))
            port: int = s.getsockname()[1]
        try:
            for host in hosts:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


class Dnsmasq:
    """One dnsmasq process answering for the names in its hosts file."""

    def __init__(self, directory: Path, extra: Sequence[str] = ()) -> None:
        if not os.path.exists(DNSMASQ):
            pytest.fail("dnsmasq is not installed (.ci/run installs Debian's dnsmasq-base)")
        self.hosts = directory / "hosts"
        self.hosts.write_text("")
        self.extra = list(extra)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        user = pwd.getpwuid(os.getuid()).pw_name
        self.process = subprocess.Popen(
            [
                DNSMASQ,
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                f"--addn-hosts={self.hosts}",
                "--pid-file=",
                f"--user={user}",
                "--log-facility=-",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_answering()

    def wait_answering(self, timeout: float = 10.0) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 0.5
        deadline = time.monotonic() + timeout
        while True:
            try:
                resolver.resolve("nothing.invalid", "A")
            except dns.resolver.NXDOMAIN:
                return
            except dns.resolver.NoNameservers as exc:  # REFUSED: no upstream, but answering
                if "REFUSED" in str(exc):
                    return
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def write(self, records: Sequence[tuple[str, str]]) -> None:
        """Replace the hosts file with ``(ip, name)`` records and have dnsmasq read it."""
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{ip} {name}\n" for ip, name in records))
        tmp.replace(self.hosts)
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@contextlib.contextmanager
def dnsmasq(directory: Path, extra: Sequence[str] = ()) -> Iterator[Dnsmasq]:
    server = Dnsmasq(directory, extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def serve_at(register: Callable[[aio.Server], None], address: str) -> AsyncIterator[str]:
    """A grpc.aio server on exactly ``address``; yields it."""
    server = aio.server()
    register(server)
    server.add_insecure_port(address)
    await server.start()
    try:
        yield address
    finally:
        await server.stop(0)
