"""The deciders of issue 15: circuit breakers (Envoy's thresholds) and the gateway's cap."""

from __future__ import annotations

import grpc

from lbgw.admission import FLOW_CONTROL, Admission, listener_options
from lbgw.backends import channel_options
from lbgw.breakers import CircuitBreaker
from lbgw.config import CircuitBreakerConfig, ClusterConfig, EndpointConfig, Limits


def test_the_defaults_are_envoys() -> None:
    config = CircuitBreakerConfig()
    assert (config.max_requests, config.max_pending_requests, config.max_retries) == (1024, 1024, 3)


def test_max_requests_refuses_past_the_limit_and_counts_it() -> None:
    breaker = CircuitBreaker("users", CircuitBreakerConfig(max_requests=2))
    assert breaker.start_request() is None
    assert breaker.start_request() is None
    refused = breaker.start_request()
    assert refused is not None
    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert str(refused) == "lbgw: cluster 'users' circuit breaker open: max_requests 2"
    assert breaker.requests == 2
    assert breaker.overflows == {"max_requests": 1, "max_pending_requests": 0, "max_retries": 0}
    breaker.end_request()
    assert breaker.start_request() is None
    assert "requests 2/2" in repr(breaker)


def test_max_pending_requests_and_max_retries() -> None:
    breaker = CircuitBreaker("users", CircuitBreakerConfig(max_pending_requests=1, max_retries=1))
    assert breaker.start_pending() is None
    refused = breaker.start_pending()
    assert refused is not None
    assert str(refused) == "lbgw: cluster 'users' circuit breaker open: max_pending_requests 1"
    breaker.end_pending()
    assert breaker.start_pending() is None
    assert breaker.start_retry() is True
    assert breaker.start_retry() is False
    breaker.end_retry()
    assert breaker.start_retry() is True
    assert breaker.overflows == {"max_requests": 0, "max_pending_requests": 1, "max_retries": 1}


def test_the_gateway_cap_refuses_with_resource_exhausted_naming_the_limit() -> None:
    admission = Admission(1)
    assert admission.admit() is None
    refused = admission.admit()
    assert refused is not None
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(refused) == "lbgw: gateway overloaded: max_calls_in_flight 1"
    admission.release()
    assert admission.admit() is None
    assert (admission.in_flight, admission.refused) == (1, 1)


def test_listener_options_follow_the_limits() -> None:
    options = dict(listener_options(Limits()))
    assert options["grpc.max_concurrent_streams"] == 1000
    assert options["grpc.max_connection_idle_ms"] == 75_000  # NGINX's keepalive_timeout
    assert options["grpc.max_connection_age_ms"] == 3_600_000  # NGINX's keepalive_time
    assert "grpc.max_connection_age_grace_ms" not in options  # gRPC's: no limit
    # The core queue never refuses (as CANCELLED) a call lbgw would answer itself.
    assert options["grpc.server.max_pending_requests"] >= 2 * Limits().max_calls_in_flight
    assert set(FLOW_CONTROL) <= set(options.items())
    off = dict(listener_options(Limits(max_connection_idle=0, max_connection_age=0)))
    assert "grpc.max_connection_idle_ms" not in off
    assert "grpc.max_connection_age_ms" not in off
    grace = dict(listener_options(Limits(max_connection_age_grace=2.5)))
    assert grace["grpc.max_connection_age_grace_ms"] == 2500


def test_backend_channels_get_fixed_windows_unless_the_cluster_says_otherwise() -> None:
    endpoints = (EndpointConfig("127.0.0.1:1"),)
    options = dict(channel_options(ClusterConfig("c", endpoints), Limits()))
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == 65535
    own = ClusterConfig("c", endpoints, channel_options=(("grpc.http2.bdp_probe", 1),))
    assert dict(channel_options(own, Limits()))["grpc.http2.bdp_probe"] == 1
