"""Traces of forwarded calls: spans, their links, the routing decision and W3C propagation.

Real gateways and real backends on 127.0.0.1, real OpenTelemetry SDK. The
in-process gateways record into an ``InMemorySpanExporter``
(``Telemetry.for_testing``); the last test runs ``lbgw serve`` as a process
of its own and reads what it exports over OTLP/gRPC with
``lbgw.testing.OtlpReceiver``. Each call carries a traceparent with a trace
id of its own, so a span is found by the call it belongs to.

Active health checks are off (``mode = "none"``) so that every endpoint
stays in rotation unless a test takes it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from lbgw.balancer import Balancer
from lbgw.config import Config
from lbgw.endpoints import ClusterHealth
from lbgw.pb import echo_pb2, echo_pb2_grpc
from lbgw.server import Gateway
from lbgw.telemetry import Telemetry
from lbgw.testing import EchoBackend, OtlpReceiver, ReceivedSpan, serve
from tests.integration.support import ALL_KINDS, config, echo_backends, request

_Context: TypeAlias = aio.ServicerContext[Any, Any]
Metadata: TypeAlias = tuple[tuple[str, str], ...]

SERVICE = "lbgw.echo.v1.Echo"
KINDS = ("Unary", "ServerStream", "ClientStream", "Bidi")
#: (strategy, weights): least_request compares two at random (P2C) only with equal weights.
STRATEGIES = [
    ("swrr", [1, 2, 3]),
    ("round_robin", [1, 2, 3]),
    ("random", [1, 2, 3]),
    ("least_request", [1, 2, 3]),
    ("least_request", [1, 1, 1]),
    ("ewma", [1, 2, 3]),
]
# No call but the test's own reaches a backend: no health checks, no reflection.
NO_CHECKS: dict[str, Any] = {"health_check": {"mode": "none"}, "reflection": False}
TRACESTATE = "lbgw=t61rcWkgMzE,other=x"
BAGGAGE = "user=alice,tier=gold"


# --- trace context the client sends -----------------------------------------------------


@dataclass(frozen=True)
class ClientTrace:
    """The client's side of one call: its trace id and span id, and whether it sampled."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @classmethod
    def new(cls, *, sampled: bool = True) -> ClientTrace:
        return cls(secrets.token_hex(16), secrets.token_hex(8), sampled)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def metadata(self, *extra: tuple[str, str]) -> Metadata:
        return (("traceparent", self.traceparent), *extra)


def parse_traceparent(value: str) -> tuple[str, str, str]:
    """``00-trace-span-flags`` -> (trace id, parent span id, flags)."""
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00"
    return trace_id, span_id, flags


def header(metadata: Sequence[tuple[str, str | bytes]], key: str) -> str:
    """The one value of ``key`` in metadata a backend received."""
    values = [v for k, v in metadata if k == key]
    assert len(values) == 1, (key, metadata)
    value = values[0]
    assert isinstance(value, str)
    return value


# --- spans the in-memory exporter holds ------------------------------------------------------


