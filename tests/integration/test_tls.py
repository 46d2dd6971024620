"""TLS and mTLS through lbgw, on both sides, with real handshakes on loopback.

The test CA is made here (``tls_support.Pki``, trustme). Each refusal is
checked as the client sees it: the status code, its details, and that no
call reached the backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from lbgw.config import AdminConfig, Config, config_from_mapping
from lbgw.endpoints import State
from lbgw.exceptions import ConfigError
from lbgw.logs import _FIELDS
from lbgw.pb import echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar
from lbgw.tls import XFCC
from tests.integration.support import ALL_KINDS, echo_backends, request
from tests.integration.tls_support import (
    Pair,
    Pki,
    client_credentials,
    replace_file,
    serve_tls,
)

WAIT = 15.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def server_pair(pki: Pki) -> Pair:
    return pki.issue("localhost", "127.0.0.1", stem="server")


@pytest.fixture
def client_pair(pki: Pki) -> Pair:
    return pki.issue("client.example", "spiffe://example.org/client", stem="client")


@pytest.fixture
def backend_pair(pki: Pki) -> Pair:
    return pki.issue("backend.example", stem="backend")


def listener_tls(pki: Pki, server: Pair, *, mtls: bool = True, **more: Any) -> dict[str, Any]:
    tls: dict[str, Any] = {"cert_file": str(server.cert), "key_file": str(server.key)}
    if mtls:
        tls |= {"client_ca_file": str(pki.ca_file), "require_client_cert": True}
    return tls | more


def gateway_config(
    backends: list[str],
    listener: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    **extra: Any,
) -> Config:
    address: dict[str, Any] = {"address": "127.0.0.1:0"}
    if listener is not None:
        address["tls"] = listener
    c: dict[str, Any] = {"endpoints": backends, "methods": ALL_KINDS, **extra}
    if cluster is not None:
        c["tls"] = cluster
    return config_from_mapping({"listeners": [address], "clusters": {"echo": c}}, "<tls test>")


@pytest.fixture
async def tls_backend(pki: Pki, backend_pair: Pair) -> AsyncIterator[tuple[EchoBackend, str]]:
    """An echo backend that requires a client certificate from the test CA."""
    echo = EchoBackend("tls-backend")
    async with serve_tls(echo_registrar(echo), backend_pair, client_ca=pki.ca_file) as address:
        yield echo, address


def backend_tls(pki: Pki, client: Pair | None, name: str = "backend.example") -> dict[str, Any]:
    tls: dict[str, Any] = {"ca_file": str(pki.ca_file), "server_name": name}
    if client is not None:
        tls |= {"cert_file": str(client.cert), "key_file": str(client.key)}
    return tls


async def unary(address: str, credentials: grpc.ChannelCredentials | None, **kwargs: Any) -> Any:
    # A channel of its own connections: a refused handshake earlier (a subchannel in
    # backoff, shared through gRPC's global pool) must not answer for this call.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        aio.insecure_channel(address, options)
        if credentials is None
        else aio.secure_channel(address, credentials, options)
    )
    async with channel:
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        reply = await stub.Unary(request(message="hi"), timeout=WAIT, **kwargs)
        return reply


async def refused(
    address: str, credentials: grpc.ChannelCredentials | None, **kwargs: Any
) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await unary(address, credentials, **kwargs)
    return caught.value


# -- both sides, mTLS ------------------------------------------------------------------------


async def test_mtls_on_both_sides_forwards_and_strips_a_client_sent_xfcc(
    pki: Pki, server_pair: Pair, client_pair: Pair, tls_backend: tuple[EchoBackend, str]
) -> None:
    echo, backend = tls_backend
    cfg = gateway_config(
        [backend], listener_tls(pki, server_pair), backend_tls(pki, client_pair)
    )  # lbgw shows the backend the same client certificate it accepts: one test CA
    async with Gateway(cfg) as gw:
        creds = client_credentials(pki.ca_file, client_pair)
        reply = await unary(gw.addresses[0], creds, metadata=((XFCC, "By=spoofed;DNS=admin"),))
        assert reply.backend == "tls-backend"
    sent = dict(echo.seen.metadata[-1])
    assert XFCC not in sent  # forward_client_cert is off: the client's value is removed


async def test_a_client_sent_xfcc_is_removed_on_a_plaintext_listener_too() -> None:
    echo = EchoBackend("plain")
    async with echo_backends(echo) as [backend], Gateway(gateway_config([backend])) as gw:
        await unary(gw.addresses[0], None, metadata=((XFCC, "Hash=0;DNS=admin"),))
    assert XFCC not in dict(echo.seen.metadata[-1])


async def test_forward_client_cert_sends_the_verified_identity_in_envoy_format(
    pki: Pki, server_pair: Pair, client_pair: Pair
) -> None:
    echo = EchoBackend("plain")
    listener = listener_tls(pki, server_pair, forward_client_cert=True)
    async with echo_backends(echo) as [backend], Gateway(gateway_config([backend], listener)) as gw:
        creds = client_credentials(pki.ca_file, client_pair)
        await unary(gw.addresses[0], creds, metadata=((XFCC, "DNS=admin.example"),))
    values = [v for k, v in echo.seen.metadata[-1] if k == XFCC]
    assert len(values) == 1, values  # lbgw's own, never the client's
    xfcc = values[0]
    assert isinstance(xfcc, str)
    cert = x509.load_pem_x509_certificate(client_pair.cert.read_bytes())
    digest = cert.fingerprint(hashes.SHA256()).hex()
    parts = xfcc.split(";")
    assert parts[0] == f"Hash={digest}"
    assert parts[1] == f'Subject="{cert.subject.rfc4514_string()}"'
    assert "URI=spiffe://example.org/client" in parts
    assert "DNS=client.example" in parts
    assert "admin.example" not in xfcc


# -- refusals, as the client sees them ---------------------------------------------------------


async def test_refusals_at_the_handshake_and_by_san(
    tmp_path: Path, pki: Pki, server_pair: Pair, client_pair: Pair
) -> None:
    echo = EchoBackend("plain")
    stranger = Pki(tmp_path, "other-ca").issue("client.example", stem="stranger")
    outsider = pki.issue("intruder.example", stem="outsider")
    listener = listener_tls(pki, server_pair, allowed_client_sans=["client.example"])
    async with echo_backends(echo) as [backend], Gateway(gateway_config([backend], listener)) as gw:
        address = gw.addresses[0]
        # A plaintext client: its HTTP/2 preface is not a TLS ClientHello.
        plain = await refused(address, None)
        assert plain.code() is grpc.StatusCode.UNAVAILABLE
        # TLS without a client certificate, under require_client_cert.
        anonymous = await refused(address, client_credentials(pki.ca_file))
        assert anonymous.code() is grpc.StatusCode.UNAVAILABLE
        # A client certificate from another CA.
        foreign = await refused(address, client_credentials(pki.ca_file, stranger))
        assert foreign.code() is grpc.StatusCode.UNAVAILABLE
        assert echo.seen.calls == 0  # none of them got a call through
        # A certificate from the right CA, with no SAN in the allowlist.
        outside = await refused(address, client_credentials(pki.ca_file, outsider))
        assert outside.code() is grpc.StatusCode.UNAUTHENTICATED
        details = outside.details() or ""
        assert "intruder.example" in details and "allowed_client_sans" in details
        assert "client.example" in details
        # The allowed client gets through.
        reply = await unary(address, client_credentials(pki.ca_file, client_pair))
        assert reply.backend == "plain"
    assert echo.seen.calls == 1


# -- backends ----------------------------------------------------------------------------------


async def test_a_backend_certificate_with_the_wrong_name_is_unavailable_naming_endpoint_and_reason(
    pki: Pki, client_pair: Pair, tls_backend: tuple[EchoBackend, str]
) -> None:
    echo, backend = tls_backend
    cfg = gateway_config(
        [backend],
        cluster=backend_tls(pki, client_pair, name="wrong.example"),
        health_check={"mode": "none"},
    )
    async with Gateway(cfg) as gw:
        error = await refused(gw.addresses[0], None)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    details = error.details() or ""
    assert backend in details, details
    assert "Hostname Verification Check failed" in details, details
    assert echo.seen.calls == 0


async def test_a_backend_tls_failure_counts_toward_passive_ejection(
    pki: Pki, client_pair: Pair, tls_backend: tuple[EchoBackend, str]
) -> None:
    """An endpoint whose certificate names another host fails its calls and is ejected."""
    good, address = tls_backend
    impostor = EchoBackend("impostor")
    wrong_name = pki.issue("impostor.example", stem="impostor")
    async with serve_tls(echo_registrar(impostor), wrong_name, client_ca=pki.ca_file) as bad:
        cfg = gateway_config(
            [address, bad],
            cluster=backend_tls(pki, client_pair),
            health_check={"mode": "none"},
            outlier_detection={"consecutive_failures": 2, "max_ejection_percent": 50},
        )
        async with Gateway(cfg) as gw:
            # Each call that picks the impostor fails its TLS check and is retried on the other.
            replies = [(await unary(gw.addresses[0], None)).backend for _ in range(6)]
            states = {e.address: e.state for e in gw.clusters["echo"].endpoints}
    assert set(replies) == {"tls-backend"}
    assert states == {address: State.SERVING, bad: State.EJECTED}
    assert impostor.seen.calls == 0 and good.seen.calls == 6


async def test_a_backend_requiring_mtls_works_with_the_client_certificate_only(
    pki: Pki, client_pair: Pair, tls_backend: tuple[EchoBackend, str]
) -> None:
    echo, backend = tls_backend
    with_cert = gateway_config([backend], cluster=backend_tls(pki, client_pair))
    async with Gateway(with_cert) as gw:
        assert (await unary(gw.addresses[0], None)).backend == "tls-backend"
    without = gateway_config(
        [backend], cluster=backend_tls(pki, None), health_check={"mode": "none"}
    )
    async with Gateway(without) as gw:
        error = await refused(gw.addresses[0], None)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert backend in (error.details() or "")
    assert echo.seen.calls == 1


async def test_changed_backend_tls_files_give_new_channels(
    tmp_path: Path, pki: Pki, client_pair: Pair
) -> None:
    """The cluster trusts another CA at first; once its ca_file holds the right one, calls pass."""
    other = Pki(tmp_path, "other-ca")
    ca_file = tmp_path / "cluster-ca.pem"
    ca_file.write_bytes(other.ca_pem)
    echo = EchoBackend("tls-backend")
    backend_pair = pki.issue("backend.example", stem="backend")
    async with serve_tls(echo_registrar(echo), backend_pair) as backend:
        cluster = {"ca_file": str(ca_file), "server_name": "backend.example"}
        cfg = gateway_config([backend], cluster=cluster, health_check={"mode": "none"})
        async with Gateway(cfg, tls_poll_interval=0.1) as gw:
            first = gw.clusters["echo"].endpoints[0].backend
            error = await refused(gw.addresses[0], None)
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            replace_file(ca_file, pki.ca_pem)
            async with asyncio.timeout(WAIT):
                while gw.clusters["echo"].endpoints[0].backend is first:
                    await asyncio.sleep(0.05)
            assert (await unary(gw.addresses[0], None)).backend == "tls-backend"
            assert gw.tls.reload_counts() == {"ok": 1, "error": 0}


# -- start-time errors and the log -------------------------------------------------------------


async def test_start_refuses_bad_files_naming_key_and_file(
    tmp_path: Path, pki: Pki, server_pair: Pair
) -> None:
    other = pki.issue("localhost", stem="other")
    expired = pki.issue(
        "localhost",
        stem="expired",
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.UTC),
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"cert_file": str(tmp_path / "missing.pem")}, "cert_file", "cannot read"),
        ({"key_file": str(other.key)}, "key_file", "does not match"),
        ({"cert_file": str(expired.cert), "key_file": str(expired.key)}, "cert_file", "expired"),
        ({"cert_file": str(garbage)}, "cert_file", "not a PEM certificate"),
    ]
    async with echo_backends(EchoBackend("a")) as [backend]:
        for change, key, reason in cases:
            listener = listener_tls(pki, server_pair, mtls=False) | change
            gateway = Gateway(gateway_config([backend], listener))
            with pytest.raises(ConfigError) as caught:
                await gateway.start()
            message = str(caught.value)
            assert f"listeners[0].tls.{key}" in message, message
            assert str(listener[key]) in message and reason in message, message


async def test_each_certificate_is_logged_at_start(
    pki: Pki, server_pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    async with echo_backends(EchoBackend("a")) as [backend]:
        cfg = gateway_config([backend], listener_tls(pki, server_pair, mtls=False))
        with caplog.at_level(logging.INFO, logger="lbgw.tls"):
            async with Gateway(cfg) as gw:
                expiry = gw.tls.expiry_timestamps()
    logged = [vars(r)[_FIELDS] for r in caplog.records if r.getMessage() == "certificate"]
    assert len(logged) == 1
    cert = x509.load_pem_x509_certificate(server_pair.cert.read_bytes())
    assert logged[0]["sans"] == ["localhost", "127.0.0.1"]
    assert logged[0]["serial"] == f"{cert.serial_number:x}"
    assert logged[0]["not_after"] == cert.not_valid_after_utc.isoformat()
    assert expiry == {("listener", "127.0.0.1:0"): cert.not_valid_after_utc.timestamp()}


# -- hot reload (issue 16) ---------------------------------------------------------------------


async def test_a_reload_turns_tls_on_for_the_listener_and_the_backends(
    pki: Pki, server_pair: Pair, client_pair: Pair, tls_backend: tuple[EchoBackend, str]
) -> None:
    """Plaintext on both sides, then a reload to mTLS on both: the port stays, TLS is in force."""
    _, tls_address = tls_backend
    async with echo_backends(EchoBackend("plain")) as plain:
        before = gateway_config(plain, health_check={"mode": "none"})
        async with Gateway(before, tls_poll_interval=0.1) as gw:
            address = gw.addresses[0]
            assert (await unary(address, None)).backend == "plain"
            after = gateway_config(
                [tls_address],
                listener_tls(pki, server_pair),
                backend_tls(pki, client_pair),
                health_check={"mode": "none"},
            )
            change = await gw.reload(after)
            assert [c.name for c in change.rebuilt] == ["echo"] and change.listeners
            assert gw.addresses == [address]  # the same port, served anew
            # The handover: for a moment both servers listen on the port (SO_REUSEPORT),
            # and a connection queued on the old one as it closes is reset. A client
            # waiting for ready connects again; the test waits the moment out too.
            await asyncio.sleep(0.3)
            creds = client_credentials(pki.ca_file, client_pair)
            assert (await unary(address, creds, wait_for_ready=True)).backend == "tls-backend"
            error = await refused(address, None)  # plaintext is no longer spoken
            assert error.code() is grpc.StatusCode.UNAVAILABLE
            assert gw.cluster_tls["echo"].credentials is not None
            # And back: a bad file in a reload is refused, naming it; TLS stays.
            broken = gateway_config(
                [tls_address],
                listener_tls(pki, Pair(server_pair.cert, pki.ca_file)),
                backend_tls(pki, client_pair),
                health_check={"mode": "none"},
            )
            in_use = set(gw.tls.in_use())
            assert in_use == {("listener", "127.0.0.1:0"), ("cluster", "echo")}
            with pytest.raises(ConfigError) as caught:
                await gw.reload(broken)
            assert "listeners[0].tls.key_file" in str(caught.value)
            assert str(pki.ca_file) in str(caught.value)
            assert (await unary(address, creds)).backend == "tls-backend"
            assert set(gw.tls.in_use()) == in_use  # the refused reload's certificates: gone
            # Back to plaintext: the certificates are no longer shown, nor their expiry.
            await gw.reload(before)
            await asyncio.sleep(0.3)
            assert (await unary(address, None, wait_for_ready=True)).backend == "plain"
            assert gw.tls.in_use() == {}
            # Each reload replaced the proxy; only the last one follows the cluster's kinds.
            assert len(gw.clusters["echo"]._kind_listeners) == 1


async def test_the_admin_port_shows_the_certificates_their_expiry_and_reloads(
    tmp_path: Path, pki: Pki, server_pair: Pair, client_pair: Pair
) -> None:
    ca_file = tmp_path / "cluster-ca.pem"
    ca_file.write_bytes(Pki(tmp_path, "other-ca").ca_pem)  # the wrong CA, at first
    echo = EchoBackend("tls-backend")
    async with serve_tls(echo_registrar(echo), pki.issue("backend.example")) as backend:
        cfg = dataclasses.replace(
            gateway_config(
                [backend],
                listener_tls(pki, server_pair, mtls=False),
                {**backend_tls(pki, client_pair), "ca_file": str(ca_file)},
                health_check={"mode": "none"},
            ),
            admin=AdminConfig(address="127.0.0.1:0"),
        )
        async with Gateway(cfg, tls_poll_interval=0.1) as gw:
            assert gw.admin_server is not None
            url = f"http://{gw.admin_server.address}"
            replace_file(ca_file, pki.ca_pem)
            async with asyncio.timeout(WAIT):
                while gw.tls.reload_counts()["ok"] == 0:
                    await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/metrics") as response:
                    text = await response.text()
                async with session.get(url + "/server_info") as response:
                    info = await response.json()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    listener = x509.load_pem_x509_certificate(server_pair.cert.read_bytes())
    expiry = "lbgw_tls_cert_expiry_timestamp_seconds"
    address = cfg.listeners[0].address
    assert found[expiry, (("cluster", ""), ("listener", address))] == pytest.approx(
        listener.not_valid_after_utc.timestamp()
    )
    client = x509.load_pem_x509_certificate(client_pair.cert.read_bytes())  # mTLS to backends
    assert found[expiry, (("cluster", "echo"), ("listener", ""))] == pytest.approx(
        client.not_valid_after_utc.timestamp()
    )
    assert found["lbgw_tls_reload_total", (("result", "ok"),)] == 1
    assert found["lbgw_tls_reload_total", (("result", "error"),)] == 0
    names = {(c["kind"], c["name"]) for c in info["certificates"]}
    assert names == {("listener", address), ("cluster", "echo")}
    shown = next(c for c in info["certificates"] if c["kind"] == "listener")
    assert shown["sans"] == ["localhost", "127.0.0.1"]
