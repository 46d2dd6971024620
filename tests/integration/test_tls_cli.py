"""``lbgw serve`` and ``lbgw check-config`` with TLS, as a user runs them.

A bad TLS file stops both with exit status 2 and a message naming the
setting (or the quick form's flag) and the file; a certificate that expires
within 7 days is a warning. The quick form serves mTLS on both sides.
"""

from __future__ import annotations

import asyncio
import datetime
import signal
import subprocess
import sys
from pathlib import Path

from grpc import aio

from lbgw.pb import echo_pb2_grpc
from lbgw.testing import EchoBackend, echo_registrar
from tests.integration.support import UNARY, echo_backends, lbgw_process, request
from tests.integration.tls_support import Pki, client_credentials, serve_tls


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbgw", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _config(path: Path, cert: Path, key: Path) -> Path:
    path.write_text(
        f"""
[[listeners]]
address = "127.0.0.1:0"
tls = {{ cert_file = "{cert}", key_file = "{key}" }}

[clusters.echo]
endpoints = ["127.0.0.1:50061"]
"""
    )
    return path


def test_check_config_names_the_key_and_file_of_a_missing_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pair = pki.issue("localhost")
    missing = tmp_path / "gone.pem"
    cfg = _config(tmp_path / "lbgw.toml", missing, pair.key)
    done = _run("check-config", str(cfg))
    assert done.returncode == 2, done.stderr
    assert "listeners[0].tls.cert_file" in done.stderr
    assert str(missing) in done.stderr and "cannot read" in done.stderr


def test_check_config_warns_of_a_certificate_expiring_within_7_days(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    pair = pki.issue("localhost", not_after=soon)
    done = _run("check-config", str(_config(tmp_path / "lbgw.toml", pair.cert, pair.key)))
    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr and "expires" in done.stderr
    assert str(pair.cert) in done.stderr


def test_serve_refuses_a_key_that_does_not_match_naming_the_flag(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    one, other = pki.issue("localhost"), pki.issue("localhost")
    done = _run(
        "serve", "--backend", "127.0.0.1:50061", "--listen", "127.0.0.1:0",
        "--tls-cert", str(one.cert), "--tls-key", str(other.key),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--tls-key" in done.stderr and str(other.key) in done.stderr
    assert "does not match" in done.stderr
    half = _run("serve", "--backend", "127.0.0.1:50061", "--tls-cert", str(one.cert))
    assert half.returncode == 2 and "--tls-key" in half.stderr


async def test_serve_quick_form_mtls_on_both_sides(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    listener, client = pki.issue("localhost", "127.0.0.1"), pki.issue("client.example")
    backend_pair, lbgw_client = pki.issue("backend.example"), pki.issue("lbgw.example")
    echo = EchoBackend("tls")
    async with serve_tls(echo_registrar(echo), backend_pair, client_ca=pki.ca_file) as backend:
        args = [
            "--listen", "127.0.0.1:0", "--backend", backend, "--method", f"{UNARY}=unary",
            "--health-check", "none",
            "--tls-cert", str(listener.cert), "--tls-key", str(listener.key),
            "--tls-client-ca", str(pki.ca_file),
            "--backend-ca", str(pki.ca_file), "--backend-server-name", "backend.example",
            "--backend-cert", str(lbgw_client.cert), "--backend-key", str(lbgw_client.key),
        ]  # fmt: skip
        async with lbgw_process(*args, timeout=60) as lbgw:
            creds = client_credentials(pki.ca_file, client)
            async with aio.secure_channel(lbgw.address, creds) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                reply = await stub.Unary(request(message="x"), timeout=30)
            async with aio.secure_channel(lbgw.address, client_credentials(pki.ca_file)) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
                try:
                    await stub.Unary(request(message="x"), timeout=30)
                    refused = False
                except aio.AioRpcError:  # no client certificate: refused at the handshake
                    refused = True
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 15) == 0
    assert reply.backend == "tls" and refused
    logged = [line for line in lbgw.lines if line["event"] == "certificate"]
    assert logged and logged[0]["sans"] == ["localhost", "127.0.0.1"]


def test_demo_tls_calls_through_mtls_on_both_sides() -> None:
    done = _run("demo", "--tls", "--once", "--listen", "127.0.0.1:0")
    assert done.returncode == 0, done.stderr
    assert "with mTLS on both sides" in done.stdout
    answered = [line for line in done.stdout.splitlines() if "answered by" in line]
    assert len(answered) == 8
    assert sum("backend-2" in line for line in answered) == 6


async def test_serve_with_workers_keeps_tls_on_every_worker(tmp_path: Path) -> None:
    """Each worker gets its listener's TLS with the resolved port: never a plaintext port."""
    pki = Pki(tmp_path)
    listener = pki.issue("localhost", "127.0.0.1")
    async with echo_backends(EchoBackend("w")) as [backend]:
        args = [
            "--listen", "127.0.0.1:0", "--backend", backend, "--workers", "2", "--grace", "1",
            "--tls-cert", str(listener.cert), "--tls-key", str(listener.key),
        ]  # fmt: skip
        async with lbgw_process(*args, timeout=60) as lbgw:
            async with aio.secure_channel(lbgw.address, client_credentials(pki.ca_file)) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
                replies = [(await stub.Unary(request(), timeout=30)).backend for _ in range(4)]
            async with aio.insecure_channel(lbgw.address) as plain:
                stub = echo_pb2_grpc.EchoStub(plain)  # type: ignore[no-untyped-call]
                try:
                    await stub.Unary(request(), timeout=30)
                    plaintext_served = True
                except aio.AioRpcError:
                    plaintext_served = False
            lbgw.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(lbgw.wait, 30) == 0
    assert replies == ["w"] * 4 and not plaintext_served
