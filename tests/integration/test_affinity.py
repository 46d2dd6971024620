"""Session affinity through real gateways: consistent hashing and sticky tokens.

A hashed key reaches the same backend through any lbgw process that has the
same endpoints, whatever their order; a call without the key goes to the
``fallback`` strategy; taking a backend out moves only its own keys. A
sticky token in the response's initial metadata pins the calls that send it
back, through this gateway or a replica that shares the secret. Backends are
real grpc.aio servers on 127.0.0.1, named ``a`` to ``d``; active checks are
off (``mode = "none"``) so that only the test takes endpoints out of
rotation. ``lbgw serve`` runs as a subprocess where the test is about
processes, and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
from grpc import aio

from lbgw.balancer import make_hash_kernel
from lbgw.config import STICKY_SECRET_ENV, config_from_mapping
from lbgw.endpoints import ClusterHealth, State
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.testing import EchoBackend
from tests.integration.support import (
    ALL_KINDS,
    UNARY,
    LbgwProcess,
    config,
    echo_backends,
    lbgw_process,
    request,
    settle,
    through,
)

_Context: TypeAlias = aio.ServicerContext[Any, Any]
_Metadata: TypeAlias = Sequence[tuple[str, str]]

NAMES = "abcd"
HASH_KEY = "x-session-id"
STICKY = "lbgw-sticky"
KEYS = [f"session-{n}" for n in range(200)]
NO_CHECKS: dict[str, Any] = {"health_check": {"mode": "none"}}
HASHING = pytest.mark.parametrize("strategy", ["ring_hash", "maglev"])
KINDS = pytest.mark.parametrize("methods", [ALL_KINDS, {}], ids=["kinds-known", "kinds-unknown"])


def _state(health: ClusterHealth, i: int) -> State:
    """Endpoint ``i``'s state (a call, so that mypy does not narrow it across events)."""
    return health.endpoints[i].state


def _backends() -> list[EchoBackend]:
    return [EchoBackend(name) for name in NAMES]


def _stub(channel: aio.Channel) -> Any:
    return echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]


def _hashed(**params: Any) -> dict[str, Any]:
    """The ``cluster`` table of a hashing cluster with checks off."""
    return {"params": {"hash_key": HASH_KEY} | params, **NO_CHECKS}


def _sticky(**sticky: Any) -> dict[str, Any]:
    return {"sticky": {"enabled": True, "secret": "s"} | sticky, **NO_CHECKS}


async def _unary(stub: Any, metadata: _Metadata = ()) -> tuple[str, dict[str, str]]:
    """One unary call: the backend that answered, and the response's initial metadata."""
    call = stub.Unary(request(), metadata=tuple(metadata), timeout=5)
    reply = await call
    initial = await call.initial_metadata()
    return reply.backend, {k: v for k, v in initial}


async def _backend(stub: Any, metadata: _Metadata = ()) -> str:
    return (await _unary(stub, metadata))[0]


async def _route(stub: Any, keys: Sequence[str]) -> dict[str, str]:
    """The backend each key's calls reach (one call per key, all at once)."""
    async with asyncio.timeout(20):
        got = await asyncio.gather(*(_backend(stub, [(HASH_KEY, k)]) for k in keys))
    return dict(zip(keys, got, strict=True))


