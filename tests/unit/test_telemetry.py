"""Spans, attributes, statuses and W3C propagation, recorded by a real SDK in memory.

Every test builds its own ``Telemetry`` (``for_testing``) around an
``InMemorySpanExporter``; nothing touches OpenTelemetry's global provider.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc
import pytest
from opentelemetry import baggage, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from lbgw.config import TracingConfig
from lbgw.telemetry import (
    Candidates,
    Telemetry,
    end_span,
    parse_peer,
    record_decision,
    with_span,
)

METHOD = "/lbgw.echo.v1.Echo/Unary"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Telemetry:
    return Telemetry.for_testing(exporter)


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The ended spans by kind name, one of each expected."""
    spans = exporter.get_finished_spans()
    by_kind = {s.kind.name: s for s in spans}
    assert len(by_kind) == len(spans), [s.name for s in spans]
    return by_kind


def ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    assert context is not None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def call(
    telemetry: Telemetry, metadata: Sequence[tuple[str, str | bytes]] = ()
) -> tuple[trace.Span, trace.Span, Context]:
    parent = telemetry.extract(metadata)
    server = telemetry.server_span(METHOD, "ipv4:10.1.2.3:41000", parent)
    attempt = telemetry.attempt_span(server, METHOD, "10.0.0.11:50051")
    return server, attempt, parent


# -- spans ------------------------------------------------------------------------------------


def test_a_call_is_a_server_span_with_a_client_span_per_attempt_under_it(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    server, attempt, _ = call(telemetry, [("traceparent", TRACEPARENT)])
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)

    spans = finished(exporter)
    server_span, client_span = spans["SERVER"], spans["CLIENT"]
    assert server_span.name == client_span.name == "lbgw.echo.v1.Echo/Unary"
    # The server span continues the client's trace, under the client's span.
    assert ids(server_span)[0] == TRACE_ID
    assert server_span.parent is not None and server_span.parent.is_remote
    assert trace.format_span_id(server_span.parent.span_id) == CLIENT_SPAN_ID
    # The attempt is the server span's child, in the same trace.
    assert ids(client_span)[0] == TRACE_ID
    assert client_span.parent is not None and not client_span.parent.is_remote
    assert trace.format_span_id(client_span.parent.span_id) == ids(server_span)[1]

    assert dict(server_span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "lbgw.echo.v1.Echo",
        "rpc.method": "Unary",
        "network.peer.address": "10.1.2.3",
        "network.peer.port": 41000,
        "rpc.grpc.status_code": 0,
    }
    assert dict(client_span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "lbgw.echo.v1.Echo",
        "rpc.method": "Unary",
        "server.address": "10.0.0.11",
        "server.port": 50051,
        "lb.attempt": 1,
        "rpc.grpc.status_code": 0,
    }
    assert server_span.resource.attributes["service.name"] == "lbgw-test"
    assert server_span.instrumentation_scope is not None
    assert server_span.instrumentation_scope.name == "lbgw"


def test_without_a_traceparent_the_server_span_starts_a_trace(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    server, attempt, _ = call(telemetry, [("x-user", "u1")])
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)
    spans = finished(exporter)
    assert spans["SERVER"].parent is None
    assert ids(spans["CLIENT"])[0] == ids(spans["SERVER"])[0]


def test_a_retry_names_its_attempt_and_the_failure_before_it(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    server = telemetry.server_span(METHOD, None, Context())
    first = telemetry.attempt_span(server, METHOD, "[::1]:50051")
    end_span(first, grpc.StatusCode.UNAVAILABLE, "connection refused")
    second = telemetry.attempt_span(server, METHOD, "backend.local:50052", 2, "UNAVAILABLE")
    end_span(second, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)

    one, two, call_span = exporter.get_finished_spans()
    assert (one.attributes or {})["server.address"] == "::1"  # no brackets
    assert (one.attributes or {})["lb.attempt"] == 1
    assert "lb.retry_reason" not in (one.attributes or {})
    assert (
        dict(two.attributes or {}).items()
        >= {
            "server.address": "backend.local",
            "server.port": 50052,
            "lb.attempt": 2,
            "lb.retry_reason": "UNAVAILABLE",
        }.items()
    )
    assert one.parent == two.parent == call_span.get_span_context()
    assert "network.peer.address" not in (call_span.attributes or {})  # no peer given


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:5555", ("127.0.0.1", 5555)),
        ("ipv6:[::1]:5555", ("::1", 5555)),
        ("ipv6:%5B::1%5D:5555", ("::1", 5555)),  # what grpcio's context.peer() says
        ("ipv6:%5Bfe80::1%25eth0%5D:80", ("fe80::1%eth0", 80)),
        ("unix:/run/lbgw.sock", ("/run/lbgw.sock", None)),
        ("unix-abstract:lbgw", ("lbgw", None)),
        ("something", ("something", None)),
    ],
)
def test_parse_peer(peer: str, expected: tuple[str, int | None]) -> None:
    assert parse_peer(peer) == expected


