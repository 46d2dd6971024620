"""Session affinity without the network: hash keys, sticky tokens, fallbacks.

The integration tests (``tests/integration/test_affinity.py``) make the same
points through real gRPC calls and two lbgw processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from lbgw.affinity import Sticky, peer_host
from lbgw.cluster import Cluster
from lbgw.config import ClusterConfig, config_from_mapping
from lbgw.decision import Decision
from lbgw.endpoints import Endpoint
from lbgw.exceptions import ConfigError, NoEligibleEndpointError
from lbgw.testing import offline_cluster

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


def _affinity(cluster: ClusterConfig, secret: bytes = SECRET) -> Cluster:
    return offline_cluster(cluster, secret=secret)


def _pick(c: Cluster, metadata: Any, peer: str, method: str, exclude: int | None = None) -> int:
    """The index of the endpoint a call is picked for (never ``exclude``, for a retry)."""
    tried = None if exclude is None else c.endpoints[exclude]
    return c.decide(metadata, peer, method, tried).endpoint.index


def _explain(c: Cluster, metadata: Any, peer: str, method: str) -> Decision:
    decision = c.decide(metadata, peer, method, explain=True)
    c.balancer.done(decision.endpoint, 0, None)
    return decision


def _sticky(c: Cluster) -> Sticky:
    assert c.affinity is not None and c.affinity.sticky is not None
    return c.affinity.sticky


def _token(c: Cluster, i: int) -> tuple[str, str]:
    token = c.endpoints[i].token
    assert token is not None
    return token


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
        i = _pick(a, _md(f"session-{n}"), "ipv4:1.2.3.4:5", "/a.B/C")
        j = _pick(b, _md(f"session-{n}"), "ipv4:1.2.3.4:5", "/a.B/C")
        assert a.endpoints[i].address == b.endpoints[j].address
        assert _pick(a, _md(f"session-{n}"), "ipv4:9.9.9.9:1", "/x.Y/Z") == i  # key only


@pytest.mark.parametrize("strategy", ["ring_hash", "maglev"])
def test_a_call_without_the_key_uses_the_fallback(strategy: str) -> None:
    cluster = _cluster(strategy, params={"hash_key": "x-session-id", "fallback": "round_robin"})
    a = _affinity(cluster)
    picks = [_pick(a, (("other", "v"),), "ipv4:1.2.3.4:5", "/a.B/C") for _ in range(10)]
    assert picks == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # round robin, not a hash
    how = _explain(a, (), "ipv4:1.2.3.4:5", "/a.B/C")
    assert how.fallback == "no hash key (x-session-id): round_robin"
    assert how.hash_key is None and how.ring_position is None and not how.pinned


def test_peer_and_method_keys() -> None:
    by_peer = _affinity(_cluster("ring_hash", params={"hash_on": "peer"}))
    first = _pick(by_peer, (), "ipv4:10.1.1.1:1000", "/a.B/C")
    assert all(
        _pick(by_peer, (), f"ipv4:10.1.1.1:{p}", "/d.E/F") == first for p in range(2000, 2050)
    )
    by_method = _affinity(_cluster("maglev", params={"hash_on": "method"}))
    first = _pick(by_method, (), "ipv4:10.1.1.1:1000", "/a.B/C")
    assert all(_pick(by_method, (), f"ipv4:10.9.9.{p}:1", "/a.B/C") == first for p in range(50))
    how = _explain(by_method, (), "ipv4:1.1.1.1:1", "/a.B/C")
    assert how.hash_key == "/a.B/C" and isinstance(how.ring_position, int)
    assert how.endpoint.index == first and how.candidates == () and how.fallback is None


def test_a_bin_key_is_hashed_as_bytes() -> None:
    a = _affinity(_cluster("maglev", params={"hash_key": "session-bin"}))
    i = _pick(a, (("session-bin", b"\x00\xff"),), "", "/a.B/C")
    assert a.balancer.pick_key(b"\x00\xff").index == i


def test_an_endpoint_out_of_rotation_moves_only_its_keys() -> None:
    a = _affinity(_cluster("maglev"))
    before = {n: _pick(a, _md(f"s{n}"), "", "/a.B/C") for n in range(500)}
    a.balancer.set_eligible(2, False)
    after = {n: _pick(a, _md(f"s{n}"), "", "/a.B/C") for n in range(500)}
    moved = {n for n in before if before[n] != after[n]}
    assert moved == {n for n in before if before[n] == 2}
    a.balancer.set_eligible(2, True)
    assert {n: _pick(a, _md(f"s{n}"), "", "/a.B/C") for n in range(500)} == before


def test_a_retry_moves_off_the_failed_endpoint_to_the_next_on_the_ring() -> None:
    a = _affinity(_cluster("ring_hash"))
    for n in range(50):
        i = _pick(a, _md(f"s{n}"), "", "/a.B/C")
        j = _pick(a, _md(f"s{n}"), "", "/a.B/C", exclude=i)
        assert j != i
        assert a.balancer.hashing is not None and a.balancer.hashing.is_eligible(i)


def test_sticky_tokens_pin_and_are_the_same_in_every_replica() -> None:
    cluster = _cluster("swrr", sticky={"enabled": True})
    one = _affinity(cluster)
    two = _affinity(_cluster("swrr", list(reversed(ADDRESSES)), sticky={"enabled": True}))
    for i, address in enumerate(ADDRESSES):
        key, token = _token(one, i)
        assert key == "lbgw-sticky" and token.startswith("v1.") and len(token) == 27
        assert address not in token
        j = _pick(two, ((key, token),), "", "/a.B/C")
        assert two.endpoints[j].address == address
        assert _pick(one, ((key, token),), "", "/a.B/C") == i


def test_a_tampered_or_foreign_token_is_ignored() -> None:
    ours = _affinity(_cluster("round_robin", sticky={"enabled": True}))
    theirs = Sticky("api", "lbgw-sticky", b"another secret")
    foreign = [Endpoint(address) for address in ADDRESSES]
    theirs.rebuild(foreign)
    assert foreign[3].token is not None
    _, token = _token(ours, 3)
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    for bad in (tampered, foreign[3].token[1], "v1.", "", "garbage"):
        assert _sticky(ours).endpoint((("lbgw-sticky", bad),)) is None
    assert _sticky(ours).endpoint((("lbgw-sticky", token.encode()),)) is None  # bytes: not ours
    picks = [_pick(ours, (("lbgw-sticky", tampered),), "", "/a.B/C") for _ in range(5)]
    assert picks == [0, 1, 2, 3, 4]  # the strategy's picks, as if there were no token


def test_a_token_for_an_endpoint_out_of_rotation_leads_to_a_new_pick() -> None:
    a = _affinity(_cluster("swrr", sticky={"enabled": True}))
    md = (_token(a, 1),)
    assert _pick(a, md, "", "/a.B/C") == 1
    a.balancer.set_eligible(1, False)
    assert _pick(a, md, "", "/a.B/C") != 1
    how = _explain(a, md, "", "/a.B/C")
    assert how.fallback == "sticky endpoint out of rotation" and not how.pinned
    assert how.endpoint.index != 1 and how.candidates  # the strategy chose, on its figures
    a.balancer.set_eligible(1, True)
    how = _explain(a, md, "", "/a.B/C")
    assert how.pinned and how.fallback is None and how.endpoint.index == 1
    assert how.candidates == ()  # the token decided, not the scores


def test_the_token_key_is_configurable_and_checked() -> None:
    a = _affinity(_cluster("swrr", sticky={"enabled": True, "key": "x-pin"}))
    assert _token(a, 0)[0] == "x-pin"
    with pytest.raises(ConfigError, match=r"clusters.api.sticky.key: expected a metadata key"):
        _cluster("swrr", sticky={"enabled": True, "key": "X-Pin"})


def test_no_eligible_endpoint_raises_for_keyed_picks() -> None:
    a = _affinity(_cluster("maglev"))
    for i in range(len(ADDRESSES)):
        a.balancer.set_eligible(i, False)
    with pytest.raises(NoEligibleEndpointError):
        _pick(a, _md("s"), "", "/a.B/C")
    assert [a.balancer.kernel.in_flight(i) for i in range(5)] == [0] * 5


def test_in_flight_counts_follow_keyed_and_pinned_picks() -> None:
    a = _affinity(_cluster("maglev", sticky={"enabled": True}))
    i = _pick(a, _md("s"), "", "/a.B/C")
    j = _pick(a, (_token(a, 4),), "", "/a.B/C")
    assert j == 4
    counts = [a.balancer.kernel.in_flight(k) for k in range(5)]
    assert sum(counts) == 2 and counts[i] >= 1 and counts[4] >= 1
    a.balancer.done(a.endpoints[i], 0, None)
    a.balancer.done(a.endpoints[j], 0, None)
    assert [a.balancer.kernel.in_flight(k) for k in range(5)] == [0] * 5


def test_a_keyed_pick_reaches_an_eligible_endpoint_whatever_its_share_of_the_table() -> None:
    # Weights this lopsided leave the light endpoint few slots; with the heavy one
    # out, every key must still reach the light one.
    addresses = ["10.0.0.1:1", "10.0.0.2:1"]
    endpoints = [{"address": addresses[0], "weight": 1}, {"address": addresses[1], "weight": 2**24}]
    cluster = _cluster("maglev", endpoints, params={"hash_key": "x-session-id", "table_size": 7})
    a = _affinity(cluster)
    a.balancer.set_eligible(1, False)
    assert {_pick(a, _md(f"s{n}"), "", "/a.B/C") for n in range(50)} == {0}
