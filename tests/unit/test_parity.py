"""The twins make identical pick sequences, and the compiled API is the twins'.

The parity tests drive ``lbgw.picking`` and ``lbgw._fastpick`` side by side
through random operations (weights, rotation, load, latency samples, retries'
picks that exclude a backend) and require everything observable to be equal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbgw import _fastpick, picking
from lbgw._typing import Kernel
from tests.unit.kernel_support import (
    CLASS_NAMES,
    CYTHON,
    EWMA_CLASSES,
    HASH_CLASSES,
    LEAST_REQUEST_CLASSES,
    MAX_WEIGHT,
    MS,
    PYTHON,
    SECOND,
    SEEDED_CLASSES,
    T0,
    Impl,
    all_picks,
    key_picks,
    names,
    p2c_picks,
    picks,
    with_weights,
)

# --- Parity: the twins make identical pick sequences ---------------------------


Op = tuple[str, int, int, int]  # (kind, backend, a, b)


SCAN = 1 << 30  # an edf_threshold no scenario reaches: nginx's scan throughout


@dataclass(frozen=True)
class Scenario:
    kernel: str
    weights: list[int]
    seed: int
    edf_threshold: int = SCAN
    bias: float = 1.0
    decay_s: float = 10.0
    default_rtt_s: float = 0.03
    min_ring_size: int = 1024
    max_ring_size: int = 1024  # small: the twin hashes every point in Python
    table_size: int = 251
    ops: list[Op] = field(default_factory=list)


VARIANTS = [
    "swrr",
    "swrr-edf",
    "round_robin",
    "random-equal",
    "random-weighted",
    "least_request-equal",
    "least_request-weighted",
    "ewma",
    "ring_hash",
    "maglev",
]
HASHING = ("ring_hash", "maglev")


def build(m: Impl, sc: Scenario) -> Kernel:
    n = len(sc.weights)
    kind = sc.kernel.split("-")[0]
    if kind == "swrr":
        return m.SmoothWeightedRoundRobin(sc.weights, edf_threshold=sc.edf_threshold)
    if kind == "round_robin":
        return with_weights(m.RoundRobin(n), sc.weights)
    if kind == "random":
        return m.Random(sc.weights, seed=sc.seed)
    if kind == "least_request":
        return m.LeastRequest(sc.weights, active_request_bias=sc.bias, seed=sc.seed)
    if kind == "ring_hash":
        return m.RingHash(
            sc.weights,
            names(n),
            min_ring_size=sc.min_ring_size,
            max_ring_size=sc.max_ring_size,
            seed=sc.seed,
        )
    if kind == "maglev":
        return m.Maglev(sc.weights, names(n), table_size=sc.table_size, seed=sc.seed)
    assert kind == "ewma"
    e = m.PeakEwma(n, sc.decay_s, sc.default_rtt_s, seed=sc.seed)
    return with_weights(e, sc.weights)


def run(k: Kernel, ops: Sequence[Op]) -> list[object]:  # noqa: PLR0912, PLR0915 - a branch per op
    """Apply ``ops``; return everything observable, in order."""
    now = T0
    out: list[object] = []
    for kind, i, a, b in ops:
        if kind == "pick":
            out.append(picks(k, a))
        elif kind == "pick_many":
            out.append(k.pick_many(a))
        elif kind == "eligible":
            k.set_eligible(i, bool(a))
        elif kind == "weight":
            k.set_weight(i, a)
        elif kind == "started":
            for _ in range(a):
                k.started(i)
        elif kind == "finished":
            for _ in range(a):
                k.finished(i)
        elif kind == "observe":
            now += b
            k.observe(i, a, now)
        elif kind == "seed":
            assert isinstance(k, SEEDED_CLASSES)
            k.seed(a)
        elif kind == "p2c":
            assert isinstance(k, EWMA_CLASSES)
            out.append(p2c_picks(k, a))
        elif kind == "p2c_many":
            assert isinstance(k, EWMA_CLASSES)
            out.append(k.pick_p2c_many(a))
        elif kind == "cost":
            assert isinstance(k, EWMA_CLASSES)
            out.append(k.cost(i, now + a))
        elif kind == "keys":
            assert isinstance(k, HASH_CLASSES)
            keys = [b"key-%d-%d" % (b, j) for j in range(a)]
            out.append(key_picks(k, keys))
            out.append(k.pick_key_many(keys))
        elif kind == "hash":
            assert isinstance(k, HASH_CLASSES)
            h = (a * 0x9E3779B97F4A7C15 + b) % 2**64
            out.append((k.pick_hash(h), k.position(h)))
        # The retries' picks: i is any backend, or -1 or n (excluding none).
        elif kind == "exclude":
            out.append([k.pick_excluding(i) for _ in range(a)])
        elif kind == "retry":  # a call's pick, then its retries', each excluding the last
            tried = [k.pick()]
            for _ in range(a):
                tried.append(k.pick_excluding(tried[-1]))
            out.append(tried)
        elif kind == "p2c_exclude":
            assert isinstance(k, EWMA_CLASSES)
            out.append([k.pick_p2c_excluding(i) for _ in range(a)])
        elif kind == "dry":  # /explain's dry run: peek names the next pick, and moves nothing
            peeked = k.peek()
            if isinstance(k, EWMA_CLASSES):
                peeked_p2c = k.peek_p2c()
                assert peeked_p2c == k.pick_p2c()
                out.append(peeked_p2c)
            assert peeked == k.pick()
            out.append(peeked)
        elif kind == "peek":
            assert isinstance(k, (*EWMA_CLASSES, *LEAST_REQUEST_CLASSES))
            out.append((k.peek_two(i), k.peek_two()))
        elif kind == "keys_exclude":
            assert isinstance(k, HASH_CLASSES)
            keys = [b"key-%d-%d" % (b, j) for j in range(a)]
            out.append([k.pick_key_excluding(key, i) for key in keys])
        elif kind == "hash_exclude":
            assert isinstance(k, HASH_CLASSES)
            out.append(k.pick_hash_excluding((a * 0x9E3779B97F4A7C15 + b) % 2**64, i))
        else:  # pragma: no cover
            raise AssertionError(kind)
    out.append([(k.weight(i), k.is_eligible(i), k.in_flight(i)) for i in range(k.n)])
    out.append(repr(k))
    return out


weights_st = st.one_of(
    st.integers(0, 5), st.sampled_from([0, 1, 100, MAX_WEIGHT]), st.integers(0, MAX_WEIGHT)
)


def op_st(kernel: str, n: int) -> st.SearchStrategy[Op]:
    count = st.integers(0, 64)
    excluded = st.integers(-1, n)  # -1 and n exclude no backend
    ops: list[st.SearchStrategy[Op]] = [
        st.tuples(st.just("pick"), st.just(0), count, st.just(0)),
        st.tuples(st.just("pick_many"), st.just(0), count, st.just(0)),
        st.tuples(st.just("exclude"), excluded, count, st.just(0)),
        st.tuples(st.just("retry"), st.just(0), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("dry"), st.just(0), st.just(0), st.just(0)),
    ]
    if kernel == "ewma":
        ops += [
            st.tuples(st.just("p2c"), st.just(0), count, st.just(0)),
            st.tuples(st.just("p2c_many"), st.just(0), count, st.just(0)),
            st.tuples(st.just("p2c_exclude"), excluded, count, st.just(0)),
        ]
    if kernel.startswith(("least_request", "ewma")):
        ops.append(st.tuples(st.just("peek"), excluded, st.just(0), st.just(0)))
    if kernel.startswith(("random", "least_request", "ewma", *HASHING)):
        ops.append(st.tuples(st.just("seed"), st.just(0), st.integers(0, 2**64 - 1), st.just(0)))
    if kernel in HASHING:
        ops += [
            st.tuples(st.just("keys"), st.just(0), count, st.integers(0, 2**32)),
            st.tuples(st.just("hash"), st.just(0), st.integers(0, 2**64), st.integers(0, 2**64)),
            st.tuples(st.just("keys_exclude"), excluded, count, st.integers(0, 2**32)),
            st.tuples(st.just("hash_exclude"), excluded, st.integers(0, 2**64), st.just(0)),
        ]
    if n:
        i = st.integers(0, n - 1)
        small = st.integers(1, 4)
        ops += [
            st.tuples(st.just("eligible"), i, st.integers(0, 1), st.just(0)),
            st.tuples(st.just("weight"), i, weights_st, st.just(0)),
            st.tuples(st.just("started"), i, small, st.just(0)),
            st.tuples(st.just("finished"), i, small, st.just(0)),
            st.tuples(
                st.just("observe"),
                i,
                st.one_of(st.integers(0, 50 * MS), st.integers(0, 2 * SECOND)),
                st.one_of(
                    st.integers(0, 100 * MS), st.sampled_from([0, 10 * SECOND, 1000 * SECOND])
                ),
            ),
        ]
        if kernel == "ewma":
            ops.append(
                st.tuples(st.just("cost"), i, st.integers(0, 100 * SECOND), st.just(0)),
            )
    return st.one_of(ops)


@st.composite
def scenarios(draw: st.DrawFn, kernel: str) -> Scenario:
    n = draw(st.integers(0, 9))
    if kernel.endswith("-equal"):
        weights = [draw(weights_st)] * n
    else:
        weights = draw(st.lists(weights_st, min_size=n, max_size=n))
    min_ring = draw(st.sampled_from([1, 3, 64, 1024]))
    return Scenario(
        kernel=kernel,
        weights=weights,
        seed=draw(st.integers(0, 2**64 - 1)),
        edf_threshold=draw(st.integers(1, max(n, 1))) if kernel == "swrr-edf" else SCAN,
        bias=draw(st.sampled_from([0.5, 0.0, 1.0, 2.0, 3.25])),
        decay_s=draw(st.sampled_from([10.0, 0.001, 1.0])),
        default_rtt_s=draw(st.sampled_from([0.03, 0.0001, 1.0])),
        min_ring_size=min_ring,
        max_ring_size=draw(st.integers(min_ring, 1024)),
        table_size=draw(st.sampled_from([2, 3, 7, 13, 251, 1021])),
        ops=draw(st.lists(op_st(kernel, n), min_size=20, max_size=80)),
    )


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_twins_make_identical_picks(variant: str, data: st.DataObject) -> None:
    sc = data.draw(scenarios(variant))
    assert run(build(PYTHON, sc), sc.ops) == run(build(CYTHON, sc), sc.ops)


def random_ops(rng: random.Random, kernel: str, n: int, count: int) -> list[Op]:
    """A long run of operations, mostly picks, for the seeded soak below."""
    kinds = ["pick"] * 6 + ["pick_many", "eligible", "weight", "started", "finished", "observe"]
    kinds += ["exclude"] * 3 + ["retry"] * 3 + ["dry"]
    if kernel == "ewma":
        kinds += ["p2c", "p2c", "p2c_many", "cost", "p2c_exclude", "p2c_exclude"]
    if kernel.startswith(("least_request", "ewma")):
        kinds.append("peek")
    if kernel in HASHING:
        kinds += ["keys"] * 4 + ["hash"] * 2 + ["keys_exclude"] * 2 + ["hash_exclude"]
    ops: list[Op] = []
    for _ in range(count):
        kind = rng.choice(kinds)
        i = rng.randrange(-1, n + 1) if "exclude" in kind or kind == "peek" else rng.randrange(n)
        if kind == "weight":
            a = rng.choice([0, 1, 2, 3, 5, 8, rng.randrange(MAX_WEIGHT + 1)])
        elif kind == "eligible":
            a = int(rng.random() < 0.7)
        elif kind == "observe":
            a = int(rng.expovariate(1 / (5 * MS)))
        elif kind == "retry":
            a = rng.randrange(1, 4)
        elif kind == "hash":
            a = rng.getrandbits(64)
        else:
            a = rng.randrange(20)
        ops.append((kind, i, a, rng.randrange(20 * MS)))
    return ops


@pytest.mark.parametrize("variant", VARIANTS)
def test_twins_make_identical_picks_over_a_long_run(variant: str) -> None:
    rng = random.Random(f"soak-{variant}")
    n = 40  # EDF heaps several levels deep
    weights = (
        [rng.randrange(1, 4)] * n
        if variant.endswith("-equal")
        else [rng.randrange(6) for _ in range(n)]
    )
    sc = Scenario(
        variant,
        weights,
        seed=rng.getrandbits(64),
        edf_threshold=1 if variant == "swrr-edf" else SCAN,
        bias=1.5,
        table_size=1021,
        ops=random_ops(rng, variant, n, 3000),
    )
    python, cython = run(build(PYTHON, sc), sc.ops), run(build(CYTHON, sc), sc.ops)
    assert sum(len(x) for x in python if isinstance(x, list)) > 10_000  # picks made
    assert python == cython


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data(), count=st.integers(0, 300))
def test_pick_many_is_count_picks(
    impl: Impl, variant: str, data: st.DataObject, count: int
) -> None:
    sc = data.draw(scenarios(variant))
    a, b = build(impl, sc), build(impl, sc)
    run(a, sc.ops)
    run(b, sc.ops)
    assert a.pick_many(count) == sum(picks(b, count))
    assert picks(a, 20) == picks(b, 20)  # and leaves the same state behind
    if isinstance(a, EWMA_CLASSES):
        assert isinstance(b, EWMA_CLASSES)
        assert a.pick_p2c_many(count) == sum(p2c_picks(b, count))
        assert p2c_picks(a, 20) == p2c_picks(b, 20)


def test_least_request_parity_with_huge_load_scaling() -> None:
    """The largest bias with a heavy load stays inside a double, in both twins alike."""
    sc = Scenario(
        "least_request-weighted",
        [1, 2],
        seed=1,
        bias=10.0,
        ops=[("started", 0, 20000, 0), ("weight", 1, 3, 0), ("pick", 0, 12, 0)],
    )
    assert run(build(PYTHON, sc), sc.ops) == run(build(CYTHON, sc), sc.ops)
    k = build(CYTHON, sc)
    run(k, sc.ops[:2])
    # Backend 0 keeps the entry it was scheduled with while idle; once served,
    # it is rescheduled with its load, 20001**10 intervals out.
    seq = all_picks(k, 40)
    assert seq.count(0) == 1, seq
    assert seq[seq.index(0) + 1 :] == [1] * (39 - seq.index(0))


# --- The compiled module's API is the twins' -----------------------------------


def public_names(obj: object) -> set[str]:
    return {name for name in dir(obj) if not name.startswith("_")}


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_compiled_class_api_equals_twin(name: str) -> None:
    compiled, twin = getattr(_fastpick, name), getattr(picking, name)
    assert public_names(compiled) == public_names(twin)
    assert compiled.name == twin.name


def test_compiled_module_exports_the_twins_names() -> None:
    assert set(picking.__all__) <= public_names(_fastpick)
    assert (_fastpick.MAX_WEIGHT, _fastpick.EDF_THRESHOLD) == (
        picking.MAX_WEIGHT,
        picking.EDF_THRESHOLD,
    )
