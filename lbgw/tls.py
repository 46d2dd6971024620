"""TLS on both sides: listener certificates that reload, backend credentials, client identity.

Certificates are parsed and checked with ``cryptography``; lbgw never reads
PEM or X.509 itself. This module, like ``config`` and ``cli``, reads files:
certificates rotate while lbgw runs, so it reads them again when they change.

**Listeners** (``ServerTls``, one per TLS listener). The credentials are
``grpc.dynamic_ssl_server_credentials``. gRPC's core calls the fetcher for
every new connection, before its handshake (``add_handshakers`` in
``ssl_security_connector.cc``), on the core thread that accepted it, holding
the GIL (``_server_cert_config_fetcher_wrapper`` in ``credentials.pyx.pxi``;
the first call, at bind, takes the initial configuration without calling
the fetcher). The fetcher returns ``None`` for "unchanged" (the connector
keeps its handshaker factory), a new ``ServerCertificateConfiguration`` to
replace it, or raises, which gRPC logs and treats as a failure that keeps
the old one. So the fetcher here compares the files' ``os.stat`` with what it
last saw (a few µs), returns ``None`` when nothing changed, and otherwise
loads and checks the new pair; a bad one (unreadable, not PEM, a key that
does not match, expired) is logged naming the file, counted, and ``None`` is
returned: the old pair stays, and the files are tried again at their next
change. Connections already open keep the certificate they shook hands with.
One credentials object per listener: gRPC makes one security connector per
port, and the Python wrapper's "initial configuration fetched" flag is the
credentials object's, so a second port on the same object would start with
a fetch that returns ``None``, which the core takes as a failure to load.

**Backends** (``ClientTls``, one per cluster with ``[clusters.NAME.tls]``):
``grpc.ssl_channel_credentials``, always verifying; ``server_name`` is the
name verified, sent as SNI (``grpc.ssl_target_name_override``) and as
``:authority``. ``Gateway`` polls the files (``changed``) and, when they
changed and the new ones are good, gives the cluster new channels
(``Cluster.renew_channels``).

**Client identity** (``ClientIdentity``): ``allowed_client_sans``, checked on
every call from the call's auth context (``IdentityInterceptor``), and the
``x-forwarded-client-cert`` header in Envoy's format, which the proxy adds
to forwarded calls when ``forward_client_cert`` is on. A client's own
``x-forwarded-client-cert`` is always removed (``proxy.forwarded_metadata``).

**For the operator's view** (metrics are wired elsewhere): ``TlsState``
holds each certificate in use (``certificates``, ``expiry_timestamps()``)
and the reloads by result (``reloads``).
"""

from __future__ import annotations

import collections
import datetime
import functools
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from grpc import aio

from lbgw.config import ClusterTlsConfig, Config, ListenerTlsConfig
from lbgw.exceptions import ConfigError
from lbgw.logs import fields

if TYPE_CHECKING:
    _Context: TypeAlias = aio.ServicerContext[Any, Any]
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]

__all__ = [
    "EXPIRY_WARNING",
    "XFCC",
    "Certificate",
    "ClientIdentity",
    "ClientTls",
    "IdentityInterceptor",
    "KeyPair",
    "ServerTls",
    "TlsFileError",
    "TlsState",
    "as_config_error",
    "check_config",
    "client_identity",
    "describe",
    "load_ca",
    "load_pair",
    "xfcc_of",
]

log = logging.getLogger("lbgw.tls")

#: A certificate that expires sooner than this is a warning at start and at reload.
EXPIRY_WARNING: Final = datetime.timedelta(days=7)
#: Envoy's header for the client certificate's identity, sent to backends.
XFCC: Final = "x-forwarded-client-cert"
#: How many parsed client certificates ``ClientIdentity`` keeps (by PEM).
_MAX_PEERS: Final = 1024


class TlsFileError(Exception):
    """A TLS file that cannot be used: ``key`` names the setting, ``path`` the file."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"{key} = {path!r}: {reason}")
        self.key = key
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the log and the operator's view say about a certificate."""

    subject: str
    sans: tuple[str, ...]
    serial: int
    not_after: datetime.datetime
    sha256: str

    @classmethod
    def of(cls, cert: x509.Certificate) -> Certificate:
        return cls(
            cert.subject.rfc4514_string(),
            _sans(cert),
            cert.serial_number,
            cert.not_valid_after_utc,
            cert.fingerprint(_SHA256).hex(),
        )

    def log_fields(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "sans": list(self.sans),
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
        }


