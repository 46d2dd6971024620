"""The endpoint state machine and ``ClusterHealth``, driven by a manual clock.

Every (state, event) pair is walked: the legal ones lead where the table
says, the others raise. ``ClusterHealth`` is checked through the balancer it
drives: what a user notices is which endpoints get picked.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any

import grpc
import pytest

from lbgw.balancer import Balancer
from lbgw.config import config_from_mapping
from lbgw.endpoints import (
    ELIGIBLE,
    TRANSITIONS,
    ClusterHealth,
    Event,
    State,
    transition,
)
from lbgw.exceptions import IllegalTransitionError, NoEligibleEndpointError
from lbgw.logs import _FIELDS
from lbgw.testing import ManualClock

S, E = State, Event
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE

# The whole table, written out again: a change to TRANSITIONS must be made twice.
EXPECTED = {
    (S.UNKNOWN, E.HEALTHY): S.SERVING,
    (S.UNKNOWN, E.UNHEALTHY): S.NOT_SERVING,
    (S.UNKNOWN, E.EJECT): S.EJECTED,
    (S.UNKNOWN, E.DRAIN): S.DRAINING,
    (S.SERVING, E.HEALTHY): S.SERVING,
    (S.SERVING, E.UNHEALTHY): S.NOT_SERVING,
    (S.SERVING, E.EJECT): S.EJECTED,
    (S.SERVING, E.DRAIN): S.DRAINING,
    (S.NOT_SERVING, E.HEALTHY): S.SERVING,
    (S.NOT_SERVING, E.UNHEALTHY): S.NOT_SERVING,
    (S.NOT_SERVING, E.DRAIN): S.DRAINING,
    (S.EJECTED, E.HEALTHY): S.SERVING,
    (S.EJECTED, E.UNHEALTHY): S.NOT_SERVING,
    (S.EJECTED, E.EJECTION_ENDED): S.SERVING,
    (S.EJECTED, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAIN): S.DRAINING,
}


def _state(health: ClusterHealth, i: int) -> State:
    """Endpoint ``i``'s state (a call, so that mypy does not narrow it across events)."""
    return health.endpoints[i].state


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_state_and_event_pair(state: State, event: Event) -> None:
    if (state, event) in EXPECTED:
        assert transition(state, event) is EXPECTED[state, event]
    else:
        with pytest.raises(IllegalTransitionError, match=f"{state.name} on {event.name}"):
            transition(state, event)


def test_the_table_is_the_expected_one() -> None:
    assert TRANSITIONS == EXPECTED
    assert {S.UNKNOWN, S.SERVING} == ELIGIBLE


def _health(
    n: int = 4, weights: list[int] | None = None, **cluster: Any
) -> tuple[ClusterHealth, ManualClock]:
    weights = weights or [1] * n
    data = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {
            "c": {
                "endpoints": [
                    {"address": f"127.0.0.1:{5000 + i}", "weight": w} for i, w in enumerate(weights)
                ],
                **cluster,
            }
        },
    }
    cc = config_from_mapping(data, "<test>").clusters[0]
    clock = ManualClock()
    health = ClusterHealth(cc, Balancer(cc), clock=clock.time, call_later=clock.call_later)
    return health, clock


def _eligible(health: ClusterHealth) -> list[int]:
    b = health.balancer
    return [i for i in range(len(b.endpoints)) if b.is_eligible(i)]


def _picks(health: ClusterHealth, count: int) -> Counter[int]:
    b = health.balancer
    got: Counter[int] = Counter()
    for _ in range(count):
        e = b.pick()
        b.done(e, 0, None)
        got[e.index] += 1
    return got


def test_unknown_endpoints_take_calls_and_the_first_result_decides() -> None:
    health, _ = _health(3)
    assert health.states() == [S.UNKNOWN] * 3
    assert _eligible(health) == [0, 1, 2]
    health.check_passed(health.endpoints[0])
    health.check_failed(
        health.endpoints[1], "connection refused"
    )  # one failure, not three: the first decides
    assert health.states() == [S.SERVING, S.NOT_SERVING, S.UNKNOWN]
    assert _eligible(health) == [0, 2]
    assert set(_picks(health, 20)) == {0, 2}


