"""The picking kernels: exact pick sequences, shares and costs, on both twins.

Every test that takes ``impl`` runs on the pure-Python twins (``lbgw.picking``)
and on the compiled kernels (``lbgw._fastpick``); the parity tests drive both
side by side and require identical pick sequences. The contracts checked here
are the ones the docstrings in ``lbgw/picking.py`` state.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from lbgw import _fastpick
from lbgw._typing import Kernel
from tests.unit.kernel_support import (
    EWMA_CLASSES,
    FACTORIES,
    HASH_KERNELS,
    MAX_WEIGHT,
    MS,
    SECOND,
    T0,
    Impl,
    all_picks,
    max_runs,
    p2c_picks,
    picks,
    with_weights,
)

# --- SmoothWeightedRoundRobin: exact sequences ---------------------------------


def test_swrr_5_1_1_is_nginx_sequence(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([5, 1, 1])
    assert s.scheduler == "swrr"
    assert picks(s, 21) == [0, 0, 1, 0, 2, 0, 0] * 3


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        # Worked by hand from ngx_http_upstream_get_peer: add weights, take the
        # largest current weight (first on a tie), subtract the total from it.
        ([4, 2, 1], [0, 1, 0, 2, 0, 1, 0]),
        ([1, 1, 1], [0, 1, 2]),
        ([2, 3], [1, 0, 1, 0, 1]),
        ([3, 2, 0, 1], [0, 1, 0, 3, 1, 0]),
        ([1], [0]),
    ],
)
def test_swrr_hand_checked_sequences(impl: Impl, weights: list[int], cycle: list[int]) -> None:
    s = impl.SmoothWeightedRoundRobin(weights)
    assert picks(s, 3 * len(cycle)) == cycle * 3


@pytest.mark.parametrize(
    ("weights", "cycle"),
    [
        # Deadlines (k - 1/2) / w, ties to the lower index.
        ([5, 1, 1], [0, 0, 0, 1, 2, 0, 0]),
        ([4, 2, 1], [0, 1, 0, 2, 0, 1, 0]),
        ([2, 3], [1, 0, 1, 0, 1]),
        ([1, 5], [1, 1, 0, 1, 1, 1]),
    ],
)
def test_swrr_edf_hand_checked_sequences(impl: Impl, weights: list[int], cycle: list[int]) -> None:
    s = impl.SmoothWeightedRoundRobin(weights, edf_threshold=1)
    assert s.scheduler == "edf"
    assert picks(s, 3 * len(cycle)) == cycle * 3


def test_swrr_backend_keeps_current_weight_out_of_rotation(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([1, 1, 1])
    assert s.pick() == 0  # current weights now [-2, 1, 1]
    s.set_eligible(0, False)
    assert picks(s, 2) == [1, 2]
    s.set_eligible(0, True)
    # 0 comes back still at -2, so it waits; a reset would have picked it first.
    assert picks(s, 6) == [1, 2, 0, 1, 2, 0]


def test_swrr_edf_change_keeps_the_schedule(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([1, 1, 1], edf_threshold=1)
    # All three are due at 1/2; 0 and 1 are served and move on to 3/2.
    assert picks(s, 2) == [0, 1]
    # 2 is reweighted at t = 1/2: its next deadline is the first u/4 after it, 3/4.
    # Served there, it moves to 5/4; every deadline is then past 1 and moves back
    # by 1: 0 and 1 to 1/2, 2 to 1/4. A restarted cycle would have served 0 first.
    s.set_weight(2, 2)
    assert picks(s, 4) == [2, 2, 0, 1]
    # 1 leaves; 0 and 2 keep their deadlines (3/2 and 3/4).
    s.set_eligible(1, False)
    assert picks(s, 6) == [2, 2, 0] * 2


def test_swrr_scheduler_switches_at_edf_threshold(impl: Impl) -> None:
    assert impl.EDF_THRESHOLD == 64
    below = impl.SmoothWeightedRoundRobin([1] * (impl.EDF_THRESHOLD - 1))
    at = impl.SmoothWeightedRoundRobin([1] * impl.EDF_THRESHOLD)
    assert (below.scheduler, at.scheduler) == ("swrr", "edf")
    assert impl.SmoothWeightedRoundRobin([], edf_threshold=1).scheduler == "swrr"
    assert impl.SmoothWeightedRoundRobin([3], edf_threshold=1).scheduler == "edf"
    assert impl.SmoothWeightedRoundRobin([3, 3], edf_threshold=3).scheduler == "swrr"


def test_swrr_default_edf_gives_exact_shares(impl: Impl) -> None:
    weights = [(i * 7) % 5 for i in range(impl.EDF_THRESHOLD + 3)]
    s = impl.SmoothWeightedRoundRobin(weights)
    assert s.scheduler == "edf"
    for _ in range(2):
        counts = Counter(picks(s, sum(weights)))
        assert counts == {i: w for i, w in enumerate(weights) if w}


positive_weight_lists = st.lists(st.integers(0, 12), min_size=1, max_size=9).filter(any)


@pytest.mark.parametrize("threshold", [128, 1], ids=["swrr", "edf"])
@given(weights=positive_weight_lists)
def test_swrr_each_cycle_gives_exact_shares(impl: Impl, threshold: int, weights: list[int]) -> None:
    s = impl.SmoothWeightedRoundRobin(weights, edf_threshold=threshold)
    assert s.scheduler == ("edf" if threshold == 1 else "swrr")
    expected = {i: w for i, w in enumerate(weights) if w}
    for _ in range(3):
        assert Counter(picks(s, sum(weights))) == expected


@given(weights=positive_weight_lists, warmup=st.integers(0, 30), data=st.data())
def test_swrr_edf_exact_shares_after_change(
    impl: Impl, weights: list[int], warmup: int, data: st.DataObject
) -> None:
    s = impl.SmoothWeightedRoundRobin(weights, edf_threshold=1)
    picks(s, warmup)
    i = data.draw(st.integers(0, len(weights) - 1))
    if data.draw(st.booleans()):
        s.set_eligible(i, False)
        weights = [0 if j == i else w for j, w in enumerate(weights)]
    else:
        weights = [*weights]
        weights[i] = data.draw(st.integers(1, 12))
        s.set_weight(i, weights[i])
    assume(any(weights))
    # The schedule carries on through the change rather than restarting, so the
    # first cycle after it may be off by one at its edges; once the deadlines
    # have moved back past the change, every window of a cycle is exact again.
    expected = {j: w for j, w in enumerate(weights) if w}
    picks(s, 3 * sum(weights))
    for offset in range(3):
        picks(s, offset)
        assert Counter(picks(s, sum(weights))) == expected


two_in_rotation = st.lists(st.integers(0, 12), min_size=2, max_size=9).filter(
    lambda ws: sum(1 for w in ws if w) >= 2
)


@given(weights=two_in_rotation)
def test_swrr_scan_is_smooth(impl: Impl, weights: list[int]) -> None:
    """No backend of weight w is picked more than w times in a row, across cycles too."""
    s = impl.SmoothWeightedRoundRobin(weights)
    runs = max_runs(picks(s, 3 * sum(weights)))
    assert all(run <= weights[i] for i, run in runs.items()), runs


@given(weights=two_in_rotation)
def test_swrr_edf_is_smooth(impl: Impl, weights: list[int]) -> None:
    """The EDF order also keeps every run within w, across cycles too."""
    s = impl.SmoothWeightedRoundRobin(weights, edf_threshold=1)
    runs = max_runs(picks(s, 3 * sum(weights)))
    assert all(run <= weights[i] for i, run in runs.items()), runs


# --- Rotation changes faster than a cycle --------------------------------------


@pytest.mark.parametrize("kernel", [k for k in FACTORIES if k not in ("ewma", *HASH_KERNELS)])
def test_a_flapping_backend_starves_no_other(impl: Impl, kernel: str) -> None:
    """A backend leaving and rejoining every 10 picks (a health check flapping) must not
    skew the others: a scheduler that restarted its cycle on every change would serve the
    same few backends first each time and starve the rest.

    PeakEwma is left out: with no load and no samples every cost ties and its argmin
    takes the lowest index by design. So are the hashing kernels, which schedule
    nothing: their shares are the ring's or table's, and test_hash_kernels.py checks them.
    """
    weights = [1 + i % 3 for i in range(70)]  # 70 backends: EDF for swrr, unequal for LR
    k = FACTORIES[kernel](impl, weights)
    counts: Counter[int] = Counter()
    for r in range(600):
        counts.update(picks(k, 10))
        k.set_eligible(69, r % 2 == 1)
    share = [counts[i] / (1 if kernel == "round_robin" else weights[i]) for i in range(69)]
    tolerance = 0.5 if kernel == "random" else 0.8  # random: sampling noise over ~150 picks
    assert min(share) >= tolerance * max(share), (min(share), max(share))


# --- Nothing in rotation -------------------------------------------------------


@pytest.mark.parametrize("kernel", FACTORIES)
def test_no_backends_gives_minus_one(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [])
    assert k.n == 0
    assert set(all_picks(k, 5)) == {-1}
    assert k.pick_many(4) == -4
    if isinstance(k, EWMA_CLASSES):
        assert k.pick_p2c_many(4) == -4


@pytest.mark.parametrize("kernel", FACTORIES)
def test_all_ineligible_gives_minus_one_until_one_returns(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [1, 2, 3, 4])
    for i in range(4):
        k.set_eligible(i, False)
    assert set(all_picks(k, 10)) == {-1}
    assert k.pick_many(3) == -3
    k.set_eligible(2, True)
    assert set(all_picks(k, 10)) == {2}
    k.set_eligible(0, True)
    if isinstance(k, EWMA_CLASSES):
        # Both at the default estimate: 2 (weight 3) costs a third of 0 (weight 1) until
        # three calls in flight make it cost 4/3 of 0.
        assert set(all_picks(k, 10)) == {2}
        for _ in range(3):
            k.started(2)
        assert set(all_picks(k, 10)) == {0}
    else:
        assert set(all_picks(k, 50)) == {0, 2}


@pytest.mark.parametrize("kernel", FACTORIES)
def test_all_weight_zero_gives_minus_one_until_one_returns(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [0, 0, 0])
    assert set(all_picks(k, 10)) == {-1}
    k.set_weight(1, 3)
    assert set(all_picks(k, 10)) == {1}
    k.set_weight(1, 0)
    assert set(all_picks(k, 10)) == {-1}


@pytest.mark.parametrize("kernel", FACTORIES)
@given(
    weights=st.lists(st.integers(0, 5), min_size=1, max_size=8),
    data=st.data(),
)
def test_out_of_rotation_is_never_picked(
    impl: Impl, kernel: str, weights: list[int], data: st.DataObject
) -> None:
    n = len(weights)
    k = FACTORIES[kernel](impl, weights)
    out = data.draw(st.sets(st.integers(0, n - 1)))
    zeroed = data.draw(st.sets(st.integers(0, n - 1)))
    for i in out:
        k.set_eligible(i, False)
    for i in zeroed:
        k.set_weight(i, 0)
    for i in range(n):
        for _ in range(data.draw(st.integers(0, 3))):
            k.started(i)
    rotation = {i for i in range(n) if weights[i] and i not in out | zeroed}
    seen = set(all_picks(k, 60))
    if rotation:
        assert seen <= rotation
    else:
        assert seen == {-1}
    assert all(k.is_eligible(i) == (i not in out) for i in range(n))


# --- RoundRobin ----------------------------------------------------------------


def test_round_robin_goes_in_index_order(impl: Impl) -> None:
    assert picks(impl.RoundRobin(3), 7) == [0, 1, 2, 0, 1, 2, 0]
    assert picks(impl.RoundRobin(1), 3) == [0, 0, 0]


def test_round_robin_continues_after_last_pick_when_rotation_changes(impl: Impl) -> None:
    rr = impl.RoundRobin(5)
    assert picks(rr, 3) == [0, 1, 2]
    rr.set_eligible(3, False)
    assert picks(rr, 4) == [4, 0, 1, 2]
    rr.set_eligible(2, False)  # the one just picked leaves
    assert picks(rr, 3) == [4, 0, 1]
    rr.set_eligible(3, True)  # comes back after the last pick: next in line
    assert picks(rr, 4) == [3, 4, 0, 1]
    rr.set_eligible(0, True)  # already eligible: no change
    rr.set_weight(4, 0)  # weight 0 takes it out
    assert picks(rr, 4) == [3, 0, 1, 3]
    rr.set_weight(4, 7)  # any weight above 0 puts it back, once per turn
    assert picks(rr, 5) == [4, 0, 1, 3, 4]


def test_round_robin_wraps_when_nothing_follows_the_last_pick(impl: Impl) -> None:
    rr = impl.RoundRobin(4)
    rr.set_eligible(2, False)
    assert picks(rr, 3) == [0, 1, 3]
    rr.set_eligible(2, True)
    assert picks(rr, 5) == [0, 1, 2, 3, 0]


# --- Random --------------------------------------------------------------------


def test_random_same_seed_same_picks(impl: Impl) -> None:
    a = impl.Random([1, 2, 3], seed=42)
    b = impl.Random([1, 2, 3], seed=42)
    first = picks(a, 200)
    assert first == picks(b, 200)
    a.seed(42)
    assert picks(a, 200) == first
    assert picks(impl.Random([1, 2, 3], seed=43), 200) != first
    # Seeds are taken modulo 2**64.
    assert picks(impl.Random([1, 2, 3], seed=42 + 2**64), 200) == first
    assert picks(impl.Random([1, 2, 3], seed=-1), 50) == picks(
        impl.Random([1, 2, 3], seed=2**64 - 1), 50
    )


def test_random_unseeded_instances_differ(impl: Impl) -> None:
    assert picks(impl.Random([1] * 8), 64) != picks(impl.Random([1] * 8), 64)


def test_random_weighted_share_follows_weights(impl: Impl) -> None:
    r = impl.Random([1, 2, 3, 4, 0], seed=2024)
    counts = Counter(picks(r, 40_000))
    assert 4 not in counts
    for i, w in enumerate([1, 2, 3, 4]):
        assert abs(counts[i] / 40_000 - w / 10) < 0.01, counts


def test_random_uniform_share(impl: Impl) -> None:
    r = impl.Random([3] * 5, seed=2024)
    counts = Counter(picks(r, 40_000))
    assert all(abs(counts[i] / 40_000 - 0.2) < 0.01 for i in range(5)), counts


def test_random_equal_weights_are_uniform_whatever_the_weight(impl: Impl) -> None:
    """Equal weights take the uniform path: the weight value does not change the draws."""
    reference = picks(impl.Random([1, 1, 1, 1], seed=9), 300)
    assert picks(impl.Random([5, 5, 5, 5], seed=9), 300) == reference
    assert picks(impl.Random([MAX_WEIGHT] * 4, seed=9), 300) == reference
    # With 2 out, the other three are drawn uniformly among themselves.
    r = impl.Random([2, 2, 0, 2], seed=9)
    assert set(picks(r, 300)) == {0, 1, 3}


# --- LeastRequest --------------------------------------------------------------


def test_least_request_equal_weights_avoid_the_loaded_backend(impl: Impl) -> None:
    lr = impl.LeastRequest([1, 1], seed=3)
    for _ in range(100):
        lr.started(0)
    assert set(picks(lr, 1000)) == {1}
    lr5 = impl.LeastRequest([1] * 5, seed=3)
    for _ in range(100):
        lr5.started(2)
    assert set(picks(lr5, 2000)) == {0, 1, 3, 4}


def test_least_request_p2c_shares_follow_load_rank(impl: Impl) -> None:
    """Loads 0..4: backend i wins a pair with each of the 4 - i busier ones."""
    lr = impl.LeastRequest([1] * 5, seed=3)
    for i in range(5):
        for _ in range(i):
            lr.started(i)
    counts = Counter(picks(lr, 20_000))
    assert counts[4] == 0
    for i in range(4):
        assert abs(counts[i] / 20_000 - (4 - i) / 10) < 0.02, counts


def test_least_request_single_backend(impl: Impl) -> None:
    lr = impl.LeastRequest([1, 1, 1], seed=3)
    lr.set_eligible(0, False)
    lr.set_eligible(2, False)
    lr.started(1)
    assert set(picks(lr, 20)) == {1}


def test_least_request_unequal_weights_share_follows_weight(impl: Impl) -> None:
    lr = impl.LeastRequest([1, 2, 3, 0], seed=3)
    counts = Counter(picks(lr, 600))
    assert counts == {0: 100, 1: 200, 2: 300}


def test_least_request_bias_scales_weight_by_load(impl: Impl) -> None:
    shares = []
    for bias in (0.0, 1.0, 2.0):
        lr = impl.LeastRequest([1, 3], active_request_bias=bias, seed=3)
        for _ in range(5):
            lr.started(1)
        shares.append(Counter(picks(lr, 400))[1])
    # bias 0 ignores load: 3:1. Then weight / 6 ** bias once backend 1 is rescheduled.
    assert shares == [300, 134, 31]


# --- PeakEwma ------------------------------------------------------------------


def test_ewma_picks_the_faster_backend(impl: Impl) -> None:
    # A default below every sample, so each first sample is taken as the peak.
    e = impl.PeakEwma(3, default_rtt_s=0.0001, seed=5)
    e.observe(0, 20 * MS, T0)
    e.observe(1, 1 * MS, T0)
    e.observe(2, 20 * MS, T0)
    assert (e.cost(0, T0), e.cost(1, T0), e.cost(2, T0)) == (20.0 * MS, 1.0 * MS, 20.0 * MS)
    assert set(picks(e, 10)) == {1}
    p2c = Counter(p2c_picks(e, 3000))
    # p2c takes the fast one whenever it is drawn, in 2 pairs out of 3.
    assert abs(p2c[1] / 3000 - 2 / 3) < 0.03, p2c
    # A single slow backend is never the better of two.
    e = impl.PeakEwma(3, default_rtt_s=0.0001, seed=5)
    e.observe(0, 20 * MS, T0)
    e.observe(1, 1 * MS, T0)
    e.observe(2, 1 * MS, T0)
    assert set(p2c_picks(e, 300)) == {1, 2}
    assert set(picks(e, 10)) == {1}  # equal costs: the lower index


@given(
    fast_us=st.integers(100, 50_000),
    factor=st.floats(1.5, 20.0),
    gap_ms=st.integers(1, 2_000),
    rounds=st.integers(2, 60),
)
def test_ewma_steers_towards_the_faster_backend(
    impl: Impl, fast_us: int, factor: float, gap_ms: int, rounds: int
) -> None:
    """Whatever the latencies and the pace, a steady stream makes the faster backend the pick."""
    e = impl.PeakEwma(3, seed=5)
    fast, slow = fast_us * 1000, int(fast_us * 1000 * factor)
    now = T0
    for _ in range(rounds):
        e.observe(0, slow, now)
        e.observe(1, fast, now)
        e.observe(2, slow, now)
        now += gap_ms * MS
    assert e.cost(1, now) < min(e.cost(0, now), e.cost(2, now))
    assert e.pick() == 1
    assert Counter(p2c_picks(e, 60))[1] >= 30  # in every pair that draws it


def test_ewma_steady_stream_with_defaults_prefers_fast(impl: Impl) -> None:
    e = impl.PeakEwma(2, seed=5)
    now = T0
    for _ in range(500):
        e.observe(0, 20 * MS, now)
        e.observe(1, 1 * MS, now)
        now += 10 * MS
    assert e.cost(1, now) < e.cost(0, now)
    assert set(picks(e, 5)) == {1}
    assert Counter(p2c_picks(e, 100)) == {1: 100}


def test_ewma_in_flight_raises_cost(impl: Impl) -> None:
    e = impl.PeakEwma(2, default_rtt_s=0.0001, seed=5)
    e.observe(0, 1 * MS, T0)
    e.observe(1, 1 * MS, T0)
    assert e.pick() == 0  # a tie goes to the lower index
    e.started(0)
    assert e.cost(0, T0) == 2 * e.cost(1, T0)
    assert e.pick() == 1
    e.started(1)
    assert e.pick() == 0
    # Fast but busy loses to slow and idle: 1 ms × 21 > 20 ms × 1.
    e.observe(1, 20 * MS, T0)
    for _ in range(19):
        e.started(0)
    e.finished(1)
    assert (e.in_flight(0), e.in_flight(1)) == (20, 0)
    assert e.pick() == 1
    e.finished(0)
    e.finished(0)
    assert e.pick() == 0  # 1 ms × 19 < 20 ms


def test_ewma_idle_backend_is_tried_again(impl: Impl) -> None:
    e = impl.PeakEwma(2, decay_s=10.0, default_rtt_s=0.0001, seed=5)
    e.observe(0, 1 * MS, T0)
    e.observe(1, 20 * MS, T0)
    assert e.pick() == 0
    # One time constant later, 20 ms has only decayed to 7.4 ms: still slower.
    e.observe(0, 1 * MS, T0 + 10 * SECOND)
    assert e.pick() == 0
    assert math.isclose(e.cost(1, T0 + 10 * SECOND), 20 * MS * math.exp(-1), rel_tol=1e-12)
    # After 100 s idle it is down to 0.9 µs: the once-slow backend gets picked.
    later = T0 + 100 * SECOND
    e.observe(0, 1 * MS, later)
    assert math.isclose(e.cost(1, later), 20 * MS * math.exp(-10), rel_tol=1e-12)
    assert e.cost(1, later) < e.cost(0, later)
    assert e.pick() == 1


def test_ewma_takes_the_peak_at_once_and_decays_slowly(impl: Impl) -> None:
    e = impl.PeakEwma(2, default_rtt_s=0.0001, seed=5)
    e.observe(0, 1 * MS, T0)
    e.observe(1, 2 * MS, T0)
    assert e.pick() == 0
    e.observe(0, 50 * MS, T0 + 1 * MS)
    assert e.cost(0, T0 + 1 * MS) == 50.0 * MS
    assert e.pick() == 1
    # A fast sample right after only nudges the estimate down (elapsed ≪ decay).
    e.observe(0, 1 * MS, T0 + 2 * MS)
    assert 49.9 * MS < e.cost(0, T0 + 2 * MS) < 50.0 * MS
    assert e.pick() == 1


def test_ewma_cost_is_estimate_times_load_over_weight(impl: Impl) -> None:
    e = impl.PeakEwma(3, decay_s=10.0, default_rtt_s=0.03, seed=5)
    # Before any observation every backend holds the default, undecayed.
    assert [e.cost(i, 0) for i in range(3)] == [30.0 * MS] * 3
    e.started(0)
    e.started(0)
    assert e.cost(0, T0) == 90.0 * MS
    e.set_weight(1, 4)
    assert e.cost(1, T0) == 7.5 * MS
    assert e.pick() == 1
    e.set_weight(2, 0)
    assert e.cost(2, T0) == math.inf
    # An observation above the estimate is taken as is; it then decays by exp(-age / tau).
    e.observe(0, 40 * MS, T0)
    assert e.cost(0, T0) == 40.0 * MS * 3
    assert math.isclose(e.cost(0, T0 + 10 * SECOND), 40 * MS * math.exp(-1) * 3, rel_tol=1e-12)
    # Backends never observed decay from the first observation.
    assert math.isclose(e.cost(1, T0 + 5 * SECOND), 7.5 * MS * math.exp(-0.5), rel_tol=1e-12)
    assert e.cost(1, T0 - SECOND) == 7.5 * MS  # no decay before it


def test_ewma_weights_divide_cost(impl: Impl) -> None:
    e = impl.PeakEwma(2, default_rtt_s=0.0001, seed=5)
    e.observe(0, 1500 * 1000, T0)
    e.observe(1, 2 * MS, T0)
    assert e.pick() == 0
    e.set_weight(1, 2)  # 2 ms / 2 < 1.5 ms
    assert e.cost(1, T0) == 1.0 * MS
    assert e.pick() == 1
    assert set(p2c_picks(e, 20)) == {1}


@pytest.mark.parametrize("how", ["eligible", "weight"])
def test_ewma_backend_back_in_rotation_starts_at_the_default(impl: Impl, how: str) -> None:
    """Out of rotation for 100 s, a slow backend's estimate would have decayed to ~0 and
    drawn every call on its return; it comes back at the default, as of the latest sample."""
    e = impl.PeakEwma(2, decay_s=10.0, default_rtt_s=0.005, seed=5)
    e.observe(0, 1 * MS, T0)
    e.observe(1, 50 * MS, T0)
    if how == "eligible":
        e.set_eligible(1, False)
    else:
        e.set_weight(1, 0)
    later = T0 + 100 * SECOND
    e.observe(0, 1 * MS, later)
    assert e.pick() == 0
    if how == "eligible":
        e.set_eligible(1, True)
    else:
        e.set_weight(1, 1)
    assert e.cost(1, later) == 5.0 * MS
    assert e.cost(0, later) < 1.01 * MS
    assert e.pick() == 0
    # Staying in rotation keeps the estimate: a weight change is not a return.
    e.set_weight(1, 2)
    assert e.cost(1, later) == 2.5 * MS


def test_ewma_first_sample_at_t0_below_default_is_ignored(impl: Impl) -> None:
    """At zero elapsed time a sample below the estimate gets weight 1 - exp(0) = 0, as in
    Finagle and tower, whose estimates also move towards fast samples with time alone."""
    e = impl.PeakEwma(2, default_rtt_s=0.03, seed=5)
    e.observe(0, 20 * MS, T0)
    e.observe(1, 1 * MS, T0)
    assert e.cost(0, T0) == e.cost(1, T0) == 30.0 * MS
    assert e.pick() == 0  # the 1 ms backend is not preferred


@given(
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=6),
    samples=st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 100 * MS), st.integers(0, 5 * SECOND)),
        max_size=30,
    ),
    loads=st.lists(st.integers(0, 5), min_size=6, max_size=6),
)
def test_ewma_pick_is_lowest_cost(
    impl: Impl, weights: list[int], samples: list[tuple[int, int, int]], loads: list[int]
) -> None:
    n = len(weights)
    e = with_weights(impl.PeakEwma(n, decay_s=2.0, seed=5), weights)
    now = T0
    for i, rtt, dt in samples:
        now += dt
        e.observe(i % n, rtt, now)
    for i in range(n):
        for _ in range(loads[i]):
            e.started(i)
    costs = [e.cost(i, now) for i in range(n)]
    assert math.isclose(costs[e.pick()], min(costs), rel_tol=1e-9)


# --- Validation and bookkeeping ------------------------------------------------


@pytest.mark.parametrize("bad", [-1, MAX_WEIGHT + 1, -(2**70), 2**70])
def test_weight_out_of_range_is_value_error(impl: Impl, bad: int) -> None:
    for cls in (impl.SmoothWeightedRoundRobin, impl.Random, impl.LeastRequest):
        with pytest.raises(ValueError, match="weight must be an integer"):
            cls([1, bad])
    for factory in FACTORIES.values():
        k = factory(impl, [1, 2])
        with pytest.raises(ValueError, match="weight must be an integer"):
            k.set_weight(1, bad)
        assert k.weight(1) == 2


def test_weight_must_be_an_integer(impl: Impl) -> None:
    with pytest.raises(TypeError):
        impl.SmoothWeightedRoundRobin([1, 1.5])
    with pytest.raises(TypeError):
        impl.Random([1]).set_weight(0, 2.0)  # type: ignore[arg-type]


def test_weight_bounds_are_inclusive(impl: Impl) -> None:
    s = impl.SmoothWeightedRoundRobin([MAX_WEIGHT, 0, 1])
    assert [s.weight(i) for i in range(3)] == [MAX_WEIGHT, 0, 1]
    assert impl.MAX_WEIGHT == MAX_WEIGHT == 1 << 24
    assert set(picks(s, 100)) == {0}
    r = impl.Random([MAX_WEIGHT, 1], seed=1)
    r.set_weight(1, MAX_WEIGHT)
    assert set(picks(r, 100)) == {0, 1}


def index_calls(k: Kernel, i: int) -> list[Callable[[], object]]:
    calls: list[Callable[[], object]] = [
        lambda: k.set_eligible(i, True),
        lambda: k.is_eligible(i),
        lambda: k.set_weight(i, 1),
        lambda: k.weight(i),
        lambda: k.started(i),
        lambda: k.finished(i),
        lambda: k.in_flight(i),
        lambda: k.observe(i, MS, T0),
    ]
    if isinstance(k, EWMA_CLASSES):
        e = k
        calls.append(lambda: e.cost(i, T0))
    return calls


@pytest.mark.parametrize("kernel", FACTORIES)
@pytest.mark.parametrize("n", [0, 3])
def test_bad_index_is_index_error(impl: Impl, kernel: str, n: int) -> None:
    k = FACTORIES[kernel](impl, [1] * n)
    for i in (n, n + 7, -1, -n - 1, 2**31):
        for call in index_calls(k, i):
            with pytest.raises(IndexError, match="out of range"):
                call()
    assert [k.in_flight(i) for i in range(n)] == [0] * n


@pytest.mark.parametrize("kernel", FACTORIES)
def test_index_beyond_64_bits_is_index_error(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [1, 1])
    for call in index_calls(k, 2**64):
        with pytest.raises(IndexError):
            call()


@pytest.mark.parametrize("bias", [-0.001, 10.001, 100.0, math.nan, math.inf, -math.inf])
def test_bad_active_request_bias_is_value_error(impl: Impl, bias: float) -> None:
    with pytest.raises(ValueError, match="active_request_bias"):
        impl.LeastRequest([1, 2], active_request_bias=bias)


def test_active_request_bias_bounds_are_inclusive(impl: Impl) -> None:
    for bias in (0, 0.0, 10, 10.0):
        assert impl.LeastRequest([1, 2], active_request_bias=bias, seed=1).pick() in (0, 1)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("param", ["decay_s", "default_rtt_s"])
def test_bad_ewma_parameters_are_value_error(impl: Impl, param: str, value: float) -> None:
    with pytest.raises(ValueError, match=param):
        impl.PeakEwma(2, **{param: value})


@pytest.mark.parametrize("n", [-1, 2**20 + 1, 2**70])
def test_backend_count_out_of_range_is_value_error(impl: Impl, n: int) -> None:
    assert impl.MAX_BACKENDS == 2**20
    with pytest.raises(ValueError, match=r"n must be in \[0, 1048576\]"):
        impl.RoundRobin(n)
    with pytest.raises(ValueError, match=r"n must be in \[0, 1048576\]"):
        impl.PeakEwma(n)


def test_more_weights_than_max_backends_is_value_error(impl: Impl) -> None:
    with pytest.raises(ValueError, match=r"n must be in \[0, 1048576\], got 1048577"):
        impl.SmoothWeightedRoundRobin([1] * (2**20 + 1))


def test_compiled_kernel_cannot_be_initialised_twice() -> None:
    k = _fastpick.RoundRobin(3)
    with pytest.raises(TypeError, match="already initialised"):
        type(k).__init__(k, 5)
    assert k.n == 3


@pytest.mark.parametrize("kernel", FACTORIES)
def test_finished_never_drives_in_flight_below_zero(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [1, 1])
    k.finished(0)
    assert k.in_flight(0) == 0
    k.started(0)
    k.started(0)
    for _ in range(5):
        k.finished(0)
    assert (k.in_flight(0), k.in_flight(1)) == (0, 0)
    k.started(0)
    assert k.in_flight(0) == 1


@pytest.mark.parametrize("kernel", FACTORIES)
def test_bookkeeping_reads_back(impl: Impl, kernel: str) -> None:
    k = FACTORIES[kernel](impl, [3, 0, 1])
    assert k.n == 3
    assert [k.weight(i) for i in range(3)] == [3, 0, 1]
    k.set_eligible(2, False)
    assert [k.is_eligible(i) for i in range(3)] == [True, True, False]
    k.started(0)
    k.started(2)
    k.started(2)
    name = FACTORIES[kernel](impl, [1]).name
    assert repr(k) == f"<{type(k).__name__} {name} n=3 in-rotation=1 in-flight=3>"


# -- what traces read: the draws a P2C pick is about to compare, SWRR's current weights --


def test_least_request_peek_two_names_the_pair_the_next_pick_compares(impl: Impl) -> None:
    k = impl.LeastRequest([1] * 6, seed=11)
    k.started(2)
    k.started(2)
    for _ in range(200):
        a, b = k.peek_two()
        assert a != b and {a, b} <= set(range(6))
        assert k.peek_two() == (a, b)  # peeking draws nothing
        expected = b if k.in_flight(b) < k.in_flight(a) else a
        assert k.pick() == expected
    k.set_weight(0, 3)  # unequal weights: the EDF schedule picks, no pair
    assert k.peek_two() == (-1, -1)
    lone = impl.LeastRequest([1], seed=1)
    assert lone.peek_two() == (-1, -1)


def test_ewma_peek_two_names_the_pair_the_next_p2c_pick_compares(impl: Impl) -> None:
    k = impl.PeakEwma(5, seed=4)
    k.observe(1, 50_000_000, 1_000_000_000)
    k.observe(3, 1_000_000, 1_000_000_000)
    for _ in range(200):
        a, b = k.peek_two()
        assert a != b
        i = k.pick_p2c()
        assert i in (a, b)
    k.set_eligible(0, False)
    k.set_eligible(1, False)
    k.set_eligible(2, False)
    k.set_eligible(3, False)
    assert k.peek_two() == (-1, -1)


def test_swrr_current_weight_is_nginx_current_weight(impl: Impl) -> None:
    k = impl.SmoothWeightedRoundRobin([5, 1, 1])
    assert [k.current_weight(i) for i in range(3)] == [0, 0, 0]
    assert k.pick() == 0  # currents become 5, 1, 1; 0 wins and loses the total, 7
    assert [k.current_weight(i) for i in range(3)] == [-2, 1, 1]
    assert k.pick() == 0  # 3, 2, 2 -> 0 wins: -4, 2, 2
    assert [k.current_weight(i) for i in range(3)] == [-4, 2, 2]
    edf = impl.SmoothWeightedRoundRobin([5, 1, 1], edf_threshold=2)
    edf.pick()
    assert [edf.current_weight(i) for i in range(3)] == [0, 0, 0]


def test_swrr_current_weight_of_an_eligible_backend_of_weight_0(impl: Impl) -> None:
    """Out of rotation by weight, not eligibility, a backend keeps its own current weight."""
    k = impl.SmoothWeightedRoundRobin([5, 1, 1, 1])
    assert picks(k, 2) == [0, 0]  # 5 1 1 1 -> 0: -3 1 1 1 | 2 2 2 2 -> 0: -6 2 2 2
    k.set_weight(1, 0)  # 1 keeps 2; the total is now 7
    # -1 2 3 3 -> 2: -1 2 -4 3 | 4 2 -3 4 -> 0: -3 2 -3 4 | 2 2 -2 5 -> 3: 2 2 -2 -2
    assert picks(k, 3) == [2, 0, 3]
    assert [k.current_weight(i) for i in range(4)] == [2, 2, -2, -2]
