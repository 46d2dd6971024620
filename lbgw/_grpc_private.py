"""The one place lbgw touches grpc.aio's private API, and its check at start-up.

lbgw sends a request stream's messages through the call's core object,
grpc.aio's private ``Call._cython_call`` (a ``cygrpc._AioCall``), not
``call.write()``: when a send fails because the backend has already ended
the call (an early status, such as UNIMPLEMENTED or an interceptor's
refusal), grpc.aio's ``_write`` replaces the status the backend sent with
INTERNAL "Internal error from Core" (grpc/grpc#36066). Sending through the
core object and letting the failure go keeps the backend's own status, which
the response side then relays.

Private names can change in any grpcio release. ``check()`` runs when the
gateway starts and fails it with a message naming what is missing, so a
grpcio without them stops lbgw at start-up rather than failing every
request stream at its first message. ``pyproject.toml`` pins grpcio to the
minor versions the test suite has passed on; the integration tests of
request streams (every one of them) fail if a release changes these names.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from grpc._cython import cygrpc
from grpc.aio import _call

from lbgw.exceptions import StartError

__all__ = ["check", "send_message"]

_InternalError: Final[type[Exception]] = getattr(cygrpc, "InternalError", Exception)


def missing() -> list[str]:
    """The private names lbgw needs that this grpcio lacks."""
    lacking = []
    core_call = getattr(cygrpc, "_AioCall", None)
    if core_call is None:
        lacking.append("grpc._cython.cygrpc._AioCall")
    elif not hasattr(core_call, "send_serialized_message"):
        lacking.append("grpc._cython.cygrpc._AioCall.send_serialized_message")
    if not hasattr(cygrpc, "InternalError"):
        lacking.append("grpc._cython.cygrpc.InternalError")
    call_init = getattr(getattr(_call, "Call", None), "__init__", None)
    code = getattr(call_init, "__code__", None)
    if code is None or "_cython_call" not in code.co_names:
        lacking.append("grpc.aio._call.Call._cython_call")
    return lacking


def check() -> None:
    """Raise ``StartError`` if this grpcio lacks a private name lbgw needs."""
    lacking = missing()
    if lacking:
        raise StartError(
            f"grpcio {grpc.__version__} lacks {', '.join(lacking)}, which lbgw needs to "
            "forward request streams (see lbgw/_grpc_private.py); install a grpcio "
            "that lbgw's pyproject.toml admits"
        )


async def send_message(call: Any, message: bytes) -> bool:
    """Send one request message on ``call``; False once the call has ended."""
    try:
        await call._cython_call.send_serialized_message(message)
    except _InternalError:
        return False
    return True