_SHA256: Final = hashes.SHA256()


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    """The certificate's DNS, URI, IP and e-mail SANs, in that order."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (
        *ext.get_values_for_type(x509.DNSName),
        *ext.get_values_for_type(x509.UniformResourceIdentifier),
        *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress)),
        *ext.get_values_for_type(x509.RFC822Name),
    )


# -- reading and checking files ----------------------------------------------------------------


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsFileError(key, path, f"cannot read it ({exc.strerror})") from exc


def _certificates(key: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsFileError(key, path, "not a PEM certificate")
    return certs


def _valid_now(
    key: str, path: str, cert: x509.Certificate, now: datetime.datetime, warnings: list[str]
) -> None:
    not_after = cert.not_valid_after_utc
    if not_after <= now:
        raise TlsFileError(key, path, f"the certificate expired on {not_after.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise TlsFileError(
            key, path, f"the certificate is not valid before {cert.not_valid_before_utc}"
        )
    if not_after - now < EXPIRY_WARNING:
        warnings.append(f"{key} = {path!r}: the certificate expires on {not_after.isoformat()}")


def _private_key(key: str, path: str, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsFileError(
            key, path, "an encrypted private key (lbgw needs it unencrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(key, path, "not a PEM private key") from None


def _public(value: Any) -> bytes:
    der: bytes = value.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate chain and its private key, as PEM, checked to belong together."""

    cert_pem: bytes
    key_pem: bytes
    leaf: Certificate


def load_pair(  # noqa: PLR0913 - the two files and the names the errors give them
    cert_key: str,
    cert_path: str,
    key_key: str,
    key_path: str,
    *,
    now: datetime.datetime | None = None,
    warnings: list[str] | None = None,
) -> KeyPair:
    """Read and check a certificate and its key: PEM, matching, valid now.

    Raises ``TlsFileError`` naming the setting and file at fault; appends a
    warning for a certificate that expires within ``EXPIRY_WARNING``.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    warnings = warnings if warnings is not None else []
    cert_pem = _read(cert_key, cert_path)
    key_pem = _read(key_key, key_path)
    leaf = _certificates(cert_key, cert_path, cert_pem)[0]
    _valid_now(cert_key, cert_path, leaf, now, warnings)
    private = _private_key(key_key, key_path, key_pem)
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise TlsFileError(key_key, key_path, f"the key does not match the certificate {cert_path}")
    return KeyPair(cert_pem, key_pem, Certificate.of(leaf))


def load_ca(
    key: str,
    path: str,
    *,
    now: datetime.datetime | None = None,
    warnings: list[str] | None = None,
) -> bytes:
    """Read a CA bundle: PEM certificates, the first valid now."""
    now = now or datetime.datetime.now(datetime.UTC)
    data = _read(key, path)
    certs = _certificates(key, path, data)
    _valid_now(key, path, certs[0], now, warnings if warnings is not None else [])
    return data


def _signature(paths: Sequence[str]) -> tuple[tuple[int, int, int, int] | None, ...]:
    """What says a file changed: device, inode, size and mtime (ns); None if missing."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# -- what the operator's view reads ----------------------------------------------------------


