"""Retries' picks: ``pick_excluding(i)``, "any backend but i", on both twins.

A retry must not go back to the backend that just failed, and must not cost
that backend its place: the old way (take it out of rotation, pick, put it
back) rebuilt the kernel twice and, in SWRR, skipped its accrual, so a
backend excluded from every tenth pick lost a tenth of its share. What is
checked here is what a user notices: exact pick sequences worked by hand,
shares over many cycles, and that an exclusion touches nothing else. The
hashing kernels' ``pick_key_excluding`` is tested in ``test_hash_kernels.py``,
twin parity in ``test_parity.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from lbgw._typing import EwmaKernel, Kernel, LeastRequestKernel
from tests.unit.kernel_support import (
    EWMA_CLASSES,
    FACTORIES,
    HASH_KERNELS,
    MS,
    T0,
    Impl,
    picks,
)

SCAN = 1 << 30  # an edf_threshold no test reaches: nginx's scan
WEIGHTS = [5, 1, 1, 2, 3, 1, 1]


def excluding_every_tenth(k: Kernel, i: int, count: int) -> Counter[int]:
    """``count`` picks, every tenth of them ``pick_excluding(i)``; how many each backend got."""
    return Counter(k.pick_excluding(i) if n % 10 == 9 else k.pick() for n in range(count))


# --- Shares: the excluded backend is served later, not less ----------------------


@pytest.mark.parametrize("threshold", [SCAN, 1], ids=["scan", "edf"])
def test_swrr_excluded_backend_keeps_its_share(impl: Impl, threshold: int) -> None:
    """Backend 0 (weight 5 of 14) excluded from every tenth of 14,000 picks (1,000 cycles)
    still gets 5/14 of them, and every other backend its weight's share, to within 1%."""
    s = impl.SmoothWeightedRoundRobin(WEIGHTS, edf_threshold=threshold)
    assert s.scheduler == ("edf" if threshold == 1 else "swrr")
    count = 1000 * sum(WEIGHTS)
    counts = excluding_every_tenth(s, 0, count)
    for i, w in enumerate(WEIGHTS):
        share = counts[i] / count
        assert abs(share / (w / sum(WEIGHTS)) - 1) <= 0.01, (i, counts)


@pytest.mark.parametrize("threshold", [SCAN, 1], ids=["scan", "edf"])
def test_swrr_toggling_instead_costs_the_excluded_backend_a_tenth(
    impl: Impl, threshold: int
) -> None:
    """Why the kernels have the operation: the old toggle, on the same schedule, leaves
    backend 0 at about 90% of its share, which the test above would catch."""
    s = impl.SmoothWeightedRoundRobin(WEIGHTS, edf_threshold=threshold)
    count = 1000 * sum(WEIGHTS)
    counts: Counter[int] = Counter()
    for n in range(count):
        if n % 10 == 9:
            s.set_eligible(0, False)
            counts[s.pick()] += 1
            s.set_eligible(0, True)
        else:
            counts[s.pick()] += 1
    assert counts[0] / count / (5 / 14) < 0.92


def test_round_robin_excluded_backend_keeps_its_share(impl: Impl) -> None:
    """Round robin ignores weights above 0: a seventh each, to within 1% (in fact exact,
    give or take the pass under way: every pass serves every backend once)."""
    rr = impl.RoundRobin(len(WEIGHTS))
    counts = excluding_every_tenth(rr, 0, 14_000)
    assert all(abs(counts[i] / 14_000 * 7 - 1) <= 0.01 for i in range(7)), counts
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_least_request_edf_excluded_backend_keeps_its_share(impl: Impl) -> None:
    """Unequal weights schedule by EDF; backend 2 excluded from every tenth pick keeps its
    deadline, is served next, and the 600 picks are exactly 1:2:3 as without exclusions."""
    lr = impl.LeastRequest([1, 2, 3, 0], seed=3)
    assert excluding_every_tenth(lr, 2, 600) == {0: 100, 1: 200, 2: 300}


