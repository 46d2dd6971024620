"""What ``Balancer.candidates`` tells a trace: the endpoints the next pick compares.

The figures must be the ones the pick is about to use, so each test takes
the candidates, then picks, and checks that the pick agrees with them.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any

import pytest

from lbgw.balancer import Balancer
from lbgw.config import config_from_mapping
from lbgw.endpoints import Endpoint


def _balancer(strategy: str, weights: list[int], **params: Any) -> Balancer:
    endpoints = [{"address": f"10.0.0.{i}:1", "weight": w} for i, w in enumerate(weights)]
    data = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {"c": {"endpoints": endpoints, "strategy": strategy, "params": params}},
    }
    return Balancer(config_from_mapping(data, "<test>").clusters[0])


@pytest.mark.parametrize(
    ("strategy", "weights", "params"),
    [
        ("least_request", [1, 1, 1, 1, 1], {"seed": 5}),
        ("ewma", [1, 1, 1, 1, 1], {"seed": 5}),
    ],
)
def test_a_p2c_pick_lists_its_two_draws_and_picks_the_cheaper(
    strategy: str, weights: list[int], params: dict[str, Any]
) -> None:
    b = _balancer(strategy, weights, **params)
    # Distinct latencies (1 ms, 2 ms, ...), so the EWMA costs differ.
    for i in range(len(b.endpoints)):
        b.kernel.observe(i, (i + 1) * 1_000_000, 1_000_000_000)
    held = []
    for n in range(100):
        candidates = b.candidates()
        assert len(candidates) == 2
        e = b.pick()
        figures = dict(candidates)
        assert e.address in figures
        key = "in_flight" if strategy == "least_request" else "cost"
        assert figures[e.address][key] == min(f[key] for f in figures.values())
        if n % 3:
            held.append(e)  # keep some calls in flight, so the loads differ
        else:
            b.done(e, 0, None)
    for e in held:
        b.done(e, 0, None)


@pytest.mark.parametrize("strategy", ["least_request", "ewma"])
def test_a_retrys_candidates_leave_out_the_tried_endpoint_and_the_pick_agrees(
    strategy: str,
) -> None:
    b = _balancer(strategy, [1, 1, 1, 1], seed=9)
    tried = b.endpoints[2]
    for _ in range(50):
        listed = {a for a, _ in b.candidates(exclude=tried)}
        assert tried.address not in listed and len(listed) == 2
        e = b.pick(tried)
        assert e.address in listed
        b.done(e, 0, None)


def test_swrr_lists_current_weights_and_the_pick_takes_the_largest_after_adding_weights() -> None:
    b = _balancer("swrr", [5, 1, 1])
    for _ in range(14):
        candidates = b.candidates()
        score = {a: s["current_weight"] + s["weight"] for a, s in candidates}
        best = max(score.values())
        e = b.pick()
        assert score[e.address] == best
        b.done(e, 0, None)


def test_ewma_best_and_the_other_strategies_list_every_endpoint_in_rotation() -> None:
    for strategy, params in (
        ("ewma", {"choice": "best"}),
        ("round_robin", {}),
        ("random", {}),
        ("least_request", {}),  # unequal weights: its EDF schedule, no pair
    ):
        b = _balancer(strategy, [1, 2, 3], **params)
        b.set_eligible(1, False)
        assert [a for a, _ in b.candidates()] == ["10.0.0.0:1", "10.0.0.2:1"], strategy


def test_candidates_are_capped() -> None:
    b = _balancer("round_robin", [1] * 40)
    assert len(b.candidates()) == 16
    assert len(b.candidates(limit=3)) == 3


def test_peak_ewma_carries_an_estimate_to_another_kernel(impl: ModuleType) -> None:
    old = impl.PeakEwma(3, 10.0, 0.03)
    old.observe(1, 7_000_000, 5_000_000_000)  # 7 ms: below the 30 ms default, so averaged
    old.observe(2, 90_000_000, 5_000_000_000)  # 90 ms: the peak is taken at once
    new = impl.PeakEwma(2, 10.0, 0.03)
    now = 6_000_000_000
    for j, i in ((0, 2), (1, 1)):
        new.restore_estimate(j, old.estimate(i, now), now)
        assert new.estimate(j, now) == pytest.approx(old.estimate(i, now), rel=1e-12)
        assert new.cost(j, now) == pytest.approx(old.cost(i, now), rel=1e-12)
    assert new.pick() == 1  # the cheaper one, as in the old kernel


def test_a_rebuild_keeps_what_the_kernels_knew_of_the_endpoints_that_stay() -> None:
    b = _balancer("ewma", [1, 1, 1], choice="best")
    a, gone, c = b.endpoints
    now = time.monotonic_ns()
    b.kernel.observe(a.index, 80_000_000, now)  # a: slow (a peak is taken at once)
    b.kernel.observe(gone.index, 60_000_000, now)
    b.kernel.observe(c.index, 40_000_000, now)  # c: the fastest
    calls = [b.pick()]
    assert calls[0] is c
    old, was = b.kernel, {e.address: e.index for e in (a, c)}
    new = Endpoint("10.0.0.9:1", 1)
    b.rebuild([c, new, a])
    assert [e.index for e in (c, new, a)] == [0, 1, 2]
    assert b.endpoints == (c, new, a)
    assert [b.kernel.in_flight(i) for i in range(3)] == [1, 0, 0]  # c's call is still on it
    later = time.monotonic_ns()
    for e in (a, c):
        expected = old.estimate(was[e.address], later)  # type: ignore[attr-defined]
        assert b.kernel.estimate(e.index, later) == pytest.approx(expected, rel=1e-9)  # type: ignore[attr-defined]
    for e in calls:
        b.done(e, 0, None)
    assert [b.kernel.in_flight(i) for i in range(3)] == [0, 0, 0]
    assert gone.index == 1  # the balancer leaves a removed endpoint to its cluster (-1 there)