def test_thresholds_out_and_back() -> None:
    health, _ = _health(2, health_check={"unhealthy_threshold": 3, "healthy_threshold": 2})
    health.check_passed(health.endpoints[0])
    health.check_failed(health.endpoints[0], "timeout")
    health.check_failed(health.endpoints[0], "timeout")
    assert _state(health, 0) is S.SERVING  # two failures of three
    health.check_passed(health.endpoints[0])  # a pass resets the count
    health.check_failed(health.endpoints[0], "timeout")
    health.check_failed(health.endpoints[0], "timeout")
    assert _state(health, 0) is S.SERVING
    health.check_failed(health.endpoints[0], "timeout")
    assert _state(health, 0) is S.NOT_SERVING
    health.check_passed(health.endpoints[0])
    assert _state(health, 0) is S.NOT_SERVING  # one pass of two
    health.check_passed(health.endpoints[0])
    assert _state(health, 0) is S.SERVING


def test_a_watched_serving_brings_it_back_at_once() -> None:
    health, _ = _health(2, health_check={"healthy_threshold": 3})
    health.check_failed(health.endpoints[0], "NOT_SERVING", explicit=True)
    health.check_passed(
        health.endpoints[0], "SERVING", explicit=True
    )  # a Watch says it once, on the change
    assert _state(health, 0) is S.SERVING


def test_an_explicit_not_serving_takes_it_out_at_once() -> None:
    health, _ = _health(2)
    health.check_passed(health.endpoints[0])
    health.check_failed(health.endpoints[0], "NOT_SERVING", explicit=True)
    assert _state(health, 0) is S.NOT_SERVING
    assert _eligible(health) == [1]


def test_no_endpoint_healthy_fails_fast_naming_the_cluster() -> None:
    health, _ = _health(2)
    for i in range(2):
        health.check_failed(health.endpoints[i], "NOT_SERVING", explicit=True)
    assert not health.serving
    with pytest.raises(NoEligibleEndpointError, match="no endpoint of cluster 'c' is healthy"):
        health.balancer.pick()


def test_consecutive_failures_eject_for_base_times_count_capped() -> None:
    health, clock = _health(
        4,
        outlier_detection={
            "consecutive_failures": 3,
            "base_ejection_time": 10,
            "max_ejection_time": 25,
            "max_ejection_percent": 50,
        },
    )
    for i in range(4):
        health.check_passed(health.endpoints[i])
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.succeeded(health.endpoints[0])  # not consecutive
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.SERVING
    health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.EJECTED
    assert _eligible(health) == [1, 2, 3]
    assert clock.pending() == [clock.now + 10]
    clock.advance(9.9)
    assert _state(health, 0) is S.EJECTED
    clock.advance(0.2)
    assert _state(health, 0) is S.SERVING  # back: ejected 1 x 10 s
    for _ in range(3):
        health.failed(health.endpoints[0], UNAVAILABLE)
    assert clock.pending() == [clock.now + 20]  # 2 x 10 s
    clock.advance(20)
    for _ in range(3):
        health.failed(health.endpoints[0], UNAVAILABLE)
    assert clock.pending() == [clock.now + 25]  # 3 x 10 s, capped at 25
    clock.advance(25)
    clock.advance(25)  # in rotation for max_ejection_time: the count starts again
    for _ in range(3):
        health.failed(health.endpoints[0], UNAVAILABLE)
    assert clock.pending() == [clock.now + 10]


def test_only_failure_codes_count_and_others_reset() -> None:
    health, _ = _health(2, outlier_detection={"consecutive_failures": 2})
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.failed(health.endpoints[0], grpc.StatusCode.NOT_FOUND)  # the backend answered: it works
    health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.UNKNOWN
    health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.EJECTED
    health2, _ = _health(
        2,
        outlier_detection={"consecutive_failures": 2, "failure_codes": ["INTERNAL"]},
    )
    for _ in range(3):
        health2.failed(health2.endpoints[0], UNAVAILABLE)
    assert _state(health2, 0) is S.UNKNOWN
    health2.failed(health2.endpoints[0], grpc.StatusCode.INTERNAL)
    health2.failed(health2.endpoints[0], grpc.StatusCode.INTERNAL)
    assert _state(health2, 0) is S.EJECTED


def test_zero_consecutive_failures_turns_ejection_off() -> None:
    health, _ = _health(2, outlier_detection={"consecutive_failures": 0})
    for _ in range(100):
        health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.UNKNOWN


