"""lbgw's exceptions: one shallow tree, grouped by where the error comes from.

``ConfigError`` is raised while a config is loaded, before anything runs;
``StartError`` when the gateway cannot start (a listener cannot be bound).
``IllegalTransitionError`` is a bug: an endpoint state that an event does not
admit (``endpoints.TRANSITIONS``).
``GatewayError`` and its subclasses are the answers lbgw itself gives a call;
each carries the ``grpc.StatusCode`` it becomes on the wire. A status that a
backend returns is never one of these: it passes through unchanged.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final

import grpc

__all__ = [
    "CircuitBreakerOpenError",
    "ConfigError",
    "EndpointUnreachableError",
    "GatewayError",
    "IllegalTransitionError",
    "LbgwError",
    "NoEligibleEndpointError",
    "NoRouteError",
    "OverloadedError",
    "RequestHeaderTimeoutError",
    "StartError",
]


class LbgwError(Exception):
    """Base of every error lbgw raises."""


class ConfigError(LbgwError, ValueError):
    """A config that cannot be used: names the file, the key and what was expected."""

    def __init__(self, source: str, key: str, expected: str, got: object = None) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        self.got = got
        message = f"{source}: {_one_line(key)}: expected {expected}"
        if got is not None:
            message += f", got {_cut(repr(got))}"
        super().__init__(message)


#: A value longer than this is cut in an error message.
SHOWN_CHARACTERS: Final = 80


def _cut(text: str) -> str:
    """``text``, cut to ``SHOWN_CHARACTERS`` with its full length said: an error
    message stays one readable line, however large the value it refuses."""
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[: SHOWN_CHARACTERS - 3]}... ({len(text)} characters)"


def _one_line(key: str) -> str:
    """A key as one line: a quoted TOML key may hold a newline or a control."""
    if not key.isprintable():
        key = key.encode("unicode_escape").decode("ascii")
    return _cut(key)


class StartError(LbgwError):
    """The gateway could not start, e.g. a listener address could not be bound."""


class IllegalTransitionError(LbgwError):
    """An event that an endpoint's state does not admit (``endpoints.TRANSITIONS``)."""

    def __init__(self, state: enum.Enum, event: enum.Enum) -> None:
        self.state = state
        self.event = event
        super().__init__(f"no transition from {state.name} on {event.name}")


class GatewayError(LbgwError):
    """An answer lbgw gives a call itself, as ``code`` with this message."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class NoRouteError(GatewayError):
    """No route matches the call's method."""

    code = grpc.StatusCode.UNIMPLEMENTED

    def __init__(self, method: str) -> None:
        super().__init__(f"lbgw: no route for method {method}")


class NoEligibleEndpointError(GatewayError):
    """Every endpoint of the cluster is out of rotation (unhealthy, ejected or draining)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        #: For an explained pick: the endpoints that were out, and why (for its trace).
        self.skipped: tuple[tuple[str, str], ...] = ()
        super().__init__(f"lbgw: no endpoint of cluster {cluster!r} is healthy")


class EndpointUnreachableError(GatewayError):
    """lbgw could not reach the endpoint it picked."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, cluster: str, address: str, details: str) -> None:
        self.cluster = cluster
        self.address = address
        super().__init__(
            f"lbgw: endpoint {address} of cluster {cluster!r} is unreachable: {details}"
        )


class OverloadedError(GatewayError):
    """The gateway is at one of its own limits (``[limits]``): the call is refused at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, limit: str, value: int) -> None:
        self.limit = limit
        self.value = value
        super().__init__(f"lbgw: gateway overloaded: {limit} {value}")


class CircuitBreakerOpenError(GatewayError):
    """A cluster's circuit breaker is open (Envoy's): the call is refused and not retried."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, cluster: str, limit: str, value: int) -> None:
        self.cluster = cluster
        self.limit = limit
        self.value = value
        super().__init__(f"lbgw: cluster {cluster!r} circuit breaker open: {limit} {value}")


class RequestHeaderTimeoutError(GatewayError):
    """A stream sent its HEADERS and nothing more within ``request_header_timeout``."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"lbgw: no request message within request_header_timeout ({seconds:g} s)")
