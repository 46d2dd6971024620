"""Routing: the most specific route wins, whatever the order of the routes in the file."""

from __future__ import annotations

import itertools

import pytest

from lbgw.config import RouteConfig
from lbgw.routing import Router, split_method

TARGETS = {name: name for name in ("method", "service", "long", "short", "default")}

ROUTES = (
    RouteConfig("method", "/a.b.Svc/Get", "method"),
    RouteConfig("service", "a.b.Svc", "service"),
    RouteConfig("package", "a.b", "long"),
    RouteConfig("package", "a", "short"),
    RouteConfig("default", "", "default"),
)

# (full method name, the route that must win)
EXPECTED = [
    ("/a.b.Svc/Get", "method"),  # method beats service, package and default
    ("/a.b.Svc/List", "service"),  # service beats both packages
    ("/a.b.Other/Get", "long"),  # a.b is longer than a
    ("/a.b.c.Deep/Get", "long"),  # no a.b.c route: the longest that exists
    ("/a.c.Svc/Get", "short"),
    ("/a.Svc/Get", "short"),
    ("/ab.Svc/Get", "default"),  # package a is a whole name, not a text prefix
    ("/a/Get", "default"),  # a service named a is not in package a
    ("/z.Svc/Get", "default"),
    ("/Svc/Get", "default"),
]


def router(routes: tuple[RouteConfig, ...] | list[RouteConfig]) -> Router[str]:
    return Router(routes, lambda route: TARGETS[route.cluster])


@pytest.mark.parametrize("order", list(itertools.permutations(ROUTES)))
def test_precedence_does_not_depend_on_route_order(order: tuple[RouteConfig, ...]) -> None:
    chosen = router(order)
    assert [(m, chosen.match(m)) for m, _ in EXPECTED] == EXPECTED


def test_package_matches_whole_dotted_names() -> None:
    only_a = router([RouteConfig("package", "a", "short")])
    assert only_a.match("/a.b.Svc/Get") == "short"
    assert only_a.match("/a.Svc/Get") == "short"
    assert only_a.match("/ab.Svc/Get") is None
    assert only_a.match("/ab.c.Svc/Get") is None
    assert only_a.match("/b.a.Svc/Get") is None


def test_service_route_matches_only_that_service() -> None:
    chosen = router([RouteConfig("service", "a.b.Svc", "service")])
    assert chosen.match("/a.b.Svc/Anything") == "service"
    assert chosen.match("/a.b.Svc2/Get") is None
    assert chosen.match("/a.b/Svc") is None


def test_method_route_matches_only_that_method() -> None:
    chosen = router([RouteConfig("method", "/a.b.Svc/Get", "method")])
    assert chosen.match("/a.b.Svc/Get") == "method"
    assert chosen.match("/a.b.Svc/get") is None
    assert chosen.match("/a.b.Svc/GetAll") is None


def test_without_a_default_an_unmatched_method_has_no_route() -> None:
    chosen = router([r for r in ROUTES if r.match != "default"])
    assert chosen.match("/z.Svc/Get") is None
    assert chosen.match("/a.b.Svc/Get") == "method"


def test_no_routes_routes_nothing() -> None:
    assert router([]).match("/a.b.Svc/Get") is None


MALFORMED = ["", "nomethod", "/x", "/", "//", "a.b.Svc/Get", "/a.b.Svc", "//Get"]


@pytest.mark.parametrize("method", MALFORMED)
def test_malformed_method_names_go_to_the_default(method: str) -> None:
    assert router(ROUTES).match(method) == "default"
    assert router([r for r in ROUTES if r.match != "default"]).match(method) is None


@pytest.mark.parametrize("method", ["/a.b.Svc/", "/a.b.Svc/Get/Extra"])
def test_malformed_method_names_with_a_known_service_go_to_the_default(method: str) -> None:
    assert router(ROUTES).match(method) == "default"


def test_split_method() -> None:
    assert split_method("/a.b.Svc/Get") == ("a.b.Svc", "Get")
    assert split_method("/Svc/Get") == ("Svc", "Get")
    for bad in ("", "nomethod", "/x", "a.b.Svc/Get"):
        assert split_method(bad) == ("", "")
