"""A listener's certificate replaced on disk while 8 callers run: no restart, no lost call.

The client side checks which certificate a new connection is shown (its
serial, read from a TLS handshake with Python's ``ssl``); the callers open
new connections all along, so handshakes happen during the rotation too.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from grpc import aio

from lbgw.config import config_from_mapping
from lbgw.logs import _FIELDS
from lbgw.pb import echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.testing import EchoBackend
from tests.integration.support import ALL_KINDS, echo_backends, request
from tests.integration.tls_support import (
    Pki,
    client_credentials,
    presented_serial,
    replace_file,
)

WAIT = 20.0
CALLERS = 8
CALLS_PER_CONNECTION = 5


async def _caller(
    address: str, ca: Path, stop: asyncio.Event, ok: list[int], errors: list[str]
) -> None:
    """Unary calls until ``stop``, on a new connection every few calls."""
    credentials = client_credentials(ca)
    while not stop.is_set():
        async with aio.secure_channel(address, credentials) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(CALLS_PER_CONNECTION):
                try:
                    await stub.Unary(request(message="r"), timeout=WAIT)
                    ok[0] += 1
                except aio.AioRpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")


async def _serial_becomes(address: str, ca: Path, serial: int) -> None:
    async with asyncio.timeout(WAIT):
        while await asyncio.to_thread(presented_serial, address, ca) != serial:
            await asyncio.sleep(0.05)


async def test_rotation_under_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pki = Pki(tmp_path)
    first = pki.issue("localhost", "127.0.0.1", stem="live")  # the files the listener reads
    second = pki.issue("localhost", "127.0.0.1", stem="next")
    async with echo_backends(EchoBackend("b", delay=0.02)) as [backend]:
        config = config_from_mapping(
            {
                "listeners": [
                    {
                        "address": "127.0.0.1:0",
                        "tls": {"cert_file": str(first.cert), "key_file": str(first.key)},
                    }
                ],
                "clusters": {"echo": {"endpoints": [backend], "methods": ALL_KINDS}},
            },
            source="<rotation test>",
        )
        old_serial = first.serial
        async with Gateway(config) as gw:
            address = gw.addresses[0]
            assert await asyncio.to_thread(presented_serial, address, pki.ca_file) == old_serial
            stop = asyncio.Event()
            ok: list[int] = [0]
            errors: list[str] = []
            callers = [
                asyncio.ensure_future(_caller(address, pki.ca_file, stop, ok, errors))
                for _ in range(CALLERS)
            ]
            try:
                async with asyncio.timeout(WAIT):
                    while ok[0] < 50:
                        await asyncio.sleep(0.02)
                # The key first, then the certificate: each file replaced at once.
                new_serial = second.serial
                with caplog.at_level(logging.INFO, logger="lbgw.tls"):
                    replace_file(first.key, second.key.read_bytes())
                    replace_file(first.cert, second.cert.read_bytes())
                    await _serial_becomes(address, pki.ca_file, new_serial)
                    during = ok[0]
                    async with asyncio.timeout(WAIT):
                        while ok[0] < during + 50:
                            await asyncio.sleep(0.02)
                    # A broken replacement: the new certificate stays in use.
                    replace_file(first.cert, b"-----BEGIN CERTIFICATE-----\nbroken\n")
                    async with asyncio.timeout(WAIT):
                        while not _failed_reloads(caplog, first.cert):
                            assert (
                                await asyncio.to_thread(presented_serial, address, pki.ca_file)
                                == new_serial
                            )
                            await asyncio.sleep(0.05)
                    after = ok[0]
                    async with asyncio.timeout(WAIT):
                        while ok[0] < after + 20:
                            await asyncio.sleep(0.02)
            finally:
                stop.set()
                await asyncio.gather(*callers)
            assert errors == []  # 0 lost: every call made before, during and after completed
            reloads = gw.tls.reload_counts()
            assert reloads["ok"] >= 1 and reloads["error"] >= 1
            reloaded = [
                vars(r)[_FIELDS] for r in caplog.records if r.getMessage() == "certificate reloaded"
            ]
            assert any(f["serial"] == f"{new_serial:x}" for f in reloaded)


def _failed_reloads(caplog: pytest.LogCaptureFixture, cert: Path) -> list[dict[str, str]]:
    found = []
    for record in caplog.records:
        f = vars(record).get(_FIELDS, {})
        if record.levelno == logging.ERROR and f.get("file") == str(cert):
            assert "not a PEM certificate" in f["reason"]
            assert f["key"] == "listeners[0].tls.cert_file"
            found.append(f)
    return found