@pytest.mark.parametrize(("n", "percent", "cap"), [(4, 50, 2), (4, 10, 1), (20, 10, 2), (3, 0, 1)])
def test_max_ejection_percent_caps_ejections_but_allows_one(n: int, percent: int, cap: int) -> None:
    health, _ = _health(
        n, outlier_detection={"consecutive_failures": 1, "max_ejection_percent": percent}
    )
    for i in range(n):
        health.failed(health.endpoints[i], UNAVAILABLE)
    assert health.states().count(S.EJECTED) == cap
    assert len(_eligible(health)) == n - cap


def test_a_passed_check_ends_an_ejection_early() -> None:
    health, clock = _health(2, outlier_detection={"consecutive_failures": 1})
    health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.EJECTED
    health.check_passed(health.endpoints[0])
    assert _state(health, 0) is S.SERVING
    assert clock.pending() == []  # the ejection's timer is gone


def test_a_failed_check_while_ejected_leaves_it_not_serving() -> None:
    health, clock = _health(2, outlier_detection={"consecutive_failures": 1})
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.check_failed(health.endpoints[0], "NOT_SERVING", explicit=True)
    assert _state(health, 0) is S.NOT_SERVING
    clock.advance(1000)
    assert _state(health, 0) is S.NOT_SERVING  # the ejection's end does not bring it back


def test_slow_start_ramps_the_weight_by_envoys_formula() -> None:
    health, clock = _health(
        2,
        weights=[1, 1],
        slow_start={"window": 10, "aggression": 2, "min_weight_percent": 20},
    )
    health.check_passed(health.endpoints[0])
    health.check_passed(health.endpoints[1])
    health.check_failed(health.endpoints[1], "NOT_SERVING", explicit=True)
    health.check_passed(health.endpoints[1])
    health.check_passed(health.endpoints[1])  # back in rotation now: ramp from here
    b = health.balancer
    assert b.endpoints[1].share == pytest.approx(0.2)  # max(0.2, 0 ** 0.5)
    clock.advance(1)  # steps come every window / 10
    assert b.endpoints[1].share == pytest.approx((1 / 10) ** 0.5)
    clock.advance(1)
    assert b.endpoints[1].share == pytest.approx((2 / 10) ** 0.5)
    clock.advance(4)
    assert b.endpoints[1].share == pytest.approx((6 / 10) ** 0.5)
    got = _picks(health, 1000)
    assert got[1] / got[0] == pytest.approx((6 / 10) ** 0.5, rel=0.02)
    clock.advance(5)
    assert b.endpoints[1].share == 1.0
    assert clock.pending() == []  # no more steps once ramped
    got = _picks(health, 1000)
    assert got[0] == got[1] == 500


def test_no_slow_start_at_start_up_nor_when_off() -> None:
    health, _ = _health(2, slow_start={"window": 10})
    health.check_passed(health.endpoints[0])
    assert health.balancer.endpoints[0].share == 1.0  # from UNKNOWN: all start together
    health2, clock2 = _health(2)
    health2.check_failed(health2.endpoints[0], "x", explicit=True)
    health2.check_passed(health2.endpoints[0])
    health2.check_passed(health2.endpoints[0])
    assert health2.balancer.endpoints[0].share == 1.0
    assert clock2.pending() == []


def test_panic_routes_to_all_but_draining_below_the_threshold() -> None:
    health, _ = _health(4, panic_threshold=50)
    for i in range(4):
        health.check_passed(health.endpoints[i])
    health.check_failed(health.endpoints[0], "x", explicit=True)
    assert not health.panic and _eligible(health) == [1, 2, 3]
    health.check_failed(health.endpoints[1], "x", explicit=True)
    assert not health.panic  # 2 of 4 healthy: 50% is not below 50%
    health.check_failed(health.endpoints[2], "x", explicit=True)
    assert health.panic
    assert _eligible(health) == [0, 1, 2, 3]
    health.check_passed(health.endpoints[2])
    health.check_passed(health.endpoints[2])
    assert not health.panic and _eligible(health) == [2, 3]


def test_panic_is_off_by_default() -> None:
    health, _ = _health(2)
    for i in range(2):
        health.check_failed(health.endpoints[i], "x", explicit=True)
    assert not health.panic and _eligible(health) == []


def test_drain_takes_everything_out_for_good() -> None:
    health, clock = _health(3, outlier_detection={"consecutive_failures": 1})
    health.failed(health.endpoints[0], UNAVAILABLE)
    health.drain()
    assert health.states() == [S.DRAINING] * 3
    assert _eligible(health) == []
    health.check_passed(health.endpoints[1])  # late results change nothing
    health.check_failed(health.endpoints[1], "x", explicit=True)
    health.failed(health.endpoints[1], UNAVAILABLE)
    clock.advance(1000)
    assert health.states() == [S.DRAINING] * 3


