"""TLS set-up for the integration tests: a test CA on disk, TLS backends, TLS clients.

Certificates are made with ``trustme`` (which uses ``cryptography``); every
server binds ``127.0.0.1`` on a port the OS chooses.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from grpc import aio


@dataclass(frozen=True)
class Pair:
    """A certificate chain and its key, as files."""

    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        """(key, chain): the order grpc's credentials take them in."""
        return self.key.read_bytes(), self.cert.read_bytes()

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).serial_number


class Pki:
    """A throwaway CA whose certificates are written under ``directory``."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.name = name
        self.ca = trustme.CA()
        self.ca_file = directory / f"{name}.pem"
        self.ca_file.write_bytes(self.ca.cert_pem.bytes())
        self._n = 0

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    def issue(
        self,
        *names: str,
        stem: str | None = None,
        not_after: datetime.datetime | None = None,
        not_before: datetime.datetime | None = None,
    ) -> Pair:
        """A certificate for ``names`` (DNS names, IPs), written as ``stem``.pem/.key.

        A name with ``://`` is a URI SAN (trustme has none): the certificate
        is then re-signed with it by the CA's key, with ``cryptography``.
        """
        self._n += 1
        uris = [n for n in names if "://" in n]
        plain = [n for n in names if "://" not in n]
        leaf = self.ca.issue_cert(*plain, not_after=not_after, not_before=not_before)
        stem = stem or f"{self.name}-{self._n}"
        pair = Pair(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
        chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
        if uris:
            chain = self._with_uris(chain, leaf.private_key_pem.bytes(), uris)
        pair.cert.write_bytes(chain)
        pair.key.write_bytes(leaf.private_key_pem.bytes())
        return pair

    def _with_uris(self, chain: bytes, key_pem: bytes, uris: list[str]) -> bytes:
        cert = x509.load_pem_x509_certificate(chain)
        key = serialization.load_pem_private_key(key_pem, None)
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(cert.issuer)
            .public_key(key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(cert.not_valid_before_utc)
            .not_valid_after(cert.not_valid_after_utc)
        )
        for ext in cert.extensions:
            if not isinstance(ext.value, x509.SubjectAlternativeName):
                builder = builder.add_extension(ext.value, ext.critical)
        names = [*sans, *(x509.UniformResourceIdentifier(u) for u in uris)]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        signed = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        return signed.public_bytes(serialization.Encoding.PEM)


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` at once (a new inode), as cert-manager's volumes do."""
    tmp = path.with_suffix(path.suffix + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def serve_tls(
    register: Callable[[aio.Server], None], pair: Pair, client_ca: Path | None = None
) -> AsyncIterator[str]:
    """A grpc.aio server with TLS (mTLS with ``client_ca``) on 127.0.0.1; yields host:port."""
    server = aio.server()
    register(server)
    credentials = grpc.ssl_server_credentials(
        [pair.pem()],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def client_credentials(ca: Path, pair: Pair | None = None) -> grpc.ChannelCredentials:
    key, chain = pair.pem() if pair is not None else (None, None)
    return grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)


def presented_serial(address: str, ca: Path, pair: Pair | None = None) -> int:
    """The serial of the certificate ``address`` presents to a new TLS connection (blocking)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
