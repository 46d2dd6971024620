"""Session affinity without the network: hash keys, sticky tokens, fallbacks.

The integration tests (``tests/integration/test_affinity.py``) make the same
points through real gRPC calls and two lbgw processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from lbgw.affinity import Affinity, Sticky, peer_host
from lbgw.balancer import Balancer
from lbgw.config import ClusterConfig, config_from_mapping
from lbgw.exceptions import ConfigError, NoEligibleEndpointError

ADDRESSES = [f"10.0.0.{i}:50051" for i in range(1, 6)]
SECRET = b"s3cret"


def _cluster(
    strategy: str = "maglev", addresses: list[Any] | None = None, **extra: Any
) -> ClusterConfig:
    hashing = strategy in ("ring_hash", "maglev")
    params = extra.pop("params", {"hash_key": "x-session-id"} if hashing else {})
    data = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {
            "api": {
                "endpoints": addresses or ADDRESSES,
                "strategy": strategy,
                "params": params,
                **extra,
            }
        },
    }
    return config_from_mapping(data, "<test>").clusters[0]


def _affinity(cluster: ClusterConfig, secret: bytes = SECRET) -> Affinity:
    return Affinity(cluster, Balancer(cluster), secret)


def _md(session: str) -> tuple[tuple[str, str], ...]:
    return (("x-session-id", session),)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:41234", "10.0.0.5"),
        ("ipv6:%5B::1%5D:41234", "::1"),
        ("ipv6:[2001:db8::1]:5", "2001:db8::1"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


@pytest.mark.parametrize("strategy", ["ring_hash", "maglev"])
def test_a_key_always_goes_to_the_same_endpoint_whatever_the_order(strategy: str) -> None:
    a = _affinity(_cluster(strategy))
    b = _affinity(_cluster(strategy, list(reversed(ADDRESSES))))
    for n in range(200):
        i = a.pick(_md(f"session-{n}"), "ipv4:1.2.3.4:5", "/a.B/C")
        j = b.pick(_md(f"session-{n}"), "ipv4:1.2.3.4:5", "/a.B/C")
        assert a.balancer.addresses[i] == b.balancer.addresses[j]
        assert a.pick(_md(f"session-{n}"), "ipv4:9.9.9.9:1", "/x.Y/Z") == i  # key only


@pytest.mark.parametrize("strategy", ["ring_hash", "maglev"])
def test_a_call_without_the_key_uses_the_fallback(strategy: str) -> None:
    cluster = _cluster(strategy, params={"hash_key": "x-session-id", "fallback": "round_robin"})
    a = _affinity(cluster)
    picks = [a.pick((("other", "v"),), "ipv4:1.2.3.4:5", "/a.B/C") for _ in range(10)]
    assert picks == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # round robin, not a hash
    how = a.explain((), "ipv4:1.2.3.4:5", "/a.B/C")
    assert how == {"fallback": "no hash key (x-session-id): round_robin"}


def test_peer_and_method_keys() -> None:
    by_peer = _affinity(_cluster("ring_hash", params={"hash_on": "peer"}))
    first = by_peer.pick((), "ipv4:10.1.1.1:1000", "/a.B/C")
    assert all(by_peer.pick((), f"ipv4:10.1.1.1:{p}", "/d.E/F") == first for p in range(2000, 2050))
    by_method = _affinity(_cluster("maglev", params={"hash_on": "method"}))
    first = by_method.pick((), "ipv4:10.1.1.1:1000", "/a.B/C")
    assert all(by_method.pick((), f"ipv4:10.9.9.{p}:1", "/a.B/C") == first for p in range(50))
    how = by_method.explain((), "ipv4:1.1.1.1:1", "/a.B/C")
    assert how["hash_key"] == "/a.B/C" and isinstance(how["ring_position"], int)


def test_a_bin_key_is_hashed_as_bytes() -> None:
    a = _affinity(_cluster("maglev", params={"hash_key": "session-bin"}))
    i = a.pick((("session-bin", b"\x00\xff"),), "", "/a.B/C")
    assert a.balancer.pick_key(b"\x00\xff") == i


def test_an_endpoint_out_of_rotation_moves_only_its_keys() -> None:
    a = _affinity(_cluster("maglev"))
    before = {n: a.pick(_md(f"s{n}"), "", "/a.B/C") for n in range(500)}
    a.balancer.set_eligible(2, False)
    after = {n: a.pick(_md(f"s{n}"), "", "/a.B/C") for n in range(500)}
    moved = {n for n in before if before[n] != after[n]}
    assert moved == {n for n in before if before[n] == 2}
    a.balancer.set_eligible(2, True)
    assert {n: a.pick(_md(f"s{n}"), "", "/a.B/C") for n in range(500)} == before


def test_a_retry_moves_off_the_failed_endpoint_to_the_next_on_the_ring() -> None:
    a = _affinity(_cluster("ring_hash"))
    for n in range(50):
        i = a.pick(_md(f"s{n}"), "", "/a.B/C")
        j = a.pick(_md(f"s{n}"), "", "/a.B/C", exclude=i)
        assert j != i
        assert a.balancer.hashing is not None and a.balancer.hashing.is_eligible(i)


def test_sticky_tokens_pin_and_are_the_same_in_every_replica() -> None:
    cluster = _cluster("swrr", sticky={"enabled": True})
    one = _affinity(cluster)
    two = _affinity(_cluster("swrr", list(reversed(ADDRESSES)), sticky={"enabled": True}))
    assert one.sticky is not None and two.sticky is not None
    for i, address in enumerate(ADDRESSES):
        key, token = one.sticky.token(i)
        assert key == "lbgw-sticky" and token.startswith("v1.") and len(token) == 27
        assert address not in token
        j = two.pick(((key, token),), "", "/a.B/C")
        assert two.balancer.addresses[j] == address
        assert one.pick(((key, token),), "", "/a.B/C") == i


def test_a_tampered_or_foreign_token_is_ignored() -> None:
    ours = _affinity(_cluster("round_robin", sticky={"enabled": True}))
    theirs = Sticky("api", ADDRESSES, "lbgw-sticky", b"another secret")
    assert ours.sticky is not None
    _, token = ours.sticky.token(3)
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in (tampered, theirs.token(3)[1], "v1.", "", "garbage"):
        assert ours.sticky.endpoint((("lbgw-sticky", bad),)) == -1
    assert ours.sticky.endpoint((("lbgw-sticky", token.encode()),)) == -1  # bytes: not ours
    picks = [ours.pick((("lbgw-sticky", tampered),), "", "/a.B/C") for _ in range(5)]
    assert picks == [0, 1, 2, 3, 4]  # the strategy's picks, as if there were no token


def test_a_token_for_an_endpoint_out_of_rotation_leads_to_a_new_pick() -> None:
    a = _affinity(_cluster("swrr", sticky={"enabled": True}))
    assert a.sticky is not None
    md = (a.sticky.token(1),)
    assert a.pick(md, "", "/a.B/C") == 1
    a.balancer.set_eligible(1, False)
    assert a.pick(md, "", "/a.B/C") != 1
    assert a.explain(md, "", "/a.B/C") == {"fallback": "sticky endpoint out of rotation"}
    a.balancer.set_eligible(1, True)
    assert a.explain(md, "", "/a.B/C") == {"fallback": "", "pinned": "sticky token"}


def test_the_token_key_is_configurable_and_checked() -> None:
    a = _affinity(_cluster("swrr", sticky={"enabled": True, "key": "x-pin"}))
    assert a.sticky is not None and a.sticky.token(0)[0] == "x-pin"
    with pytest.raises(ConfigError, match=r"clusters.api.sticky.key: expected a metadata key"):
        _cluster("swrr", sticky={"enabled": True, "key": "X-Pin"})


def test_no_eligible_endpoint_raises_for_keyed_picks() -> None:
    a = _affinity(_cluster("maglev"))
    for i in range(len(ADDRESSES)):
        a.balancer.set_eligible(i, False)
    with pytest.raises(NoEligibleEndpointError):
        a.pick(_md("s"), "", "/a.B/C")
    assert [a.balancer.kernel.in_flight(i) for i in range(5)] == [0] * 5


def test_in_flight_counts_follow_keyed_and_pinned_picks() -> None:
    a = _affinity(_cluster("maglev", sticky={"enabled": True}))
    assert a.sticky is not None
    i = a.pick(_md("s"), "", "/a.B/C")
    j = a.pick((a.sticky.token(4),), "", "/a.B/C")
    assert j == 4
    counts = [a.balancer.kernel.in_flight(k) for k in range(5)]
    assert sum(counts) == 2 and counts[i] >= 1 and counts[4] >= 1
    a.balancer.done(i, 0, None)
    a.balancer.done(j, 0, None)
    assert [a.balancer.kernel.in_flight(k) for k in range(5)] == [0] * 5


def test_a_keyed_pick_reaches_an_eligible_endpoint_whatever_its_share_of_the_table() -> None:
    # Weights this lopsided leave the light endpoint few slots; with the heavy one
    # out, every key must still reach the light one.
    addresses = ["10.0.0.1:1", "10.0.0.2:1"]
    endpoints = [{"address": addresses[0], "weight": 1}, {"address": addresses[1], "weight": 2**24}]
    cluster = _cluster("maglev", endpoints, params={"hash_key": "x-session-id", "table_size": 7})
    a = _affinity(cluster)
    a.balancer.set_eligible(1, False)
    assert {a.pick(_md(f"s{n}"), "", "/a.B/C") for n in range(50)} == {0}
