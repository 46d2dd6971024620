"""What ``Balancer.candidates`` tells a trace: the endpoints the next pick compares.

The figures must be the ones the pick is about to use, so each test takes
the candidates, then picks, and checks that the pick agrees with them.
"""

from __future__ import annotations

from typing import Any

import pytest

from lbgw.balancer import Balancer
from lbgw.config import config_from_mapping


def _balancer(strategy: str, weights: list[int], **params: Any) -> Balancer:
    endpoints = [{"address": f"10.0.0.{i}:1", "weight": w} for i, w in enumerate(weights)]
    data = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {"c": {"endpoints": endpoints, "strategy": strategy, "params": params}},
    }
    return Balancer(config_from_mapping(data, "<test>").clusters[0])


def _index(b: Balancer, address: str) -> int:
    return b.addresses.index(address)


@pytest.mark.parametrize(
    ("strategy", "weights", "params"),
    [
        ("least_request", [1, 1, 1, 1, 1], {"seed": 5}),
        ("ewma", [1, 1, 1, 1, 1], {"seed": 5}),
    ],
)
def test_a_p2c_pick_lists_its_two_draws_and_picks_one_of_them(
    strategy: str, weights: list[int], params: dict[str, Any]
) -> None:
    b = _balancer(strategy, weights, **params)
    for _ in range(100):
        candidates = b.candidates()
        assert len(candidates) == 2
        i = b.pick()
        assert i in {_index(b, a) for a, _ in candidates}
        loads = {a: s["in_flight"] for a, s in candidates}
        if strategy == "least_request":
            assert loads[b.addresses[i]] == min(loads.values())
        if strategy == "ewma":
            assert all("cost" in s for _, s in candidates)


def test_swrr_lists_current_weights_and_the_pick_takes_the_largest_after_adding_weights() -> None:
    b = _balancer("swrr", [5, 1, 1])
    for _ in range(14):
        candidates = b.candidates()
        score = {a: s["current_weight"] + s["weight"] for a, s in candidates}
        best = max(score.values())
        i = b.pick()
        assert score[b.addresses[i]] == best
        b.done(i, 0, None)


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