def span_id(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return trace.format_span_id(context.span_id)


def trace_id(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return trace.format_trace_id(context.trace_id)


def parent_id(span: ReadableSpan) -> str | None:
    return None if span.parent is None else trace.format_span_id(span.parent.span_id)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()}


@dataclass
class CallSpans:
    server: ReadableSpan
    clients: list[ReadableSpan]  # by lb.attempt


def spans_of(exporter: InMemorySpanExporter, client: ClientTrace) -> CallSpans:
    """The SERVER span and the CLIENT spans of the call that carried ``client``'s trace."""
    mine = [s for s in exporter.get_finished_spans() if trace_id(s) == client.trace_id]
    servers = [s for s in mine if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [(s.name, s.kind) for s in mine]
    clients = [s for s in mine if s.kind is SpanKind.CLIENT]
    assert len(clients) + 1 == len(mine), [(s.name, s.kind) for s in mine]
    return CallSpans(servers[0], sorted(clients, key=lambda s: attrs(s)["lb.attempt"]))


# --- gateways and calls ------------------------------------------------------------------


@dataclass
class Traced:
    gateway: Gateway
    stub: Any  # echo_pb2_grpc.EchoStub, untyped generated code
    exporter: InMemorySpanExporter


@contextlib.asynccontextmanager
async def traced(cfg: Config, telemetry_config: Any = None) -> AsyncIterator[Traced]:
    """A gateway for ``cfg`` whose spans go to an in-memory exporter, and a client stub."""
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.for_testing(exporter, telemetry_config)
    async with (
        Gateway(cfg, telemetry=telemetry) as gateway,
        aio.insecure_channel(gateway.addresses[0]) as channel,
    ):
        stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
        yield Traced(gateway, stub, exporter)


async def _requests(n: int) -> AsyncIterator[echo_pb2.EchoRequest]:
    for i in range(n):
        yield request(message=str(i))


async def call(
    stub: Any, kind: str, metadata: Metadata, messages: int = 2
) -> list[echo_pb2.EchoResponse]:
    """One call of ``kind`` (``messages`` requests for a request stream); its replies.

    A call lbgw refuses is made with ``messages=0``: otherwise the client's
    own write after the early status can fail first, with INTERNAL
    (grpc/grpc#36066), which is the client library's doing, not lbgw's.
    """
    if kind == "Unary":
        return [await stub.Unary(request(message="m"), metadata=metadata, timeout=5)]
    if kind == "ServerStream":
        stream = stub.ServerStream(request(response_count=2), metadata=metadata, timeout=5)
        return [r async for r in stream]
    if kind == "ClientStream":
        return [await stub.ClientStream(_requests(messages), metadata=metadata, timeout=5)]
    return [r async for r in stub.Bidi(_requests(messages), metadata=metadata, timeout=5)]


def address_of(backends: Sequence[EchoBackend], addrs: Sequence[str]) -> dict[str, str]:
    return {b.name: a for b, a in zip(backends, addrs, strict=True)}


# --- a backend that refuses every call ------------------------------------------------------


class Refusing(grpc.GenericRpcHandler):
    """Any method, any kind: ends the call with UNAVAILABLE, recording the metadata it saw."""

    def __init__(self) -> None:
        self.metadata: list[tuple[tuple[str, str | bytes], ...]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        async def refuse(requests: Any, context: _Context) -> None:
            self.metadata.append(tuple(context.invocation_metadata() or ()))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "refusing")

        return grpc.stream_stream_rpc_method_handler(refuse)

    def register(self, server: aio.Server) -> None:
        server.add_generic_rpc_handlers((self,))


# --- structure and propagation, for every kind --------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_call_is_a_server_span_over_a_client_span_and_the_backend_gets_its_context(
    kind: str,
) -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,), traced(config([addr], cluster=NO_CHECKS)) as t:
        client = ClientTrace.new()
        md = client.metadata(("tracestate", TRACESTATE), ("baggage", BAGGAGE), ("x-user", "u1"))
        replies = await call(t.stub, kind, md)
        assert {r.backend for r in replies} == {"a"}
        spans = spans_of(t.exporter, client)

    server, (attempt,) = spans.server, spans.clients
    name = f"{SERVICE}/{kind}"
    assert (server.name, server.kind) == (name, SpanKind.SERVER)
    assert (attempt.name, attempt.kind) == (name, SpanKind.CLIENT)
    # The server span continues the client's trace; the attempt is its child.
    assert trace_id(server) == trace_id(attempt) == client.trace_id
    assert parent_id(server) == client.span_id
    assert server.parent is not None and server.parent.is_remote
    assert parent_id(attempt) == span_id(server)

    server_attrs = attrs(server)
    peer_port = server_attrs.pop("network.peer.port")
    assert isinstance(peer_port, int) and 0 < peer_port < 65536
    assert server_attrs == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": kind,
        "network.peer.address": "127.0.0.1",
        "rpc.grpc.status_code": 0,
    }
    assert server.status.status_code is StatusCode.UNSET

    host, port = addr.rsplit(":", 1)
    attempt_attrs = attrs(attempt)
    assert {k: v for k, v in attempt_attrs.items() if not k.startswith("lb.")} == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": kind,
        "server.address": host,
        "server.port": int(port),
        "rpc.grpc.status_code": 0,
    }
    assert attempt_attrs["lb.attempt"] == 1
    assert "lb.retry_reason" not in attempt_attrs
    assert attempt_attrs["lb.endpoint"] == addr
    assert attempt.status.status_code is StatusCode.UNSET

    # What the backend received: the attempt's span as parent, the rest untouched.
    (seen,) = a.seen.metadata
    assert parse_traceparent(header(seen, "traceparent")) == (
        client.trace_id,
        span_id(attempt),
        "01",
    )
    assert header(seen, "tracestate") == TRACESTATE
    assert sorted(header(seen, "baggage").split(",")) == sorted(BAGGAGE.split(","))
    assert header(seen, "x-user") == "u1"


