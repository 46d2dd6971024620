"""``[server] event_loop``: which loop each choice makes, and uvloop missing."""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

import pytest

from lbgw import loops
from lbgw.exceptions import StartError


def _made(choice: str) -> str:
    loop = loops.loop_factory(choice)()
    try:
        return loops.loop_name(loop)
    finally:
        loop.close()


def test_each_choice_makes_its_loop() -> None:
    assert _made("asyncio") == "asyncio"
    assert _made("uvloop") == "uvloop"
    assert _made("auto") == "uvloop"  # uvloop is a dependency on Linux


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_start_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def no_uvloop(name: str, package: str | None = None) -> ModuleType:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", no_uvloop)
    assert loops.loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(StartError, match=r"event_loop = 'uvloop', but uvloop cannot be imported"):
        loops.loop_factory("uvloop")


def test_run_returns_the_coroutines_result() -> None:
    async def answer() -> str:
        return loops.loop_name(asyncio.get_running_loop())

    assert loops.run(answer(), "uvloop") == "uvloop"
    assert loops.run(answer(), "asyncio") == "asyncio"