async def _requests(n: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for i in range(n):
        yield request(message=str(i))


async def _call_kind(stub: Any, kind: str, metadata: _Metadata) -> tuple[str, dict[str, str]]:
    """One call of ``kind``: the backend that answered it all, and the initial metadata."""
    md = tuple(metadata)
    if kind == "unary":
        return await _unary(stub, md)
    if kind == "server_streaming":
        call = stub.ServerStream(request(response_count=3), metadata=md, timeout=5)
        answered = [r.backend async for r in call]
    elif kind == "client_streaming":
        call = stub.ClientStream(_requests(3), metadata=md, timeout=5)
        answered = [(await call).backend]
    else:
        call = stub.Bidi(_requests(3), metadata=md, timeout=5)
        answered = [r.backend async for r in call]
    assert len(set(answered)) == 1, answered
    initial = await call.initial_metadata()
    return answered[0], {k: v for k, v in initial}


async def _stop(lbgw: LbgwProcess) -> None:
    """Stop a gateway process as a user would (SIGTERM to its PID); it exits 0."""
    lbgw.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(lbgw.wait, 15) == 0


# --- consistent hashing ----------------------------------------------------


@HASHING
async def test_two_lbgw_processes_send_each_key_to_the_same_backend(strategy: str) -> None:
    backends = _backends()
    weights = [1, 2, 1, 3]
    async with echo_backends(*backends) as addrs:
        endpoints = [f"{a}={w}" for a, w in zip(addrs, weights, strict=True)]

        def args(order: Sequence[str]) -> list[str]:
            flags = [arg for e in order for arg in ("--backend", e)]
            return [
                *("--listen", "127.0.0.1:0", "--strategy", strategy, "--hash-key", HASH_KEY),
                *("--health-check", "none", *flags),
            ]

        async with (
            lbgw_process(*args(endpoints)) as one,
            lbgw_process(*args(endpoints[::-1])) as two,
        ):
            async with (
                aio.insecure_channel(one.address) as ch1,
                aio.insecure_channel(two.address) as ch2,
            ):
                first = await _route(_stub(ch1), KEYS)
                again = await _route(_stub(ch1), KEYS)
                other = await _route(_stub(ch2), KEYS)
                other_again = await _route(_stub(ch2), KEYS)
            await _stop(one)
            await _stop(two)
    assert again == first
    assert other_again == other
    assert {k: v for k, v in other.items() if v != first[k]} == {}
    assert set(first.values()) == set(NAMES)
    assert sum(b.seen.calls for b in backends) == 4 * len(KEYS)


@HASHING
async def test_each_key_goes_where_the_kernel_hashes_it(strategy: str) -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy=strategy, cluster=_hashed())
        kernel = make_hash_kernel(cfg.clusters[0])
        assert kernel is not None
        async with through(cfg) as t:
            got = await _route(t.stub, KEYS)
            assert await settle(t.gateway) == [0] * len(NAMES)
    assert got == {k: NAMES[kernel.pick_key(k.encode())] for k in KEYS}


async def test_calls_without_the_key_go_round_robin_by_the_fallback() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="maglev", cluster=_hashed(fallback="round_robin"))
        async with through(cfg) as t:
            keyless = [await _backend(t.stub) for _ in range(8)]
            other_key = [await _backend(t.stub, [("x-other", "1")]) for _ in range(4)]
            assert t.gateway.clusters["echo"].balancer.fallback == "round_robin"
    assert keyless == list("abcdabcd")
    assert other_key == list("abcd")


async def test_hash_on_method_sends_every_call_of_a_method_to_one_backend() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(
            addrs, strategy="maglev", cluster={"params": {"hash_on": "method"}, **NO_CHECKS}
        )
        kernel = make_hash_kernel(cfg.clusters[0])
        assert kernel is not None
        async with through(cfg) as t:
            got: dict[str, set[str]] = {}
            for kind in ("unary", "server_streaming", "client_streaming", "bidi_streaming"):
                for n in range(6):  # the session key, if any, does not matter
                    backend, _ = await _call_kind(t.stub, kind, [(HASH_KEY, str(n))])
                    got.setdefault(kind, set()).add(backend)
    expected = {
        kind: {NAMES[kernel.pick_key(method.encode())]} for method, kind in ALL_KINDS.items()
    }
    assert got == expected


