"""Method kinds without flags: from reflection (at start-up, or later), and from descriptor sets.

After each, the method is served by its fast-path handler: the handler form
lbgw gives gRPC (``request_streaming``, ``response_streaming``) is the
method's own, not ``stream_stream``. Backends are real grpc.aio servers on
127.0.0.1; the descriptor set is written by the real ``protoc``
(grpcio-tools).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import grpc
import pytest
from grpc import aio
from grpc_tools import protoc

from lbgw.config import MethodKind
from lbgw.exceptions import ConfigError
from lbgw.logs import _FIELDS
from lbgw.server import Gateway
from lbgw.testing import EchoBackend, echo_registrar, serve
from tests.integration.support import ALL_KINDS, UNARY, config, request, through

NO_CHECKS = {"health_check": {"mode": "none"}}
ECHO_KINDS = {m: MethodKind(k) for m, k in ALL_KINDS.items()}
PROTOS = Path(__file__).parents[2] / "protos"


def _form(gateway: Gateway, method: str) -> tuple[bool, bool]:
    """(request_streaming, response_streaming) of the handler lbgw serves ``method`` with."""
    assert gateway.proxy is not None
    details = cast(grpc.HandlerCallDetails, SimpleNamespace(method=method))
    handler = gateway.proxy.service(details)
    assert handler is not None
    return handler.request_streaming, handler.response_streaming


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def protoset(tmp_path: Path) -> str:
    """The echo service's descriptor set, as ``protoc --include_imports --descriptor_set_out``."""
    out = tmp_path / "echo.protoset"
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            str(PROTOS / "lbgw" / "pb" / "echo.proto"),
        ]
    )
    assert code == 0
    return str(out)


async def test_kinds_from_reflection_at_start_up_take_the_fast_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = EchoBackend("a")
    caplog.set_level(logging.INFO, logger="lbgw")
    async with (
        serve(echo_registrar(backend, reflection=True)) as addr,
        # No methods, no reflection key: reflection is on by default.
        through(config([addr], methods={})) as t,
    ):
        cluster = t.gateway.clusters["echo"]
        assert cluster.kinds == ECHO_KINDS
        assert cluster.kind_sources == {"config": 0, "descriptor_sets": 0, "reflection": 4}
        assert _form(t.gateway, UNARY) == (False, False)
        assert _form(t.gateway, "/lbgw.echo.v1.Echo/ServerStream") == (False, True)
        assert (await t.stub.Unary(request(message="r"), timeout=5)).message == "r"
    # The log says, per cluster, how many kinds are known and from where.
    (line,) = [r for r in caplog.records if r.getMessage() == "cluster"]
    assert getattr(line, _FIELDS)["method_kinds"] == {
        "config": 0,
        "descriptor_sets": 0,
        "reflection": 4,
    }


async def test_no_reflection_leaves_unknown_kinds_on_stream_stream() -> None:
    backend = EchoBackend("a")
    async with (
        serve(echo_registrar(backend, reflection=True)) as addr,
        through(config([addr], methods={}, cluster={"reflection": False})) as t,
    ):
        assert t.gateway.clusters["echo"].kinds == {}
        assert _form(t.gateway, UNARY) == (True, True)
        assert (await t.stub.Unary(request(message="s"), timeout=5)).message == "s"


async def test_a_backend_down_at_start_up_is_asked_when_it_comes_up() -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    async with through(config([address], methods={}, cluster=NO_CHECKS)) as t:
        cluster = t.gateway.clusters["echo"]
        assert cluster.kinds == {}
        assert cluster.learner.asking == [address]  # asked again in the background
        assert _form(t.gateway, UNARY) == (True, True)
        handler_before = t.gateway.proxy.service(  # type: ignore[union-attr]
            cast(grpc.HandlerCallDetails, SimpleNamespace(method=UNARY))
        )
        server = aio.server()
        echo_registrar(EchoBackend("late"), reflection=True)(server)
        assert server.add_insecure_port(address) == port
        await server.start()
        try:
            async with asyncio.timeout(30):
                while cluster.kinds != ECHO_KINDS:
                    await asyncio.sleep(0.05)
            assert cluster.learner.asking == []
            # The calls that follow take the fast path; the LRU no longer holds the old handler.
            assert _form(t.gateway, UNARY) == (False, False)
            assert t.gateway.proxy is not None
            assert UNARY not in t.gateway.proxy._recent
            assert handler_before is not None and handler_before.request_streaming
            assert (await t.stub.Unary(request(message="u"), timeout=10)).backend == "late"
        finally:
            await server.stop(0)


async def test_kinds_from_a_descriptor_set_take_the_fast_path(protoset: str) -> None:
    backend = EchoBackend("a")
    async with serve(echo_registrar(backend)) as addr:  # no reflection served
        cfg = config([addr], methods={}, cluster={"descriptor_sets": [protoset]})
        async with through(cfg) as t:
            cluster = t.gateway.clusters["echo"]
            assert cluster.kinds == ECHO_KINDS
            assert cluster.kind_sources == {"config": 0, "descriptor_sets": 4, "reflection": 0}
            assert _form(t.gateway, UNARY) == (False, False)
            assert _form(t.gateway, "/lbgw.echo.v1.Echo/Bidi") == (True, True)
            assert (await t.stub.Unary(request(message="d"), timeout=5)).message == "d"


async def test_config_then_descriptor_sets_then_reflection(protoset: str) -> None:
    backend = EchoBackend("a")
    async with serve(echo_registrar(backend, reflection=True)) as addr:
        # The config says Unary is bidi: the config wins over the descriptor set and reflection.
        cfg = config(
            [addr],
            methods={UNARY: "bidi_streaming"},
            cluster={"descriptor_sets": [protoset]},
        )
        async with through(cfg) as t:
            cluster = t.gateway.clusters["echo"]
            assert cluster.kinds[UNARY] is MethodKind.BIDI_STREAMING
            assert cluster.kinds["/lbgw.echo.v1.Echo/ClientStream"] is MethodKind.CLIENT_STREAMING
            assert cluster.kind_sources == {"config": 1, "descriptor_sets": 3, "reflection": 0}


def test_a_bad_descriptor_set_is_a_start_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.protoset"
    bad.write_bytes(b"\xff\xff\xff not a descriptor set")
    missing = tmp_path / "missing.protoset"
    for path, why in ((bad, "not a FileDescriptorSet"), (missing, "cannot read it")):
        with pytest.raises(ConfigError) as info:
            config(["127.0.0.1:1"], methods={}, cluster={"descriptor_sets": [str(path)]})
        assert "clusters.echo.descriptor_sets[0]" in str(info.value)
        assert f"{path}: {why}" in str(info.value)