def test_listeners_hear_every_change_and_serving_follows_rotation() -> None:
    health, _ = _health(2)
    heard: list[bool] = []
    health.on_change(lambda h: heard.append(h.serving))
    health.check_failed(health.endpoints[0], "x", explicit=True)
    health.check_failed(health.endpoints[1], "x", explicit=True)
    health.check_passed(health.endpoints[1])
    health.check_passed(health.endpoints[1])
    assert heard == [True, False, True]


def test_each_change_is_one_structured_log_line(caplog: pytest.LogCaptureFixture) -> None:
    health, _ = _health(2)
    with caplog.at_level(logging.INFO, logger="lbgw.endpoints"):
        health.check_passed(health.endpoints[0])
        health.check_passed(health.endpoints[0])  # no change: no line
        health.check_failed(health.endpoints[0], "NOT_SERVING", explicit=True)
    lines = [vars(r)[_FIELDS] for r in caplog.records if r.getMessage() == "endpoint state"]
    assert [(f["previous"], f["state"], f["reason"]) for f in lines] == [
        ("unknown", "serving", "check passed"),
        ("serving", "not_serving", "NOT_SERVING"),
    ]
    assert all(f["endpoint"] == "127.0.0.1:5000" and f["cluster"] == "c" for f in lines)


def test_repr_shows_the_states() -> None:
    health, _ = _health(3)
    health.check_passed(health.endpoints[0])
    health.check_failed(health.endpoints[1], "x", explicit=True)
    assert repr(health) == "<ClusterHealth c [1 serving, 1 not_serving, 1 unknown]>"


def test_a_retry_pick_never_returns_the_excluded_endpoint_and_leaves_it_in() -> None:
    health, _ = _health(3)
    b = health.balancer
    for exclude in b.endpoints:
        for _ in range(10):
            e = b.pick(exclude)
            b.done(e, 0, None)
            assert e is not exclude
    for i in (1, 2):
        health.check_failed(health.endpoints[i], "x", explicit=True)
    with pytest.raises(NoEligibleEndpointError, match="is healthy"):
        b.pick(b.endpoints[0])
    assert b.kernel.is_eligible(0)  # never taken out for the pick
    assert [b.kernel.in_flight(i) for i in range(3)] == [0, 0, 0]


def test_passive_ejection_never_takes_the_last_endpoint_in_rotation() -> None:
    health, _ = _health(1)
    for _ in range(20):
        health.failed(health.endpoints[0], UNAVAILABLE)
    assert _state(health, 0) is S.UNKNOWN and health.serving
    three, _ = _health(3, outlier_detection={"max_ejection_percent": 100})
    three.check_failed(three.endpoints[1], "x", explicit=True)
    three.check_failed(three.endpoints[2], "x", explicit=True)
    for _ in range(5):
        three.failed(three.endpoints[0], UNAVAILABLE)
    assert three.states() == [S.UNKNOWN, S.NOT_SERVING, S.NOT_SERVING]
    assert _eligible(three) == [0]


def test_a_refused_ejection_is_said_once_until_the_endpoint_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health, _ = _health(5)  # the default 10%: one endpoint ejected at most
    with caplog.at_level(logging.WARNING, logger="lbgw.endpoints"):
        for _ in range(2000):
            for i in range(5):
                health.failed(health.endpoints[i], UNAVAILABLE)
        refused = [r for r in caplog.records if r.getMessage() == "ejection refused"]
        assert health.states().count(S.EJECTED) == 1
        assert len(refused) == 4  # once for each endpoint left in, not once per 5 failures
        health.succeeded(health.endpoints[1])
        for _ in range(5):
            health.failed(health.endpoints[1], UNAVAILABLE)
        refused = [r for r in caplog.records if r.getMessage() == "ejection refused"]
        assert len(refused) == 5


def test_draining_is_not_a_panic(caplog: pytest.LogCaptureFixture) -> None:
    health, _ = _health(2, panic_threshold=50)
    with caplog.at_level(logging.WARNING, logger="lbgw.endpoints"):
        health.drain()
    assert not health.panic
    assert not [r for r in caplog.records if r.getMessage() == "panic"]