class TlsState:
    """The certificates in use and the reloads, for the log, ``/server_info`` and metrics.

    ``certificates`` maps ``("listener", address)`` or ``("cluster", name)``
    to the ``Certificate`` presented (a cluster without a client certificate
    has its CA's first certificate). ``reloads`` counts reloads by result,
    ``"ok"`` or ``"error"``. Written from gRPC's threads too: under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.certificates: dict[tuple[str, str], Certificate] = {}
        self.reloads: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (
            f"<TlsState certificates={len(self.certificates)} "
            f"reloads ok={self.reloads['ok']} error={self.reloads['error']}>"
        )

    def expiry_timestamps(self) -> dict[tuple[str, str], float]:
        """(kind, name) -> the certificate's notAfter, Unix seconds."""
        with self._lock:
            return {k: c.not_after.timestamp() for k, c in self.certificates.items()}

    def in_use(self) -> dict[tuple[str, str], Certificate]:
        """A copy of ``certificates``, taken under the lock."""
        with self._lock:
            return dict(self.certificates)

    def restore(self, certificates: Mapping[tuple[str, str], Certificate]) -> None:
        """Put back what ``in_use`` gave (a refused reload loaded certificates it won't use)."""
        with self._lock:
            self.certificates = dict(certificates)

    def keep(self, live: set[tuple[str, str]]) -> None:
        """Forget the certificates of listeners and clusters a reload removed."""
        with self._lock:
            self.certificates = {k: c for k, c in self.certificates.items() if k in live}

    def reload_counts(self) -> dict[str, int]:
        with self._lock:
            return {"ok": self.reloads["ok"], "error": self.reloads["error"]}

    def using(self, kind: str, name: str, cert: Certificate, event: str, **more: Any) -> None:
        with self._lock:
            self.certificates[(kind, name)] = cert
        log.info(event, extra=fields(**{kind: name}, **cert.log_fields(), **more))

    def reloaded(self, ok: bool) -> None:
        with self._lock:
            self.reloads["ok" if ok else "error"] += 1


# -- listeners ---------------------------------------------------------------------------------


class ServerTls:
    """One TLS listener's certificate: loaded at start, reloaded when its files change.

    ``prefix`` names the listener's settings in errors
    (``listeners[0].tls``); ``name`` is its address, in the log.
    """

    def __init__(
        self, name: str, config: ListenerTlsConfig, prefix: str, state: TlsState | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.prefix = prefix
        self.state = state if state is not None else TlsState()
        self._lock = threading.Lock()
        self._paths = [config.cert_file, config.key_file]
        if config.client_ca_file:
            self._paths.append(config.client_ca_file)
        self._seen = _signature(self._paths)
        self.pair, self.client_ca = self._load()
        self.state.using("listener", name, self.pair.leaf, "certificate", file=config.cert_file)

    def __repr__(self) -> str:
        leaf = self.pair.leaf
        return f"<ServerTls {self.name} serial={leaf.serial:x} until={leaf.not_after:%Y-%m-%d}>"

    def _load(self) -> tuple[KeyPair, bytes | None]:
        c, p = self.config, self.prefix
        warnings: list[str] = []
        pair = load_pair(
            f"{p}.cert_file", c.cert_file, f"{p}.key_file", c.key_file, warnings=warnings
        )
        ca = None
        if c.client_ca_file:
            ca = load_ca(f"{p}.client_ca_file", c.client_ca_file, warnings=warnings)
        for warning in warnings:
            log.warning("certificate expires soon", extra=fields(listener=self.name, at=warning))
        return pair, ca

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.pair.key_pem, self.pair.cert_pem)], root_certificates=self.client_ca
        )

    def credentials(self) -> grpc.ServerCredentials:
        """New credentials for this listener's one port (see the module's docstring)."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            # typeshed's fetcher never returns None; gRPC takes None as "unchanged".
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.config.require_client_cert,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: called on a core thread before each new connection's handshake.

        ``None`` keeps the current pair: nothing changed, or the change is bad
        (logged, naming the file). A new configuration replaces it.
        """
        seen = _signature(self._paths)
        if seen == self._seen:
            return None
        with self._lock:
            if seen == self._seen:  # another connection's fetch took it
                return None
            self._seen = seen
            try:
                self.pair, self.client_ca = self._load()
            except TlsFileError as exc:
                self.state.reloaded(False)
                log.error(
                    "certificate reload failed, keeping the current one",
                    extra=fields(listener=self.name, key=exc.key, file=exc.path, reason=exc.reason),
                )
                return None
            self.state.reloaded(True)
            self.state.using(
                "listener", self.name, self.pair.leaf, "certificate reloaded",
                file=self.config.cert_file,
            )  # fmt: skip
            return self._configuration()


# -- backends ----------------------------------------------------------------------------------