@pytest.mark.parametrize(
    ("weights", "excluded", "shares"),
    [
        ([1, 2, 3, 4], 3, {0: 1 / 6, 1: 2 / 6, 2: 3 / 6}),  # rejection, mostly one try
        ([1000, 1, 1], 0, {1: 1 / 2, 2: 1 / 2}),  # 0 is 99.8%: mostly the direct draw
        ([3, 3, 3, 3, 3], 2, {0: 1 / 4, 1: 1 / 4, 3: 1 / 4, 4: 1 / 4}),  # uniform
    ],
)
def test_random_excluding_draws_from_the_others_by_weight(
    impl: Impl, weights: list[int], excluded: int, shares: dict[int, float]
) -> None:
    r = impl.Random(weights, seed=2024)
    counts = Counter(r.pick_excluding(excluded) for _ in range(40_000))
    assert set(counts) == set(shares)
    for i, share in shares.items():
        assert abs(counts[i] / 40_000 - share) < 0.01, counts


# --- Exact sequences, worked by hand ------------------------------------------


def test_swrr_scan_excluding_the_winner_serves_it_next(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([5, 1, 1])
    # Current weights start at 0, 0, 0 and the total is 7. Excluding 0: all three accrue
    # (5, 1, 1); 0 is skipped, 1 wins the tie with 2 and loses 7: 5, -6, 1. Then plain
    # picks: 10 -5 2 -> 0 wins: 3 -5 2 | 8 -4 3 -> 0: 1 -4 3 | 6 -3 4 -> 0: -1 -3 4 |
    # 4 -2 5 -> 2: 4 -2 -2 | 9 -1 -1 -> 0: 2 -1 -1 | 7 0 0 -> 0: 0 0 0, back to the start.
    assert [s.pick_excluding(0), *picks(s, 6)] == [1, 0, 0, 0, 2, 0, 0]
    assert picks(s, 7) == [0, 0, 1, 0, 2, 0, 0]  # nginx's cycle again
    # Mid-cycle, twice in a row: -4 2 2 after two picks; excluding 0 gives 1 3 3 -> 1
    # (1 -4 3), then 6 -3 4 -> 2 (6 -3 -3); 0 then gets its three turns: 5, 1, 1 a cycle.
    s = impl.SmoothWeightedRoundRobin([5, 1, 1])
    assert [*picks(s, 2), s.pick_excluding(0), s.pick_excluding(0), *picks(s, 3)] == [
        0,
        0,
        1,
        2,
        0,
        0,
        0,
    ]
    assert [s.current_weight(i) for i in range(3)] == [0, 0, 0]


def test_swrr_edf_excluding_the_top_serves_the_next_due(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([5, 1, 1], edf_threshold=1)
    # Deadlines (k - 1/2) / w: 0 at 1/10, 3/10, 5/10, 7/10, 9/10; 1 and 2 at 5/10. After
    # two picks 0 is at 5/10, first on the tie: excluding it serves 1 (5/10, before 2 by
    # index) and then 2; 0 keeps 5/10 and is served next, then at 7/10 and 9/10.
    assert [*picks(s, 2), s.pick_excluding(0), s.pick_excluding(0), *picks(s, 3)] == [
        0,
        0,
        1,
        2,
        0,
        0,
        0,
    ]
    assert picks(s, 7) == [0, 0, 0, 1, 2, 0, 0]  # the EDF cycle again
    # Excluding a backend that is not due first changes nothing.
    assert [s.pick_excluding(2), *picks(s, 6)] == [0, 0, 0, 1, 2, 0, 0]


def test_round_robin_excluded_backend_keeps_its_turn(impl: Impl) -> None:
    rr = impl.RoundRobin(3)
    # 1 is next: 2 is served now, in place of its turn; 1 stays next, and the pass ends
    # there (2's turn is taken). Passes: [0, 2, 1], [0, 1, 2], in index order again.
    assert [rr.pick(), rr.pick_excluding(1), *picks(rr, 5)] == [0, 2, 1, 0, 1, 2, 0]
    rr = impl.RoundRobin(3)
    # 2 is next and last: the turn after it is the next pass's 0. Passes: [0, 1, 0] + 2
    # late, then [1, 2] (0's taken), then [0, 1, 2].
    assert [*picks(rr, 2), rr.pick_excluding(2), *picks(rr, 6)] == [0, 1, 0, 2, 1, 2, 0, 1, 2]
    # A backend that is not next is a plain pick.
    assert [rr.pick_excluding(2), *picks(rr, 2)] == [0, 1, 2]
    rr = impl.RoundRobin(3)
    # Excluded again while still next: 2's turn, then the next pass's 0; with every other
    # turn of the pass taken, a further exclusion gives the one after it (2) an extra turn.
    assert [rr.pick(), *(rr.pick_excluding(1) for _ in range(4)), *picks(rr, 6)] == [
        *[0, 2, 0, 2, 2],
        *[1, 1, 2, 0, 1, 2],
    ]
    rr = impl.RoundRobin(4)
    assert [rr.pick(), rr.pick_excluding(1)] == [0, 2]
    # A change in rotation forgets the turn taken early and carries on after the last
    # backend pick() served (0), so 2 is served again in this pass.
    rr.set_eligible(3, False)
    assert picks(rr, 6) == [1, 2, 0, 1, 2, 0]


def test_swrr_excluding_keeps_the_excluded_current_weight(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([1, 1, 1])
    assert s.pick() == 0  # current weights -2, 1, 1
    # All accrue (-1, 2, 2); 1 would win, 2 does: -1, 2, -1. 1 keeps 2, accrued included;
    # toggled out instead, it would have stayed at 1.
    assert s.pick_excluding(1) == 2
    assert [s.current_weight(i) for i in range(3)] == [-1, 2, -1]
    assert s.pick() == 1  # 0, 3, 0: it is served next
    assert [s.current_weight(i) for i in range(3)] == [0, 0, 0]


# --- What every kernel promises ------------------------------------------------


@pytest.mark.parametrize("kernel", FACTORIES)
def test_pick_excluding_never_returns_the_excluded_backend(impl: Impl, kernel: str) -> None:
    weights = [1, 3, 0, 2, 1, 5]
    k = FACTORIES[kernel](impl, weights)
    k.set_eligible(4, False)
    k.started(1)
    rotation = {0, 1, 3, 5}
    for r in range(300):
        i = r % len(weights)
        got = k.pick_excluding(i)
        assert got != i and got in rotation, (i, got)
        if isinstance(k, EWMA_CLASSES):
            got = k.pick_p2c_excluding(i)
            assert got != i and got in rotation, (i, got)
        k.pick()
    assert [k.is_eligible(i) for i in range(6)] == [True] * 4 + [False, True]
    assert [k.in_flight(i) for i in range(6)] == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("kernel", FACTORIES)
def test_pick_excluding_the_only_backend_gives_minus_one_and_changes_nothing(
    impl: Impl, kernel: str
) -> None:
    k = FACTORIES[kernel](impl, [2, 3, 0])
    ref = FACTORIES[kernel](impl, [2, 3, 0])
    for kk in (k, ref):
        kk.set_eligible(0, False)
        picks(kk, 3)
    assert [k.pick_excluding(1) for _ in range(5)] == [-1] * 5
    if kernel in HASH_KERNELS:
        # A keyless hashing pick draws whatever it finds, as pick() does.
        picks(ref, 5)
    else:
        assert k.pick_many(0) == 0
    if isinstance(k, EWMA_CLASSES):
        assert [k.pick_p2c_excluding(1) for _ in range(5)] == [-1] * 5
    assert picks(k, 10) == picks(ref, 10)
    k.set_eligible(0, True)
    ref.set_eligible(0, True)
    assert picks(k, 20) == picks(ref, 20)


@pytest.mark.parametrize("kernel", FACTORIES)
@pytest.mark.parametrize("excluded", [-1, 2, 4, 6, 2**64, -(2**70)])
def test_pick_excluding_no_backend_in_rotation_is_pick(
    impl: Impl, kernel: str, excluded: int
) -> None:
    """-1, an index out of range, an ineligible backend (2) or one of weight 0 (4)."""
    weights = [1, 2, 3, 1, 0, 2]
    k = FACTORIES[kernel](impl, weights)
    ref = FACTORIES[kernel](impl, weights)
    k.set_eligible(2, False)
    ref.set_eligible(2, False)
    assert [k.pick_excluding(excluded) for _ in range(50)] == picks(ref, 50)
    if isinstance(k, EWMA_CLASSES):
        assert isinstance(ref, EWMA_CLASSES)
        assert [k.pick_p2c_excluding(excluded) for _ in range(50)] == [
            ref.pick_p2c() for _ in range(50)
        ]
    assert picks(k, 30) == picks(ref, 30)


@pytest.mark.parametrize("kernel", FACTORIES)
def test_pick_excluding_takes_only_integers(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [1, 1])
    for bad in (1.0, "1", None):
        with pytest.raises(TypeError):
            k.pick_excluding(bad)  # type: ignore[arg-type]


# --- peek_two(exclude): the pair the next excluding pick compares -----------------


def test_least_request_peek_two_names_the_pair_pick_excluding_compares(impl: Impl) -> None:
    k: LeastRequestKernel = impl.LeastRequest([1] * 6, seed=11)
    k.started(2)
    k.started(2)
    k.started(4)
    for r in range(300):
        x = r % 7 - 1  # -1, then every backend in turn
        a, b = k.peek_two(x)
        assert a != b and x not in (a, b) and {a, b} <= set(range(6))
        assert k.peek_two(x) == (a, b)  # peeking draws nothing
        if x < 0:
            assert k.peek_two() == (a, b)
        expected = b if k.in_flight(b) < k.in_flight(a) else a
        assert (k.pick_excluding(x) if x >= 0 else k.pick()) == expected
    for i in (3, 4, 5):
        k.set_eligible(i, False)
    # 0, 1, 2 in rotation: excluding 0 leaves the pair 1, 2; excluding 3 (out) excludes none.
    assert set(k.peek_two(0)) == {1, 2}
    assert k.peek_two(3) == k.peek_two()
    k.set_eligible(2, False)  # 0 and 1: excluding 0 leaves 1, no draw
    assert k.peek_two(0) == (-1, -1)
    assert [k.pick_excluding(0) for _ in range(5)] == [1] * 5
    k.set_weight(0, 3)  # unequal weights: the EDF schedule picks, no pair
    assert k.peek_two(1) == (-1, -1)


def test_ewma_peek_two_names_the_pair_pick_p2c_excluding_compares(impl: Impl) -> None:
    k: EwmaKernel = impl.PeakEwma(5, seed=4)
    k.observe(1, 50 * MS, T0)
    k.observe(3, 1 * MS, T0)
    k.started(0)
    for r in range(300):
        x = r % 6 - 1
        a, b = k.peek_two(x)
        assert a != b and x not in (a, b)
        expected = b if k.cost(b, T0) < k.cost(a, T0) else a
        assert (k.pick_p2c_excluding(x) if x >= 0 else k.pick_p2c()) == expected
    for i in (0, 1, 2):
        k.set_eligible(i, False)
    assert k.peek_two(3) == (-1, -1)  # only 4 besides it
    assert k.peek_two(0) == k.peek_two()  # 0 is out: it excludes nothing
    assert [k.pick_p2c_excluding(3) for _ in range(5)] == [4] * 5


def test_ewma_pick_excluding_is_the_lowest_cost_of_the_others(impl: Impl) -> None:
    e = impl.PeakEwma(4, default_rtt_s=0.0001, seed=5)
    for i, rtt in enumerate([5, 1, 4, 1]):
        e.observe(i, rtt * MS, T0)
    assert e.pick() == 1  # 1 and 3 tie at 1 ms: the lower index
    assert e.pick_excluding(1) == 3
    assert e.pick_excluding(3) == 1
    e.started(3)
    assert e.pick_excluding(1) == 3  # 2 ms loaded, still below 4 ms
    for _ in range(4):
        e.started(3)
    assert e.pick_excluding(1) == 2  # 6 ms loaded: 2, at 4 ms, is the cheapest other
    assert e.pick() == 1