@pytest.mark.parametrize("kind", KINDS)
async def test_an_unsampled_call_exports_nothing_and_builds_no_decision(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client said "not sampled" (flags 00): the backend hears the same, nothing is built."""
    built: list[str] = []
    candidates, skipped = Balancer.candidates, ClusterHealth.skipped

    def counting_candidates(self: Balancer, *, exclude: Any = None, limit: int = 16) -> Any:
        built.append("candidates")
        return candidates(self, exclude=exclude, limit=limit)

    def counting_skipped(self: ClusterHealth, exclude: Any = None) -> Any:
        built.append("skipped")
        return skipped(self, exclude)

    monkeypatch.setattr(Balancer, "candidates", counting_candidates)
    monkeypatch.setattr(ClusterHealth, "skipped", counting_skipped)
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,), traced(config([addr], cluster=NO_CHECKS)) as t:
        client = ClientTrace.new(sampled=False)
        md = client.metadata(("tracestate", TRACESTATE), ("baggage", BAGGAGE))
        assert {r.backend for r in await call(t.stub, kind, md)} == {"a"}
        assert t.exporter.get_finished_spans() == ()
        assert built == []

        # The same gateway, sampled: the decision is built, once per pick.
        sampled = ClientTrace.new()
        await call(t.stub, kind, sampled.metadata())
        assert len(spans_of(t.exporter, sampled).clients) == 1
        assert built == ["candidates", "skipped"]

    seen = a.seen.metadata[0]
    got_trace, _, flags = parse_traceparent(header(seen, "traceparent"))
    assert (got_trace, flags) == (client.trace_id, "00")
    assert header(seen, "tracestate") == TRACESTATE
    assert sorted(header(seen, "baggage").split(",")) == sorted(BAGGAGE.split(","))


async def test_without_a_traceparent_lbgw_starts_the_trace() -> None:
    a = EchoBackend("a")
    async with echo_backends(a) as (addr,), traced(config([addr], cluster=NO_CHECKS)) as t:
        await call(t.stub, "Unary", ())
        spans = t.exporter.get_finished_spans()
    (attempt, server) = sorted(spans, key=lambda s: s.kind is SpanKind.SERVER)
    assert (attempt.kind, server.kind) == (SpanKind.CLIENT, SpanKind.SERVER)
    assert server.parent is None
    assert parent_id(attempt) == span_id(server)
    (seen,) = a.seen.metadata
    got_trace, got_parent, flags = parse_traceparent(header(seen, "traceparent"))
    assert (got_trace, got_parent) == (trace_id(server), span_id(attempt))
    assert int(flags, 16) & 0x01  # sampled (the SDK may add 0x02, "random trace id")


# --- the routing decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "weights"), STRATEGIES, ids=[f"{s}-{'/'.join(map(str, w))}" for s, w in STRATEGIES]
)
async def test_the_decision_names_the_endpoint_that_answered(
    strategy: str, weights: list[int]
) -> None:
    """lb.endpoint is the backend that replied; the candidates are those the pick compared.

    A power-of-two-choices pick (ewma; least_request with equal weights)
    compares two endpoints and lists those two; every other pick considers
    every endpoint in rotation and lists them all, in config order.
    """
    p2c = strategy == "ewma" or (strategy == "least_request" and len(set(weights)) == 1)
    backends = [EchoBackend("a"), EchoBackend("b"), EchoBackend("c")]
    async with echo_backends(*backends) as addrs:
        where = address_of(backends, addrs)
        weight_of = dict(zip(addrs, weights, strict=True))
        cfg = config(addrs, weights, strategy=strategy, cluster=NO_CHECKS)
        async with traced(cfg) as t:
            calls = []
            for _ in range(8):
                client = ClientTrace.new()
                (reply,) = await call(t.stub, "Unary", client.metadata())
                calls.append((client, reply.backend))
            answered = []
            for client, backend in calls:
                (attempt,) = spans_of(t.exporter, client).clients
                a = attrs(attempt)
                endpoint = where[backend]
                assert a["lb.endpoint"] == endpoint
                assert f"{a['server.address']}:{a['server.port']}" == endpoint
                assert (a["lb.strategy"], a["lb.cluster"], a["lb.route"]) == (
                    strategy,
                    "echo",
                    "default",
                )
                assert isinstance(a["lb.pick_duration_ns"], int) and a["lb.pick_duration_ns"] >= 0
                candidates = list(json.loads(a["lb.candidate_scores"]))
                if p2c:
                    assert len(candidates) == len(set(candidates)) == 2
                    assert set(candidates) <= set(addrs)
                else:
                    assert candidates == list(addrs)
                assert endpoint in candidates
                # The figures the pick saw: nothing in flight between these calls.
                scores = json.loads(a["lb.candidate_scores"])
                assert list(scores) == candidates
                for address in candidates:
                    assert scores[address]["weight"] == weight_of[address]
                    assert scores[address]["in_flight"] == 0
                    assert ("cost" in scores[address]) == (strategy == "ewma")
                if strategy == "ewma":  # Peak EWMA's P2C takes the lower cost of the two
                    (other,) = set(candidates) - {endpoint}
                    assert scores[endpoint]["cost"] <= scores[other]["cost"] * 1.01 + 0.001
                assert "lb.skipped" not in a and "lb.skipped_reasons" not in a
                answered.append(backend)
    if strategy in ("swrr", "round_robin"):
        # Deterministic strategies: the spans tell the pick sequence itself.
        expected = {"swrr": list("cbacbccb"), "round_robin": list("abcabcab")}[strategy]
        assert answered == expected


async def test_the_scores_are_the_ones_the_pick_saw() -> None:
    """A call held at a backend shows as in flight in the next call's candidate scores."""
    backends = [EchoBackend("a"), EchoBackend("b")]
    async with echo_backends(*backends) as addrs:
        where = address_of(backends, addrs)
        async with traced(config(addrs, strategy="round_robin", cluster=NO_CHECKS)) as t:
            slow = asyncio.ensure_future(
                t.stub.Unary(request(delay_ms=400), metadata=ClientTrace.new().metadata())
            )
            async with asyncio.timeout(5):
                while not backends[0].seen.calls:
                    await asyncio.sleep(0.005)
            client = ClientTrace.new()
            (reply,) = await call(t.stub, "Unary", client.metadata())
            assert (await slow).backend == "a"
            (attempt,) = spans_of(t.exporter, client).clients
    assert reply.backend == "b"
    scores = json.loads(attrs(attempt)["lb.candidate_scores"])
    assert scores[where["a"]]["in_flight"] == 1
    assert scores[where["b"]]["in_flight"] == 0


async def test_endpoints_out_of_rotation_are_listed_as_skipped_with_why() -> None:
    backends = [EchoBackend("a"), EchoBackend("b"), EchoBackend("c")]
    cluster = NO_CHECKS | {"outlier_detection": {"consecutive_failures": 1}}
    async with echo_backends(*backends) as addrs, traced(config(addrs, cluster=cluster)) as t:
        health = t.gateway.clusters["echo"].health
        health.check_failed(health.endpoints[0], "said NOT_SERVING", explicit=True)
        health.failed(health.endpoints[1], grpc.StatusCode.UNAVAILABLE)  # one failure ejects here
        client = ClientTrace.new()
        (reply,) = await call(t.stub, "Unary", client.metadata())
        (attempt,) = spans_of(t.exporter, client).clients
    assert reply.backend == "c"
    a = attrs(attempt)
    assert a["lb.endpoint"] == addrs[2]
    assert list(json.loads(a["lb.candidate_scores"])) == [addrs[2]]
    assert a["lb.skipped"] == [addrs[0], addrs[1]]
    assert a["lb.skipped_reasons"] == ["not_serving", "ejected"]


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Unary", "ServerStream"])
async def test_a_retry_is_a_second_client_span_on_another_endpoint(kind: str) -> None:
    refusing, good = Refusing(), EchoBackend("good")
    async with (
        serve(refusing.register) as bad_addr,
        echo_backends(good) as (good_addr,),
        traced(config([bad_addr, good_addr], cluster=NO_CHECKS)) as t,
    ):
        client = ClientTrace.new()
        replies = await call(t.stub, kind, client.metadata())
        assert {r.backend for r in replies} == {"good"}
        spans = spans_of(t.exporter, client)

    server, (first, second) = spans.server, spans.clients
    assert parent_id(first) == parent_id(second) == span_id(server)
    one, two = attrs(first), attrs(second)
    assert (one["lb.attempt"], one["lb.endpoint"], one["rpc.grpc.status_code"]) == (
        1,
        bad_addr,
        grpc.StatusCode.UNAVAILABLE.value[0],
    )
    assert "lb.retry_reason" not in one
    assert (first.status.status_code, first.status.description) == (StatusCode.ERROR, "refusing")
    assert (two["lb.attempt"], two["lb.retry_reason"], two["lb.endpoint"]) == (
        2,
        "UNAVAILABLE",
        good_addr,
    )
    assert two["rpc.grpc.status_code"] == 0
    assert second.status.status_code is StatusCode.UNSET
    # The retry's pick left out the endpoint that failed, and says so.
    assert two["lb.skipped"] == [bad_addr]
    assert two["lb.skipped_reasons"] == ["tried"]
    # The call as the client saw it succeeded.
    assert attrs(server)["rpc.grpc.status_code"] == 0
    assert server.status.status_code is StatusCode.UNSET
    # Each backend heard of its own attempt.
    (bad_seen,) = refusing.metadata
    (good_seen,) = good.seen.metadata
    assert parse_traceparent(header(bad_seen, "traceparent"))[:2] == (
        client.trace_id,
        span_id(first),
    )
    assert parse_traceparent(header(good_seen, "traceparent"))[:2] == (
        client.trace_id,
        span_id(second),
    )


async def test_a_retry_does_not_list_the_tried_endpoint_as_a_candidate() -> None:
    refusing, good = Refusing(), EchoBackend("good")
    async with (
        serve(refusing.register) as bad_addr,
        echo_backends(good) as (good_addr,),
        traced(config([bad_addr, good_addr], cluster=NO_CHECKS)) as t,
    ):
        client = ClientTrace.new()
        await call(t.stub, "Unary", client.metadata())
        _, second = spans_of(t.exporter, client).clients
    two = attrs(second)
    assert two["lb.skipped"] == [bad_addr]  # left out as "tried" ...
    assert list(json.loads(two["lb.candidate_scores"])) == [good_addr]  # ... not compared


# --- rejected calls ---------------------------------------------------------------------------


async def test_a_call_without_a_route_has_an_error_server_span_and_no_client_span() -> None:
    a = EchoBackend("a")
    routes = [{"service": "other.v1.Svc", "cluster": "echo"}]
    async with (
        echo_backends(a) as (addr,),
        traced(config([addr], cluster=NO_CHECKS, routes=routes)) as t,
    ):
        client = ClientTrace.new()
        with pytest.raises(aio.AioRpcError) as info:
            await call(t.stub, "Unary", client.metadata())
        spans = spans_of(t.exporter, client)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert spans.clients == []
    server = spans.server
    assert server.name == f"{SERVICE}/Unary"
    assert parent_id(server) == client.span_id
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == info.value.details()
    assert "/lbgw.echo.v1.Echo/Unary" in (server.status.description or "")
    assert attrs(server)["rpc.grpc.status_code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert a.seen.calls == 0


def _not_serving(health: ClusterHealth) -> None:
    for i in range(len(health.states())):
        health.check_failed(health.endpoints[i], "said NOT_SERVING", explicit=True)


@pytest.mark.parametrize(
    ("take_out", "reason"),
    [(_not_serving, "not_serving"), (ClusterHealth.drain, "draining")],
    ids=["not_serving", "draining"],
)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_call_with_no_endpoint_in_rotation_has_an_error_server_span_saying_why(
    kind: str, take_out: Callable[[ClusterHealth], None], reason: str
) -> None:
    backends = [EchoBackend("a"), EchoBackend("b")]
    async with echo_backends(*backends) as addrs, traced(config(addrs, cluster=NO_CHECKS)) as t:
        take_out(t.gateway.clusters["echo"].health)
        client = ClientTrace.new()
        with pytest.raises(aio.AioRpcError) as info:
            await call(t.stub, kind, client.metadata(), messages=0)
        spans = spans_of(t.exporter, client)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert spans.clients == []
    server = spans.server
    assert parent_id(server) == client.span_id
    assert server.status.status_code is StatusCode.ERROR
    assert server.status.description == info.value.details()
    a = attrs(server)
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert (a["lb.cluster"], a["lb.strategy"], a["lb.route"]) == ("echo", "swrr", "default")
    assert "lb.endpoint" not in a
    assert a["lb.skipped"] == list(addrs)
    assert a["lb.skipped_reasons"] == [reason, reason]
    assert [b.seen.calls for b in backends] == [0, 0]


# --- over the wire: `lbgw serve` exporting to an OTLP receiver -----------------------------------


def _environ(otlp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{otlp}",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_SERVICE_NAME="lbgw-e2e",
    )
    return env


@contextlib.asynccontextmanager
async def lbgw_serve(*args: str, env: dict[str, str]) -> AsyncIterator[str]:
    """``python -m lbgw serve ARGS`` with ``env``; yields its address; SIGTERM by PID at exit.

    Its JSON log lines (stderr) are read without blocking this event loop,
    which also serves the backends and the receiver it talks to.
    """
    argv = [sys.executable, "-m", "lbgw", "serve", *args, "--log-format", "json"]
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    stderr = process.stderr
    lines: list[str] = []

    async def listening() -> str:
        while line := await stderr.readline():
            lines.append(line.decode(errors="replace"))
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "listening":
                    return str(event["address"])
        raise AssertionError(f"lbgw exited before listening: {''.join(lines)}")

    async def drain() -> None:
        while line := await stderr.readline():
            lines.append(line.decode(errors="replace"))

    drainer: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(20):
            address = await listening()
        drainer = asyncio.create_task(drain())
        yield address
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            code = await process.wait()
        assert code == 0, "".join(lines)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 10)
        if drainer is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(drainer, 5)


def _received(spans: Sequence[ReceivedSpan], client: ClientTrace) -> tuple[ReceivedSpan, ...]:
    mine = [s for s in spans if s.trace_id == client.trace_id]
    servers = [s for s in mine if s.kind is SpanKind.SERVER]
    clients = [s for s in mine if s.kind is SpanKind.CLIENT]
    assert len(servers) == len(clients) == 1, [(s.name, s.kind) for s in mine]
    return servers[0], clients[0]


async def test_lbgw_serve_exports_linked_spans_over_otlp_to_a_receiver() -> None:
    backends = [EchoBackend("a"), EchoBackend("b")]
    receiver = OtlpReceiver()
    async with serve(receiver.register) as otlp, echo_backends(*backends) as addrs:
        where = address_of(backends, addrs)
        args = ["--listen", "127.0.0.1:0", "--health-check", "none", "--strategy", "round_robin"]
        for addr in addrs:
            args += ["--backend", addr]
        for method, kind in ALL_KINDS.items():
            args += ["--method", f"{method}={kind}"]
        calls: list[tuple[str, ClientTrace, str]] = []
        async with lbgw_serve(*args, env=_environ(otlp)) as address:
            async with aio.insecure_channel(address) as channel:
                stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
                for kind in KINDS:
                    client = ClientTrace.new()
                    md = client.metadata(("tracestate", TRACESTATE))
                    replies = await call(stub, kind, md)
                    (backend,) = {r.backend for r in replies}
                    calls.append((kind, client, backend))
            spans = await receiver.wait_for(2 * len(calls))
        # Every backend call, in order of arrival, per backend.
        seen = {b.name: list(b.seen.metadata) for b in backends}

    assert len(spans) == 2 * len(calls)
    assert {s.service_name for s in spans} == {"lbgw-e2e"}
    assert {s.scope for s in spans} == {"lbgw"}
    assert {b for _, _, b in calls} == {"a", "b"}  # round robin: both answered
    for kind, client, backend in calls:
        server, attempt = _received(spans, client)
        assert server.name == attempt.name == f"{SERVICE}/{kind}"
        assert server.parent_span_id == client.span_id
        assert attempt.parent_span_id == server.span_id
        assert attempt.attributes["lb.endpoint"] == where[backend]
        assert attempt.attributes["lb.attempt"] == 1
        assert attempt.attributes["lb.strategy"] == "round_robin"
        assert list(json.loads(attempt.attributes["lb.candidate_scores"])) == list(addrs)
        assert server.status is attempt.status is StatusCode.UNSET
        assert server.attributes["rpc.grpc.status_code"] == 0
        # The backend that answered got lbgw's CLIENT span as the parent.
        heard = [m for m in seen[backend] if client.trace_id in header(m, "traceparent")]
        assert len(heard) == 1
        assert parse_traceparent(header(heard[0], "traceparent")) == (
            client.trace_id,
            attempt.span_id,
            "01",
        )
        assert header(heard[0], "tracestate") == TRACESTATE