class ClientTls:
    """One cluster's TLS to its endpoints: the channel credentials and options, and its files."""

    def __init__(
        self, cluster: str, config: ClusterTlsConfig, state: TlsState | None = None
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.state = state if state is not None else TlsState()
        p = f"clusters.{cluster}.tls"
        self._paths = [x for x in (config.ca_file, config.cert_file, config.key_file) if x]
        self._seen = _signature(self._paths)
        warnings: list[str] = []
        ca = load_ca(f"{p}.ca_file", config.ca_file, warnings=warnings) if config.ca_file else None
        self.pair: KeyPair | None = None
        if config.cert_file:
            self.pair = load_pair(
                f"{p}.cert_file",
                config.cert_file,
                f"{p}.key_file",
                config.key_file,
                warnings=warnings,
            )
        for warning in warnings:
            log.warning("certificate expires soon", extra=fields(cluster=cluster, at=warning))
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=self.pair.key_pem if self.pair else None,
            certificate_chain=self.pair.cert_pem if self.pair else None,
        )
        if self.pair is not None:
            self.state.using(
                "cluster", cluster, self.pair.leaf, "client certificate", file=config.cert_file
            )

    def __repr__(self) -> str:
        mtls = "mTLS" if self.pair is not None else "TLS"
        return f"<ClientTls {self.cluster} {mtls} server_name={self.config.server_name or '-'}>"

    @property
    def options(self) -> list[tuple[str, Any]]:
        """Channel options: the name verified and sent as SNI and ``:authority``."""
        name = self.config.server_name
        if not name:
            return []
        return [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]

    def changed(self) -> bool:
        """Whether a file changed since these credentials, or the last ``changed()``, saw it."""
        seen = _signature(self._paths)
        if seen == self._seen:
            return False
        self._seen = seen
        return True

    def reload(self) -> ClientTls | None:
        """New credentials from the files, or None (logged, naming the file) if they are bad."""
        try:
            renewed = ClientTls(self.cluster, self.config, self.state)
        except TlsFileError as exc:
            self.state.reloaded(False)
            log.error(
                "backend TLS reload failed, keeping the current channels",
                extra=fields(cluster=self.cluster, key=exc.key, file=exc.path, reason=exc.reason),
            )
            return None
        renewed._seen = self._seen
        self.state.reloaded(True)
        log.info("backend TLS reloaded", extra=fields(cluster=self.cluster))
        return renewed


# -- start-time checks -------------------------------------------------------------------------


def check_config(config: Config) -> list[str]:
    """Load every TLS file ``config`` names; raise ``ConfigError`` naming key and file.

    Returns the warnings (certificates that expire within 7 days). For
    ``lbgw check-config`` and before ``lbgw serve`` starts anything.
    """
    warnings: list[str] = []
    try:
        for n, listener in enumerate(config.listeners):
            tls = listener.tls
            if tls is None:
                continue
            p = f"listeners[{n}].tls"
            load_pair(
                f"{p}.cert_file", tls.cert_file, f"{p}.key_file", tls.key_file, warnings=warnings
            )
            if tls.client_ca_file:
                load_ca(f"{p}.client_ca_file", tls.client_ca_file, warnings=warnings)
        for cluster in config.clusters:
            ctls = cluster.tls
            if ctls is None:
                continue
            p = f"clusters.{cluster.name}.tls"
            if ctls.ca_file:
                load_ca(f"{p}.ca_file", ctls.ca_file, warnings=warnings)
            if ctls.cert_file:
                load_pair(
                    f"{p}.cert_file",
                    ctls.cert_file,
                    f"{p}.key_file",
                    ctls.key_file,
                    warnings=warnings,
                )
    except TlsFileError as exc:
        raise as_config_error(config.source, exc) from None
    return warnings


def as_config_error(source: str, exc: TlsFileError) -> ConfigError:
    return ConfigError(source, exc.key, f"a usable file: {exc.reason}", exc.path)


# -- client identity ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Peer:
    sans: frozenset[str]
    described: str  # for a refusal
    xfcc: str