async def test_hash_on_peer_sends_every_call_from_one_client_host_to_one_backend() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(
            addrs, strategy="ring_hash", cluster={"params": {"hash_on": "peer"}, **NO_CHECKS}
        )
        kernel = make_hash_kernel(cfg.clusters[0])
        assert kernel is not None
        async with through(cfg) as t:
            first = [await _backend(t.stub, [(HASH_KEY, str(n))]) for n in range(10)]
            # A second channel has its own connection and port, but the same host.
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with aio.insecure_channel(t.gateway.addresses[0], options) as ch:
                second = [await _backend(_stub(ch)) for _ in range(10)]
    expected = NAMES[kernel.pick_key(b"127.0.0.1")]
    assert first == second == [expected] * 10


@HASHING
async def test_a_backend_out_of_rotation_moves_only_its_keys_and_gets_them_back(
    strategy: str,
) -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy=strategy, cluster=_hashed())
        async with through(cfg) as t:
            health = t.gateway.clusters["echo"].health
            before = await _route(t.stub, KEYS)
            health.check_failed(health.endpoints[1], "test", explicit=True)
            assert _state(health, 1) is State.NOT_SERVING
            during = await _route(t.stub, KEYS)
            for _ in range(cfg.clusters[0].health_check.healthy_threshold):
                health.check_passed(health.endpoints[1])
            assert _state(health, 1) is State.SERVING
            after = await _route(t.stub, KEYS)
    moved = {k for k in KEYS if during[k] != before[k]}
    assert moved == {k for k in KEYS if before[k] == "b"}
    assert moved, "b owned no key"
    assert "b" not in during.values()
    assert after == before


# --- sticky tokens ---------------------------------------------------------


async def test_a_sticky_token_pins_calls_that_round_robin_would_rotate() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="round_robin", cluster=_sticky())
        async with through(cfg) as t:
            first, initial = await _unary(t.stub)
            token = initial[STICKY]
            pinned: list[str] = []
            rotating: list[str] = []
            for _ in range(20):
                backend, md = await _unary(t.stub, [(STICKY, token)])
                assert md[STICKY] == token
                pinned.append(backend)
                rotating.append(await _backend(t.stub))
            assert await settle(t.gateway) == [0] * len(NAMES)
    assert first == "a"
    assert token.startswith("v1.") and len(token) == 27  # 18 bytes of MAC, base64url
    assert "127.0.0.1" not in token
    assert pinned == ["a"] * 20
    assert rotating == list("bcda" * 5)


@KINDS
@pytest.mark.parametrize("kind", list(ALL_KINDS.values()))
async def test_every_call_kind_carries_the_token_and_honours_it(
    kind: str, methods: dict[str, str]
) -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="round_robin", methods=methods, cluster=_sticky())
        async with through(cfg) as t:
            await _backend(t.stub)  # a: the next pick of round robin is b
            first, initial = await _call_kind(t.stub, kind, ())
            token = initial[STICKY]
            again = [await _call_kind(t.stub, kind, [(STICKY, token)]) for _ in range(5)]
            assert await settle(t.gateway) == [0] * len(NAMES)
    assert first == "b"
    assert again == [("b", {STICKY: token})] * 5


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
        lambda t: t[:-2],
        lambda t: "v2." + t[3:],
        lambda t: "garbage",
        lambda t: "",
    ],
    ids=["last-char", "truncated", "version", "garbage", "empty"],
)
async def test_a_tampered_token_is_ignored(tamper: Any) -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="round_robin", cluster=_sticky())
        async with through(cfg) as t:
            _, initial = await _unary(t.stub)
            forged = tamper(initial[STICKY])
            got = [await _unary(t.stub, [(STICKY, forged)]) for _ in range(4)]
            tokens = {name: md[STICKY] for name, md in got}
            # Each fresh token is a real one: it pins.
            pinned = [await _backend(t.stub, [(STICKY, tokens[n])]) for n in "bcda"]
    assert [name for name, _ in got] == list("bcda")
    assert len(set(tokens.values())) == 4 and forged not in tokens.values()
    assert pinned == list("bcda")


