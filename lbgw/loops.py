"""The event loop lbgw runs on: uvloop when it can, else asyncio's own.

``[server] event_loop`` chooses: ``"auto"`` (the default) takes uvloop when
it can be imported and asyncio's loop otherwise; ``"uvloop"`` insists on
uvloop (a start error without it); ``"asyncio"`` never uses it. uvloop is a
default dependency on Linux (``uvloop; sys_platform == "linux"`` in
pyproject.toml), where lbgw is deployed; elsewhere ``"auto"`` falls back.

grpc.aio runs on any asyncio-compatible loop: its completion queue is
polled by a thread of its own ("poller" engine), which hands completions to
the loop through a socket the loop watches, so it does not depend on
asyncio's loop internals. The interop suite (tests/integration/
test_interop.py) passes on both loops.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from lbgw.exceptions import StartError

__all__ = ["loop_factory", "loop_name", "run"]

T = TypeVar("T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the loop ``choice`` (``auto``, ``asyncio``, ``uvloop``) names."""
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "uvloop":
            raise StartError(
                f"[server] event_loop = 'uvloop', but uvloop cannot be imported ({exc}); "
                "install uvloop, or set event_loop = 'auto' or 'asyncio'"
            ) from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a log line says lbgw runs on."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
