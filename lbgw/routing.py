"""Routing: which cluster a method goes to. Sync, no I/O, built once per config.

A route matches a full method name (``/pkg.v1.Svc/Get``), a service
(``pkg.v1.Svc``) or a package prefix (``pkg`` matches ``pkg.v1.Svc`` and
``pkg.v2.Other``), or is the default. The most specific match wins, whatever
the order in the file, as NGINX's exact-then-longest-prefix ``location``
matching does: method, then service, then the longest package, then default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from lbgw.config import RouteConfig

__all__ = ["Router", "split_method"]

T = TypeVar("T")


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Svc/Method`` -> (``pkg.Svc``, ``Method``); ("", "") if malformed."""
    parts = method.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return "", ""
    return parts[1], parts[2]


class Router(Generic[T]):
    """Maps a full method name to a route's target, or None.

    ``target(route)`` makes each route's target (for the proxy: the cluster
    and the route's retry codes).
    """

    def __init__(self, routes: Iterable[RouteConfig], target: Callable[[RouteConfig], T]) -> None:
        self._methods: dict[str, T] = {}
        self._services: dict[str, T] = {}
        self._packages: dict[str, T] = {}
        self._default: T | None = None
        for route in routes:
            made = target(route)
            if route.match == "method":
                self._methods[route.value] = made
            elif route.match == "service":
                self._services[route.value] = made
            elif route.match == "package":
                self._packages[route.value] = made
            else:
                self._default = made

    def match(self, method: str) -> T | None:
        target = self._methods.get(method)
        if target is not None:
            return target
        service, _ = split_method(method)
        if not service:
            return self._default
        target = self._services.get(service)
        if target is not None:
            return target
        package = service
        while self._packages:
            package, dot, _ = package.rpartition(".")
            if not dot:
                break
            target = self._packages.get(package)
            if target is not None:
                return target
        return self._default
