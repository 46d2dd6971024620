"""``lbgw demo`` and ``lbgw call``: the gateway in front of two echo backends.

The demo starts two ``EchoBackend`` servers on free loopback ports (weights
1 and 3), the gateway in front of them with smooth weighted round robin, and
makes a few calls through it, printing which backend answered each. It then
keeps serving until Ctrl-C, so ``lbgw call`` (or any gRPC client with
``protos/lbgw/pb/echo.proto``) can call it.

``lbgw demo --tls`` does the same with mTLS on both sides: a throwaway CA
(``trustme``) in a temporary directory signs the listener's certificate,
the backends', lbgw's client certificate to them and a client certificate
for ``lbgw call --ca ... --cert ... --key ...``; the directory is deleted at
exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from lbgw.config import AdminConfig, TracingConfig, config_from_mapping
from lbgw.health import HealthService
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve

__all__ = ["call", "run_demo"]

_UNARY = "/lbgw.echo.v1.Echo/Unary"


async def call(
    address: str,
    count: int,
    message: str,
    timeout: float,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> int:
    """Make ``count`` unary Echo calls to ``address``; print who answered. Exit status.

    ``credentials``: call over TLS (``lbgw call --ca``); None: plaintext.
    """
    channel_of = (
        aio.insecure_channel(address)
        if credentials is None
        else aio.secure_channel(address, credentials)
    )
    async with channel_of as channel:
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        for n in range(count):
            try:
                reply = await stub.Unary(echo_pb2.EchoRequest(message=message), timeout=timeout)
            except aio.AioRpcError as error:
                print(f"call {n + 1}: {error.code().name}: {error.details()}")
                return 1
            print(f"call {n + 1}: {reply.message!r} answered by {reply.backend}")
    return 0


class _DemoPki:
    """The demo's throwaway CA and certificates, as files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        import trustme  # noqa: PLC0415 - only lbgw demo --tls needs it

        self.directory = directory
        self.ca = trustme.CA(organization_name="lbgw demo CA")
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def issue(self, stem: str, *names: str) -> tuple[str, str]:
        """(cert file, key file) of a certificate for ``names``."""
        leaf = self.ca.issue_cert(*names)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self._write(f"{stem}.pem", chain), self._write(
            f"{stem}.key", leaf.private_key_pem.bytes()
        )

    def server_credentials(self, stem: str, *names: str) -> grpc.ServerCredentials:
        """A demo backend's: its certificate, and lbgw's client certificate required."""
        leaf = self.ca.issue_cert(*names)
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return grpc.ssl_server_credentials(
            [(leaf.private_key_pem.bytes(), chain)],
            root_certificates=self.ca.cert_pem.bytes(),
            require_client_auth=True,
        )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def run_demo(  # noqa: PLR0913 - the demo's flags
    listen: str,
    calls: int,
    *,
    once: bool,
    tracing: TracingConfig | None = None,
    tls: bool = False,
    admin: str | None = None,
) -> int:
    """``lbgw demo``; with ``tls``, mTLS on both sides under a throwaway CA; ``admin``: the
    admin port's address (its status page)."""
    if not tls:
        return await _run_demo(listen, calls, once=once, tracing=tracing, pki=None, admin=admin)
    with tempfile.TemporaryDirectory(prefix="lbgw-demo-tls-") as directory:
        pki = _DemoPki(Path(directory))
        return await _run_demo(listen, calls, once=once, tracing=tracing, pki=pki, admin=admin)


async def _run_demo(  # noqa: PLR0913 - the demo's flags
    listen: str,
    calls: int,
    *,
    once: bool,
    tracing: TracingConfig | None,
    pki: _DemoPki | None,
    admin: str | None,
) -> int:
    # Ctrl-C or SIGTERM stops the demo at any point, start-up included.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    one, three = EchoBackend("backend-1 (weight 1)"), EchoBackend("backend-2 (weight 3)")
    listener: dict[str, Any] = {"address": listen}
    cluster: dict[str, Any] = {"strategy": "swrr", "reflection": True}
    creds: list[grpc.ServerCredentials | None] = [None, None]
    client: grpc.ChannelCredentials | None = None
    hint = ""
    if pki is not None:
        cert, key = pki.issue("listener", "localhost", "127.0.0.1", "::1")
        listener["tls"] = {
            "cert_file": cert,
            "key_file": key,
            "client_ca_file": pki.ca_file,
            "require_client_cert": True,
        }
        lbgw_cert, lbgw_key = pki.issue("lbgw-client", "lbgw.demo")
        cluster["tls"] = {
            "ca_file": pki.ca_file,
            "cert_file": lbgw_cert,
            "key_file": lbgw_key,
            "server_name": "backend.demo",
        }
        creds = [pki.server_credentials(f"backend-{n}", "backend.demo") for n in (1, 2)]
        client_cert, client_key = pki.issue("client", "client.demo")
        client = grpc.ssl_channel_credentials(
            _read(pki.ca_file), _read(client_key), _read(client_cert)
        )
        hint = f" --ca {pki.ca_file} --cert {client_cert} --key {client_key}"
    async with (
        serve(
            echo_registrar(one, reflection=True, health=HealthService()), credentials=creds[0]
        ) as a,
        serve(
            echo_registrar(three, reflection=True, health=HealthService()), credentials=creds[1]
        ) as b,
    ):
        cluster["endpoints"] = [{"address": a, "weight": 1}, {"address": b, "weight": 3}]
        config = config_from_mapping(
            {"listeners": [listener], "clusters": {"echo": cluster}}, source="lbgw demo"
        )
        if tracing is not None:
            config = dataclasses.replace(config, tracing=tracing)
        if admin is not None:
            config = dataclasses.replace(config, admin=AdminConfig(address=admin))
        async with Gateway(config) as gateway:
            address = gateway.addresses[0]
            mode = " with mTLS on both sides (a throwaway CA)" if pki is not None else ""
            print(
                f"lbgw demo: gateway on {address}{mode}, backends {a} (weight 1) and {b} (weight 3)"
            )
            if gateway.admin_server is not None:
                print(f"lbgw demo: status page on {gateway.admin_server.url}")
            status = await call(address, calls, "hello", 5.0, credentials=client)
            if once or status or stop.is_set():
                return status
            print(f"serving until Ctrl-C; try: lbgw call {address}{hint}")
            await stop.wait()
    return 0