def _quoted(value: str) -> str:
    """An XFCC value, double-quoted when it holds ``,;="`` (Envoy's rule)."""
    if any(c in value for c in ',;="'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def xfcc_of(cert: x509.Certificate) -> str:
    """Envoy's x-forwarded-client-cert element: Hash, Subject (quoted), URI and DNS SANs."""
    parts = [f"Hash={cert.fingerprint(_SHA256).hex()}"]
    # RFC 4514 already escapes '"' (as '\\"'), so the quoted value parses as one.
    parts.append(f'Subject="{cert.subject.rfc4514_string()}"')
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ";".join(parts)
    parts += [f"URI={_quoted(u)}" for u in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    parts += [f"DNS={_quoted(d)}" for d in ext.get_values_for_type(x509.DNSName)]
    return ";".join(parts)


class ClientIdentity:
    """The verified client certificate of a call: the SAN allowlist and XFCC.

    Read from the call's auth context (``x509_pem_cert``, which gRPC sets
    after verifying the chain); each certificate is parsed once, then kept
    by its PEM (at most ``_MAX_PEERS``).
    """

    def __init__(self, allowed_sans: Sequence[str], forward: bool) -> None:
        self.allowed = frozenset(allowed_sans)
        self.forward = forward
        self._peers: collections.OrderedDict[bytes, _Peer] = collections.OrderedDict()

    def __repr__(self) -> str:
        return (
            f"<ClientIdentity allowed={sorted(self.allowed) or 'any'} forward={self.forward} "
            f"known={len(self._peers)}>"
        )

    def peer(self, context: _Context) -> _Peer | None:
        pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
        if pem is None:
            return None
        found = self._peers.get(pem)
        if found is None:
            cert = x509.load_pem_x509_certificate(pem)
            sans = _sans(cert)
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            found = _Peer(
                frozenset(sans),
                f"SANs {list(sans)} (CN {cn[0].value if cn else '-'!s})",
                xfcc_of(cert),
            )
            self._peers[pem] = found
            if len(self._peers) > _MAX_PEERS:
                self._peers.popitem(last=False)
        return found

    def refusal(self, context: _Context) -> str | None:
        """Why this call's client is not allowed, or None."""
        if not self.allowed:
            return None
        peer = self.peer(context)
        if peer is None:
            return "lbgw: no verified client certificate, and allowed_client_sans is set"
        if peer.sans & self.allowed:
            return None
        return (
            f"lbgw: client certificate with {peer.described} has no SAN in "
            f"allowed_client_sans {sorted(self.allowed)}"
        )

    def forwarded(
        self, context: _Context, metadata: tuple[tuple[str, str | bytes], ...] | None
    ) -> tuple[tuple[str, str | bytes], ...] | None:
        """The forwarded metadata with the client's XFCC added (when it has a certificate)."""
        peer = self.peer(context)
        if peer is None:
            return metadata
        return (*(metadata or ()), (XFCC, peer.xfcc))


def identity_settings(config: Config) -> tuple[tuple[str, ...], bool] | None:
    """The gateway's client-identity settings (the same on every listener): the allowed
    SANs and ``forward_client_cert``; None when neither is set."""
    tls = config.listeners[0].tls
    if tls is None or not (tls.allowed_client_sans or tls.forward_client_cert):
        return None
    return tuple(tls.allowed_client_sans), tls.forward_client_cert


def client_identity(config: Config) -> ClientIdentity | None:
    """What checks and forwards the client's identity (``identity_settings``), or None."""
    settings = identity_settings(config)
    return None if settings is None else ClientIdentity(*settings)


_Behaviour: TypeAlias = Callable[..., Any]


class IdentityInterceptor(aio.ServerInterceptor):
    """Refuses, with ``UNAUTHENTICATED`` and the reason, calls whose client is not allowed."""

    def __init__(self, identity: ClientIdentity) -> None:
        self.identity = identity

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        for attr in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, attr)
            if behaviour is not None:
                wrapped = _checked(behaviour, self.identity)
                return handler._replace(**{attr: wrapped})  # type: ignore[attr-defined,no-any-return]
        return handler


def _checked(behaviour: _Behaviour, identity: ClientIdentity) -> _Behaviour:
    refusal = identity.refusal
    code = grpc.StatusCode.UNAUTHENTICATED

    if inspect.isasyncgenfunction(behaviour):

        @functools.wraps(behaviour)
        async def checked_stream(request: Any, context: _Context) -> Any:
            why = refusal(context)
            if why is not None:
                await context.abort(code, why)
            async for response in behaviour(request, context):
                yield response

        return checked_stream

    @functools.wraps(behaviour)
    async def checked(request: Any, context: _Context) -> Any:
        why = refusal(context)
        if why is not None:
            await context.abort(code, why)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return checked


def describe(state: Mapping[tuple[str, str], Certificate]) -> list[dict[str, Any]]:
    """The certificates in use, for ``/server_info``."""
    return [
        {"kind": kind, "name": name, **cert.log_fields()} for (kind, name), cert in state.items()
    ]
