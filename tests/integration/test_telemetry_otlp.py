"""Spans reach a real OTLP/gRPC receiver on loopback, through the SDK's batch processor.

``Telemetry`` is built from a ``TracingConfig`` as the gateway builds it:
the OTLP/gRPC exporter and a ``BatchSpanProcessor``. The receiver is
``lbgw.testing.OtlpReceiver`` on ``127.0.0.1:0``. The exporter sends from its
own thread, and the receiver answers from this test's event loop, so the
blocking flush and shutdown run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, StatusCode

from lbgw.config import TracingConfig, tracing_from_env
from lbgw.telemetry import Telemetry, end_span, record_decision, with_span
from lbgw.testing import OtlpReceiver, serve

METHOD = "/lbgw.echo.v1.Echo/Unary"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    otlp = OtlpReceiver()
    async with serve(otlp.register) as address:
        yield otlp, address


def one_call(telemetry: Telemetry) -> tuple[tuple[str, str | bytes], ...]:
    """A failed call with a retry, as the proxy will trace it; the metadata it sends on."""
    client = (("traceparent", TRACEPARENT), ("x-user", "u1"))
    parent = telemetry.extract(client)
    server = telemetry.server_span(METHOD, "ipv6:%5B::1%5D:41000", parent)
    first = telemetry.attempt_span(server, METHOD, "127.0.0.1:50061")
    record_decision(
        first,
        "echo",
        "ewma",
        "127.0.0.1:50061",
        candidates=[("127.0.0.1:50061", {"ewma_ms": 1.5}), ("127.0.0.1:50062", {"ewma_ms": 9})],
        skipped=[("127.0.0.1:50063", "ejected")],
        pick_ns=420,
    )
    end_span(first, grpc.StatusCode.UNAVAILABLE, "connection refused")
    second = telemetry.attempt_span(server, METHOD, "127.0.0.1:50062", 2, "UNAVAILABLE")
    record_decision(
        second, "echo", "ewma", "127.0.0.1:50062", skipped=[("127.0.0.1:50061", "tried")]
    )
    metadata = telemetry.inject(client, with_span(second, parent))
    end_span(second, grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    end_span(server, grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    return metadata


async def test_spans_arrive_over_otlp_grpc_with_their_links_and_attributes() -> None:
    async with receiver() as (otlp, address):
        config = TracingConfig(service_name="edge", endpoint=f"http://{address}")
        telemetry = Telemetry(config)
        assert telemetry.exporter == "otlp"
        try:
            metadata = one_call(telemetry)
            assert await asyncio.to_thread(telemetry.force_flush, 10_000)
            spans = await otlp.wait_for(3)
        finally:
            await asyncio.to_thread(telemetry.shutdown)

    first, second, server = spans
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert {s.service_name for s in spans} == {"edge"}
    assert {s.scope for s in spans} == {"lbgw"}
    assert [s.name for s in spans] == ["lbgw.echo.v1.Echo/Unary"] * 3
    assert (server.kind, first.kind, second.kind) == (
        SpanKind.SERVER,
        SpanKind.CLIENT,
        SpanKind.CLIENT,
    )
    assert server.parent_span_id == "00f067aa0ba902b7"  # the client's span
    assert first.parent_span_id == second.parent_span_id == server.span_id
    assert ("traceparent", f"00-{TRACE_ID}-{second.span_id}-01") in metadata

    assert server.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "lbgw.echo.v1.Echo",
        "rpc.method": "Unary",
        "network.peer.address": "::1",
        "network.peer.port": 41000,
        "rpc.grpc.status_code": 4,
    }
    assert (server.status, server.status_message) == (StatusCode.ERROR, "slow")
    assert first.attributes == {
        "rpc.system": "grpc",
        "rpc.service": "lbgw.echo.v1.Echo",
        "rpc.method": "Unary",
        "server.address": "127.0.0.1",
        "server.port": 50061,
        "lb.attempt": 1,
        "lb.cluster": "echo",
        "lb.strategy": "ewma",
        "lb.endpoint": "127.0.0.1:50061",
        "lb.pick_duration_ns": 420,
        "lb.candidate_scores": (
            '{"127.0.0.1:50061":{"ewma_ms":1.5},"127.0.0.1:50062":{"ewma_ms":9}}'
        ),
        "lb.skipped": ["127.0.0.1:50063"],
        "lb.skipped_reasons": ["ejected"],
        "rpc.grpc.status_code": 14,
    }
    assert (first.status, first.status_message) == (StatusCode.ERROR, "connection refused")
    assert second.attributes["lb.attempt"] == 2
    assert second.attributes["lb.retry_reason"] == "UNAVAILABLE"


async def test_shutdown_alone_flushes_what_the_batch_holds() -> None:
    async with receiver() as (otlp, address):
        # A schedule far in the future: only shutdown's flush can send these.
        config = tracing_from_env(
            TracingConfig(bsp_schedule_delay_ms=3_600_000),
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{address}"},
        )
        telemetry = Telemetry(config)
        for _ in range(5):
            end_span(telemetry.server_span(METHOD, None, Context()), grpc.StatusCode.OK)
        await asyncio.sleep(0.2)
        assert otlp.spans == []
        await asyncio.to_thread(telemetry.shutdown)
        spans = await otlp.wait_for(5)
    assert len(spans) == 5 and otlp.requests == 1
    assert {s.service_name for s in spans} == {"lbgw"}
    assert all(s.parent_span_id is None for s in spans)
    assert all(s.status is StatusCode.UNSET for s in spans)


async def test_an_unsampled_call_sends_nothing() -> None:
    async with receiver() as (otlp, address):
        config = TracingConfig(endpoint=f"http://{address}", sampler="always_off")
        telemetry = Telemetry(config)
        one_call(telemetry)
        await asyncio.to_thread(telemetry.shutdown)
        assert (otlp.requests, otlp.spans) == (0, [])
