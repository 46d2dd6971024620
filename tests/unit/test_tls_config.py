"""The TLS settings in config: what is accepted, and what is refused with which key."""

from __future__ import annotations

from typing import Any

import pytest

from lbgw.config import ClusterTlsConfig, ListenerTlsConfig, config_from_mapping
from lbgw.exceptions import ConfigError
from lbgw.tls import xfcc_of

CERT = {"cert_file": "s.pem", "key_file": "s.key"}
MTLS = {**CERT, "client_ca_file": "ca.pem", "require_client_cert": True}


def load(listeners: list[dict[str, Any]], cluster_tls: dict[str, Any] | None = None) -> Any:
    cluster: dict[str, Any] = {"endpoints": ["127.0.0.1:1"]}
    if cluster_tls is not None:
        cluster["tls"] = cluster_tls
    return config_from_mapping({"listeners": listeners, "clusters": {"c": cluster}}, "t.toml")


def refused(listeners: list[dict[str, Any]], cluster_tls: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(listeners, cluster_tls)
    return str(caught.value)


def test_listener_and_cluster_tls_are_read() -> None:
    config = load(
        [{"address": "127.0.0.1:0", "tls": {**MTLS, "allowed_client_sans": ["a.example"]}}],
        {"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "c.key", "server_name": "b"},
    )
    assert config.listeners[0].tls == ListenerTlsConfig(
        "s.pem", "s.key", "ca.pem", True, ("a.example",), False
    )
    assert config.clusters[0].tls == ClusterTlsConfig("ca.pem", "c.pem", "c.key", "b")
    assert load([{"address": "127.0.0.1:0"}]).listeners[0].tls is None


@pytest.mark.parametrize(
    ("tls", "key", "expected"),
    [
        ({"key_file": "k"}, "cert_file", "the path of a PEM file"),
        ({**CERT, "client_ca_file": "ca.pem"}, "require_client_cert", "true with client_ca_file"),
        ({**CERT, "require_client_cert": True}, "client_ca_file", "the CA that client"),
        ({**CERT, "allowed_client_sans": ["a"]}, "allowed_client_sans", "client certificates"),
        ({**CERT, "forward_client_cert": True}, "forward_client_cert", "client certificates"),
        ({**MTLS, "allowed_client_sans": ["two words"]}, "allowed_client_sans[0]", "a subject"),
        ({**CERT, "ciphers": "x"}, "ciphers", "one of the keys"),
    ],
)
def test_listener_tls_refusals_name_the_key(tls: dict[str, Any], key: str, expected: str) -> None:
    message = refused([{"address": "127.0.0.1:0", "tls": tls}])
    assert f"t.toml: listeners[0].tls.{key}: expected {expected}" in message


def test_client_identity_is_the_same_on_every_listener() -> None:
    message = refused(
        [
            {"address": "127.0.0.1:0", "tls": {**MTLS, "allowed_client_sans": ["a"]}},
            {"address": "127.0.0.1:0"},
        ]
    )
    assert "listeners[1].tls: expected the same allowed_client_sans on every listener" in message


def test_a_client_certificate_needs_its_key() -> None:
    message = refused([{"address": "127.0.0.1:0"}], {"cert_file": "c.pem"})
    assert "clusters.c.tls.key_file: expected key_file as well as cert_file" in message


def test_xfcc_quotes_values_as_envoy_does() -> None:
    import datetime  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "client"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Acme, "Inc"'),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("a.example"), x509.UniformResourceIdentifier("spiffe://x/y;z")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    parts = xfcc_of(cert).split(";", 2)
    assert parts[0] == f"Hash={cert.fingerprint(hashes.SHA256()).hex()}"
    assert parts[1] == r'Subject="O=Acme\, \"Inc\",CN=client"'
    assert parts[2] == 'URI="spiffe://x/y;z";DNS=a.example'