async def test_a_token_for_an_endpoint_out_of_rotation_gets_a_new_pick_and_token() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="round_robin", cluster=_sticky())
        async with through(cfg) as t:
            health = t.gateway.clusters["echo"].health
            first, initial = await _unary(t.stub)
            old = initial[STICKY]
            health.check_failed(health.endpoints[0], "test", explicit=True)
            moved_to, md = await _unary(t.stub, [(STICKY, old)])
            new = md[STICKY]
            repinned = [await _unary(t.stub, [(STICKY, new)]) for _ in range(4)]
            for _ in range(cfg.clusters[0].health_check.healthy_threshold):
                health.check_passed(health.endpoints[0])
            back = [await _unary(t.stub, [(STICKY, old)]) for _ in range(4)]
    assert first == "a"
    assert moved_to == "b"  # round robin moves on from a
    assert new != old
    assert repinned == [(moved_to, {STICKY: new})] * 4
    assert back == [("a", {STICKY: old})] * 4


async def test_a_custom_token_key() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="round_robin", cluster=_sticky(key="x-pin"))
        async with through(cfg) as t:
            first, initial = await _unary(t.stub)
            token = initial["x-pin"]
            pinned = [await _unary(t.stub, [("x-pin", token)]) for _ in range(4)]
            # Under the default key, the same token means nothing here.
            other_key = [await _backend(t.stub, [(STICKY, token)]) for _ in range(4)]
    assert STICKY not in initial
    assert pinned == [(first, {"x-pin": token})] * 4
    assert other_key == list("bcda")


async def test_a_token_wins_over_the_hash_key() -> None:
    async with echo_backends(*_backends()) as addrs:
        cfg = config(addrs, strategy="maglev", cluster=_hashed() | _sticky())
        async with through(cfg) as t:
            routed = await _route(t.stub, KEYS[:40])
            to_a = next(k for k, v in routed.items() if v == "a")
            elsewhere = next(k for k, v in routed.items() if v != "a")
            _, initial = await _unary(t.stub, [(HASH_KEY, to_a)])
            token = initial[STICKY]  # names a
            got = [
                await _backend(t.stub, [(HASH_KEY, elsewhere), (STICKY, token)]) for _ in range(4)
            ]
            plain = await _backend(t.stub, [(HASH_KEY, elsewhere)])
    assert got == ["a"] * 4
    assert plain == routed[elsewhere] != "a"


@pytest.mark.parametrize(
    ("secret_one", "secret_two"),
    [("s", "t"), ("", "")],
    ids=["other-secret", "random-secrets"],
)
async def test_a_token_signed_with_another_secret_is_ignored(
    secret_one: str, secret_two: str
) -> None:
    async with echo_backends(*_backends()) as addrs:
        one = config(addrs, strategy="round_robin", cluster=_sticky(secret=secret_one))
        two = config(addrs, strategy="round_robin", cluster=_sticky(secret=secret_two))
        async with through(one) as t1, through(two) as t2:
            _, initial = await _unary(t1.stub)
            foreign = initial[STICKY]
            got = [await _unary(t2.stub, [(STICKY, foreign)]) for _ in range(4)]
            own = await _backend(t1.stub, [(STICKY, foreign)])
    assert [name for name, _ in got] == list("abcd")
    assert foreign not in {md[STICKY] for _, md in got}
    assert own == "a"


async def test_a_token_from_another_cluster_is_ignored() -> None:
    async with echo_backends(*_backends()) as addrs:
        cluster = {
            "endpoints": [{"address": a} for a in addrs],
            "strategy": "round_robin",
            "methods": ALL_KINDS,
            **_sticky(),
        }
        cfg = config_from_mapping(
            {
                "listeners": [{"address": "127.0.0.1:0"}],
                "clusters": {"one": cluster, "two": cluster},
                "routes": [
                    {"method": UNARY, "cluster": "one"},
                    {"default": True, "cluster": "two"},
                ],
            },
            source="<test>",
        )
        async with through(cfg) as t:
            _, initial = await _unary(t.stub)  # cluster one: a
            token = initial[STICKY]
            streams = [
                await _call_kind(t.stub, "server_streaming", [(STICKY, token)]) for _ in range(4)
            ]
            pinned = await _backend(t.stub, [(STICKY, token)])
    assert [name for name, _ in streams] == list("abcd")  # cluster two rotates
    assert token not in {md[STICKY] for _, md in streams}
    assert pinned == "a"


