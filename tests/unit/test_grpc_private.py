"""The private grpc.aio API lbgw relies on is checked when the gateway starts."""

from __future__ import annotations

import grpc
import pytest
from grpc._cython import cygrpc
from grpc.aio import _call

from lbgw import _grpc_private
from lbgw.config import config_from_mapping
from lbgw.exceptions import StartError
from lbgw.server import Gateway

CONFIG = {
    "listeners": [{"address": "127.0.0.1:0"}],
    "clusters": {"c": {"endpoints": ["127.0.0.1:1"], "health_check": {"mode": "none"}}},
}


def test_this_grpcio_has_every_private_name_lbgw_needs() -> None:
    assert _grpc_private.missing() == []
    _grpc_private.check()


def test_a_grpcio_without_the_core_call_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cygrpc, "_AioCall")
    assert _grpc_private.missing() == ["grpc._cython.cygrpc._AioCall"]
    with pytest.raises(StartError, match=rf"grpcio {grpc.__version__} lacks .*_AioCall"):
        _grpc_private.check()


def test_a_call_object_without_its_core_call_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def init(self: object) -> None:  # a Call that keeps its core object elsewhere
        self._core = None  # type: ignore[attr-defined]

    monkeypatch.setattr(_call.Call, "__init__", init)
    assert _grpc_private.missing() == ["grpc.aio._call.Call._cython_call"]


async def test_the_gateway_does_not_start_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(cygrpc, "InternalError")
    gateway = Gateway(config_from_mapping(CONFIG, "<test>"))
    with pytest.raises(StartError, match=r"lacks .*InternalError.*pyproject\.toml"):
        await gateway.start()
    assert gateway.addresses == []  # nothing was bound