def test_an_ipv6_peer_from_grpcio(telemetry: Telemetry, exporter: InMemorySpanExporter) -> None:
    end_span(telemetry.server_span(METHOD, "ipv6:%5B::1%5D:38434", Context()), grpc.StatusCode.OK)
    (span,) = exporter.get_finished_spans()
    assert (span.attributes or {})["network.peer.address"] == "::1"
    assert (span.attributes or {})["network.peer.port"] == 38434


def test_a_method_name_that_is_not_pkg_service_method(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    end_span(telemetry.server_span("/oddity", None, Context()), grpc.StatusCode.UNIMPLEMENTED)
    (span,) = exporter.get_finished_spans()
    assert span.name == "oddity"
    assert dict(span.attributes or {}) == {"rpc.system": "grpc", "rpc.grpc.status_code": 12}


# -- the routing decision ---------------------------------------------------------------------


def test_record_decision_sets_every_lb_attribute(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    _, attempt, _ = call(telemetry)
    record_decision(
        attempt,
        "users",
        "ewma",
        "10.0.0.11:50051",
        candidates=[
            ("10.0.0.11:50051", {"ewma_ms": 3.25, "in_flight": 1}),
            ("10.0.0.12:50051", {"ewma_ms": float("inf"), "in_flight": 0}),
        ],
        skipped=[("10.0.0.13:50051", "ejected"), ("10.0.0.14:50051", "draining")],
        pick_ns=850,
        route="service users.v1.Users",
        hash_key="session-42",
        ring_position=123456,
        fallback="pinned endpoint ejected",
    )
    end_span(attempt, grpc.StatusCode.OK)
    attributes = dict(finished(exporter)["CLIENT"].attributes or {})
    scores = attributes.pop("lb.candidate_scores")
    assert {k: v for k, v in attributes.items() if k.startswith("lb.")} == {
        "lb.attempt": 1,
        "lb.cluster": "users",
        "lb.strategy": "ewma",
        "lb.endpoint": "10.0.0.11:50051",
        "lb.route": "service users.v1.Users",
        "lb.skipped": ("10.0.0.13:50051", "10.0.0.14:50051"),
        "lb.skipped_reasons": ("ejected", "draining"),
        "lb.pick_duration_ns": 850,
        "lb.hash_key": "session-42",
        "lb.ring_position": 123456,
        "lb.fallback": "pinned endpoint ejected",
    }
    assert isinstance(scores, str)
    assert json.loads(scores) == {
        "10.0.0.11:50051": {"ewma_ms": 3.25, "in_flight": 1},
        "10.0.0.12:50051": {"ewma_ms": "inf", "in_flight": 0},  # JSON has no infinity
    }


def test_record_decision_takes_callables_and_omits_what_is_absent(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    _, attempt, _ = call(telemetry)
    record_decision(
        attempt, "users", "swrr", None, candidates=lambda: [], skipped=lambda: [("h:1", "tried")]
    )
    end_span(attempt, grpc.StatusCode.UNAVAILABLE)
    attributes = finished(exporter)["CLIENT"].attributes or {}
    assert {k: v for k, v in attributes.items() if k.startswith("lb.")} == {
        "lb.attempt": 1,
        "lb.cluster": "users",
        "lb.strategy": "swrr",
        "lb.skipped": ("h:1",),
        "lb.skipped_reasons": ("tried",),
    }


# -- statuses ---------------------------------------------------------------------------------

SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE"}
SERVER_ERRORS.add("DATA_LOSS")


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_status_codes_map_to_span_status_per_kind(
    telemetry: Telemetry, exporter: InMemorySpanExporter, code: grpc.StatusCode
) -> None:
    server, attempt, _ = call(telemetry)
    end_span(attempt, code, "backend said so")
    end_span(server, code)
    spans = finished(exporter)
    for span in spans.values():
        assert (span.attributes or {})["rpc.grpc.status_code"] == code.value[0]
    client_status, server_status = spans["CLIENT"].status, spans["SERVER"].status
    if code is grpc.StatusCode.OK:
        assert client_status.status_code is server_status.status_code is StatusCode.UNSET
        return
    # A CLIENT span fails on any code but OK; a SERVER span only on the server's faults.
    assert client_status.status_code is StatusCode.ERROR
    assert client_status.description == "backend said so"
    if code.name in SERVER_ERRORS:
        assert server_status.status_code is StatusCode.ERROR
        assert server_status.description == code.name  # no details given: the code's name
    else:
        assert server_status.status_code is StatusCode.UNSET


# -- propagation ------------------------------------------------------------------------------


def test_inject_replaces_the_clients_trace_context_with_the_attempts(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    client = (
        ("x-user", "u1"),
        ("traceparent", TRACEPARENT),
        ("trace-bin", b"\x00\x01binary"),
        ("tracestate", "vendor=opaque"),
        ("baggage", "tenant=acme"),
        ("x-user", "u2"),
    )
    server, attempt, parent = call(telemetry, client)
    assert baggage.get_baggage("tenant", parent) == "acme"
    outgoing = telemetry.inject(client, with_span(attempt, parent))
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)

    trace_id, attempt_id = ids(finished(exporter)["CLIENT"])
    # Every other key, -bin included, keeps its value and order; the W3C keys come last.
    assert outgoing == (
        ("x-user", "u1"),
        ("trace-bin", b"\x00\x01binary"),
        ("x-user", "u2"),
        ("traceparent", f"00-{TRACE_ID}-{attempt_id}-01"),
        ("tracestate", "vendor=opaque"),
        ("baggage", "tenant=acme"),
    )
    assert trace_id == TRACE_ID


def test_extract_reads_baggage_and_ignores_bytes_values(telemetry: Telemetry) -> None:
    context = telemetry.extract([("baggage", "tenant=acme,tier=gold"), ("traceparent", b"junk")])
    assert baggage.get_all(context) == {"tenant": "acme", "tier": "gold"}
    assert not trace.get_current_span(context).get_span_context().is_valid


def test_a_garbled_traceparent_starts_a_new_trace(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    server, attempt, parent = call(telemetry, [("traceparent", "00-zz-yy-01")])
    outgoing = telemetry.inject([("traceparent", "00-zz-yy-01")], with_span(attempt, parent))
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)
    spans = finished(exporter)
    assert spans["SERVER"].parent is None
    trace_id, attempt_id = ids(spans["CLIENT"])
    ((key, value),) = outgoing
    assert key == "traceparent" and isinstance(value, str)
    # Sampled (bit 0); a trace id the SDK made also sets W3C level 2's random bit (0x02).
    assert value.startswith(f"00-{trace_id}-{attempt_id}-") and int(value[-2:], 16) & 1


# -- sampling ---------------------------------------------------------------------------------


def fail_if_called() -> Candidates:
    raise AssertionError("candidates were computed for a span that does not record")


def test_an_unsampled_parent_makes_spans_that_record_and_compute_nothing(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    unsampled = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-00"
    server, attempt, parent = call(telemetry, [("traceparent", unsampled)])
    assert not server.is_recording() and not attempt.is_recording()
    record_decision(attempt, "users", "ewma", "h:1", candidates=fail_if_called, pick_ns=1)
    outgoing = telemetry.inject([("traceparent", unsampled)], with_span(attempt, parent))
    end_span(attempt, grpc.StatusCode.INTERNAL)
    end_span(server, grpc.StatusCode.INTERNAL)
    assert exporter.get_finished_spans() == ()
    # The decision not to sample travels on: same trace, the attempt's id, flags 00.
    ((key, value),) = outgoing
    assert key == "traceparent"
    assert isinstance(value, str) and value.startswith(f"00-{TRACE_ID}-")
    assert value.endswith("-00") and CLIENT_SPAN_ID not in value


@pytest.mark.parametrize(
    ("sampler", "ratio", "recorded"),
    [
        ("always_off", 1.0, 0),
        ("parentbased_always_off", 1.0, 0),
        ("traceidratio", 0.0, 0),
        ("parentbased_traceidratio", 0.0, 0),
        ("traceidratio", 1.0, 2),
        ("always_on", 0.0, 2),
    ],
)
def test_the_configured_sampler_decides(
    exporter: InMemorySpanExporter, sampler: str, ratio: float, recorded: int
) -> None:
    config = TracingConfig(sampler=sampler, sampler_arg=ratio)
    telemetry = Telemetry.for_testing(exporter, config)
    server, attempt, _ = call(telemetry)
    record_decision(attempt, "c", "swrr", "h:1", candidates=fail_if_called if not recorded else ())
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)
    assert len(exporter.get_finished_spans()) == recorded


def test_parentbased_always_off_follows_a_sampled_parent(exporter: InMemorySpanExporter) -> None:
    telemetry = Telemetry.for_testing(exporter, TracingConfig(sampler="parentbased_always_off"))
    server, attempt, _ = call(telemetry, [("traceparent", TRACEPARENT)])
    end_span(attempt, grpc.StatusCode.OK)
    end_span(server, grpc.StatusCode.OK)
    assert len(exporter.get_finished_spans()) == 2


# -- health checks, disabled, lifecycle -------------------------------------------------------


def test_health_checks_are_traced_only_when_asked(exporter: InMemorySpanExporter) -> None:
    quiet = Telemetry.for_testing(exporter)
    end_span(quiet.health_check_span("10.0.0.11:50051"), grpc.StatusCode.OK)
    assert exporter.get_finished_spans() == ()

    traced = Telemetry.for_testing(exporter, TracingConfig(health_checks=True))
    end_span(traced.health_check_span("10.0.0.11:50051"), grpc.StatusCode.OK)
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind, span.parent) == (
        "grpc.health.v1.Health/Check",
        SpanKind.CLIENT,
        None,
    )
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "grpc.health.v1.Health",
        "rpc.method": "Check",
        "server.address": "10.0.0.11",
        "server.port": 50051,
        "rpc.grpc.status_code": 0,
    }


def test_disabled_telemetry_is_a_passthrough() -> None:
    telemetry = Telemetry(TracingConfig())
    assert not telemetry.enabled and not telemetry.health_checks
    assert repr(telemetry) == "<Telemetry off>"
    metadata = (("traceparent", TRACEPARENT), ("baggage", "a=b"), ("k-bin", b"\x00"))
    parent = telemetry.extract(metadata)
    assert parent == Context()
    server = telemetry.server_span(METHOD, "ipv4:127.0.0.1:1", parent)
    attempt = telemetry.attempt_span(server, METHOD, "h:1")
    assert server is attempt is trace.INVALID_SPAN
    assert telemetry.health_check_span("h:1") is trace.INVALID_SPAN
    record_decision(attempt, "c", "swrr", "h:1", candidates=fail_if_called)
    # The client's trace context reaches the backend as any other metadata does.
    assert telemetry.inject(metadata, with_span(attempt, parent)) == metadata
    assert telemetry.inject(None, parent) == ()
    end_span(attempt, grpc.StatusCode.INTERNAL)
    assert telemetry.force_flush() is True
    telemetry.shutdown()


def test_the_resource_comes_from_the_config_not_the_environment(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    telemetry = Telemetry.for_testing(exporter, TracingConfig(service_name="edge"))
    end_span(telemetry.server_span(METHOD, None, Context()), grpc.StatusCode.OK)
    (span,) = exporter.get_finished_spans()
    attributes = span.resource.attributes
    assert attributes["service.name"] == "edge"
    assert "deployment.environment" not in attributes
    assert attributes["telemetry.sdk.language"] == "python"


def test_built_from_config_with_a_real_exporter() -> None:
    otlp = Telemetry(TracingConfig(endpoint="http://127.0.0.1:4317", service_name="gw"))
    console = Telemetry(TracingConfig(exporter="console", sampler="always_on"))
    try:
        assert otlp.enabled and console.enabled
        assert (
            repr(otlp) == "<Telemetry otlp http://127.0.0.1:4317 parentbased_always_on service=gw>"
        )
        assert repr(console) == "<Telemetry console always_on service=lbgw>"
    finally:
        otlp.shutdown()  # nothing was recorded: nothing to send, no wait
        console.shutdown()
    otlp.shutdown()  # idempotent
    assert otlp.force_flush() is True


def test_spans_after_shutdown_are_dropped(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    telemetry.shutdown()
    end_span(telemetry.server_span(METHOD, None, Context()), grpc.StatusCode.OK)
    assert exporter.get_finished_spans() == ()
