"""How a config field is declared: its default, limits and special rule, each written once.

A model field is an ordinary dataclass field whose metadata holds a ``Spec``::

    interval: float = field(default=5.0, metadata=spec(positive=True, high=3600))

The dataclass keeps the default; the ``Spec`` says what the reader
(``reader.py``) accepts from a file: the range, the choices, the text of the
error, and a ``check`` for a rule no range expresses. A check refuses a value
by raising ``Invalid``, which knows nothing of files: the reader adds the
file and the dotted key. Here too: the syntax of the addresses and names
that those checks, the CLI and the gateway share.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "Invalid",
    "Spec",
    "endpoint_address",
    "is_dotted",
    "is_metadata_key",
    "is_method_name",
    "listener_address",
    "parse_address",
    "spec",
    "spec_of",
]

_KEY: Final = "lbgw.config"


class Invalid(Exception):  # noqa: N818 - a refusal, turned into ConfigError by the reader
    """A rule refuses a value: ``expected`` (and ``got``), at ``at`` below the value checked.

    ``at`` is a dotted path relative to the value or section the rule was
    given (``"endpoints[1]"``, ``"params.table_size"``); ``""`` is the value itself.
    """

    def __init__(self, expected: str, got: object = None, at: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.at = at


@dataclass(frozen=True, slots=True)
class Spec:
    """What the reader accepts for one field, beyond what its type says.

    By the field's type: an ``int`` lies in ``[low, high]``; a ``float`` is
    ``>= 0`` (``> 0`` if ``positive``) and at most ``high``; a ``str`` or an
    enum is one of ``choices`` (an enum's own members if none are given).
    """

    low: int = 0
    high: float | None = None
    positive: bool = False
    #: A sibling field read earlier that this one is at least; the default rises to it too.
    floor: str = ""
    choices: tuple[str, ...] = ()
    #: A rule no range expresses; raises ``Invalid``. For a map, it checks each key.
    check: Callable[[Any], None] | None = None
    #: What an array, a map, a table of tables or a missing required value should be.
    expected: str = ""
    nonempty: bool = False
    #: The TOML table that holds this field when it is not its section's own (``server``).
    table: str = ""
    #: A tuple of sections read from a table of tables, each keyed by this field (``name``).
    keyed: str = ""
    #: An item of an array may be a bare value of this field (an endpoint's ``address``).
    shorthand: str = ""
    #: A section whose keys depend on this sibling's value (``params`` on ``strategy``) ...
    variant: str = ""
    #: ... and what a key outside them should have been: stray(value, the keys it takes).
    stray: Callable[[str, list[str]], str] | None = None
    #: In such a section: the sibling's values for which this key is accepted.
    variants: tuple[str, ...] = ()


_PLAIN: Final = Spec()


def spec(**kwargs: Any) -> Mapping[str, Spec]:
    """A field's metadata holding ``Spec(**kwargs)``: ``field(default=..., metadata=spec(...))``."""
    return {_KEY: Spec(**kwargs)}


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    """The ``Spec`` of a model field; a field without one takes any value of its type."""
    found: Spec = f.metadata.get(_KEY, _PLAIN)
    return found


# -- the syntax of addresses and names ----------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(text)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(text)
        ipaddress.IPv6Address(host[1:-1])
    elif ":" in host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(text)
    return host, port


def is_dotted(text: str) -> bool:
    """Whether ``text`` is a dotted name such as ``pkg.v1.Service``."""
    return bool(text) and all(part and part.replace("_", "a").isalnum() for part in text.split("."))


def is_metadata_key(text: str) -> bool:
    """Whether ``text`` is a custom gRPC metadata key: lower case, not ``grpc-`` nor ``:``."""
    return (
        bool(text)
        and all(c.isascii() and (c.islower() or c.isdigit() or c in "-_.") for c in text)
        and not text.startswith("grpc-")
    )


def is_method_name(text: str) -> bool:
    """Whether ``text`` is a full gRPC method name, ``/package.Service/Method``."""
    if not text.startswith("/") or text.count("/") != 2:
        return False
    service, method = text[1:].split("/")
    return is_dotted(service) and bool(method) and method.replace("_", "a").isalnum()


def _port(text: str) -> int:
    try:
        return parse_address(text)[1]
    except ValueError:
        raise Invalid("an address host:port (IPv6 as [addr]:port)", text) from None


def listener_address(text: str) -> None:
    """A listener's address; port 0 asks for a free port."""
    _port(text)


def endpoint_address(text: str) -> None:
    """An endpoint's address: a port to connect to, so not 0."""
    if _port(text) == 0:
        raise Invalid("a port from 1 to 65535", text)