class _Switchable(EchoBackend):
    """An echo backend that ends every unary call with UNAVAILABLE while ``down``."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.down = False

    async def Unary(  # noqa: N802 - the gRPC method's name
        self, request: echo_pb2.EchoRequest, context: _Context
    ) -> echo_pb2.EchoResponse:
        if self.down:
            self.seen.calls += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        return await super().Unary(request, context)


async def test_a_pinned_endpoint_that_fails_unavailable_is_retried_elsewhere_with_a_new_token() -> (
    None
):
    a, b = _Switchable("a"), EchoBackend("b")
    async with echo_backends(a, b) as addrs:
        cluster = _sticky() | {"outlier_detection": {"consecutive_failures": 0}}
        cfg = config(addrs, strategy="round_robin", cluster=cluster)
        async with through(cfg) as t:
            first, initial = await _unary(t.stub)
            old = initial[STICKY]
            a.down = True
            retried, md = await _unary(t.stub, [(STICKY, old)])
            assert t.gateway.clusters["echo"].retry_stats["sent"] == 1
    assert first == "a"
    assert a.seen.calls == 2  # the first call, and the failed attempt
    assert retried == "b"
    assert md[STICKY] != old


async def test_a_token_from_one_replica_pins_the_call_through_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def toml(order: Sequence[str], secret: str) -> Path:
        endpoints = ", ".join(f'{{ address = "{a}" }}' for a in order)
        path = tmp_path / f"lbgw-{len(list(tmp_path.iterdir()))}.toml"
        path.write_text(
            f"""
[[listeners]]
address = "127.0.0.1:0"

[clusters.echo]
strategy = "round_robin"
endpoints = [{endpoints}]

[clusters.echo.health_check]
mode = "none"

[clusters.echo.sticky]
enabled = true
secret = "{secret}"
"""
        )
        return path

    async with echo_backends(*_backends()) as addrs, contextlib.AsyncExitStack() as stack:
        # One replica gets the secret from the environment, which wins over
        # its file's placeholder; the other from its file.
        with monkeypatch.context() as env:
            env.setenv(STICKY_SECRET_ENV, "shared")
            one = await stack.enter_async_context(
                lbgw_process("--config", str(toml(addrs, "placeholder")))
            )
        with monkeypatch.context() as env:
            env.delenv(STICKY_SECRET_ENV, raising=False)
            two = await stack.enter_async_context(
                lbgw_process("--config", str(toml(addrs[::-1], "shared")))
            )
        async with (
            aio.insecure_channel(one.address) as ch1,
            aio.insecure_channel(two.address) as ch2,
        ):
            s1, s2 = _stub(ch1), _stub(ch2)
            issued = dict([await _unary(s1) for _ in NAMES])
            tokens = {name: md[STICKY] for name, md in issued.items()}
            through_two = {
                name: [await _unary(s2, [(STICKY, token)]) for _ in range(3)]
                for name, token in tokens.items()
            }
            rotation = [await _backend(s2) for _ in NAMES]
        await _stop(one)
        await _stop(two)
    assert list(tokens) == list(NAMES)
    assert through_two == {n: [(n, {STICKY: tokens[n]})] * 3 for n in NAMES}
    assert rotation == list("dcba")  # without a token, replica two rotates in its own order


# --- command line ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ring_hash", "maglev"])
def test_serve_with_a_hashing_strategy_and_no_hash_key_exits_2(strategy: str) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "lbgw", "serve", "--listen", "127.0.0.1:0"),
            *("--backend", "127.0.0.1:1", "--strategy", strategy),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--hash-key" in result.stderr
