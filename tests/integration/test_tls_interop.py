"""The gRPC interop cases through lbgw with mTLS on both sides.

The client presents a certificate to an lbgw listener that requires one;
lbgw presents its own to an interop backend that requires one. The cases
are ``test_interop.py``'s, collected here against this module's fixtures
(``backend``, ``target``, ``channel``), so each case runs through TLS with
the method kinds declared (``kinds``) and without (``fallback``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc import aio

from lbgw.config import config_from_mapping
from lbgw.server import Gateway
from tests.integration.interop_service import InteropService, interop_registrar
from tests.integration.test_interop import (
    gateway_config,
    service,
    stub,
    test_cancel_after_begin,
    test_cancel_after_first_response,
    test_client_streaming,
    test_custom_metadata_full_duplex,
    test_custom_metadata_unary,
    test_empty_stream,
    test_empty_unary,
    test_large_unary,
    test_ping_pong,
    test_server_streaming,
    test_status_code_and_message_full_duplex,
    test_status_code_and_message_unary,
    test_timeout_on_sleeping_server,
    test_unimplemented_method,
    test_unimplemented_service,
)
from tests.integration.tls_support import Pair, Pki, client_credentials, serve_tls

__all__ = [
    "service",
    "stub",
    "test_cancel_after_begin",
    "test_cancel_after_first_response",
    "test_client_streaming",
    "test_custom_metadata_full_duplex",
    "test_custom_metadata_unary",
    "test_empty_stream",
    "test_empty_unary",
    "test_large_unary",
    "test_ping_pong",
    "test_server_streaming",
    "test_status_code_and_message_full_duplex",
    "test_status_code_and_message_unary",
    "test_timeout_on_sleeping_server",
    "test_unimplemented_method",
    "test_unimplemented_service",
]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
def client_pair(pki: Pki) -> Pair:
    return pki.issue("client.example", stem="client")


@pytest.fixture
async def backend(service: InteropService, pki: Pki) -> AsyncIterator[str]:
    """The interop service over TLS, requiring a client certificate from the test CA."""
    pair = pki.issue("interop.example", stem="backend")
    async with serve_tls(interop_registrar(service), pair, client_ca=pki.ca_file) as address:
        yield address


@pytest.fixture(params=["kinds", "fallback"])
async def target(
    request: pytest.FixtureRequest, backend: str, pki: Pki, client_pair: Pair
) -> AsyncIterator[str]:
    """An lbgw listener requiring client certificates, forwarding over mTLS."""
    server = pki.issue("localhost", "127.0.0.1", stem="listener")
    mapping = gateway_config(backend, kinds=request.param == "kinds")
    mapping["listeners"][0]["tls"] = {
        "cert_file": str(server.cert),
        "key_file": str(server.key),
        "client_ca_file": str(pki.ca_file),
        "require_client_cert": True,
    }
    lbgw_client = pki.issue("lbgw.example", stem="lbgw-client")
    mapping["clusters"]["interop"]["tls"] = {
        "ca_file": str(pki.ca_file),
        "cert_file": str(lbgw_client.cert),
        "key_file": str(lbgw_client.key),
        "server_name": "interop.example",
    }
    config = config_from_mapping(mapping, source="<tls interop test>")
    async with Gateway(config) as gateway:
        yield gateway.addresses[0]


@pytest.fixture
async def channel(target: str, pki: Pki, client_pair: Pair) -> AsyncIterator[aio.Channel]:
    async with aio.secure_channel(target, client_credentials(pki.ca_file, client_pair)) as channel:
        yield channel
