"""The rules that find a frozen backend, without I/O: keepalive values and passive ejection.

``tests/hostile/test_black_holes.py`` runs the whole thing against a
SIGSTOPped process; these pin the numbers and the decision it relies on.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from lbgw.backends import channel_options
from lbgw.balancer import Balancer
from lbgw.config import ClusterConfig, HealthCheckConfig, Limits, config_from_mapping
from lbgw.endpoints import ClusterHealth, State
from lbgw.keepalive import PING_TIMEOUT, SAFE_TIME_MS, keepalive_options
from lbgw.testing import ManualClock

DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED


def _cluster(**cluster: Any) -> ClusterConfig:
    data = {
        "listeners": [{"address": "127.0.0.1:0"}],
        "clusters": {
            "c": {"endpoints": [{"address": f"127.0.0.1:{5000 + i}"} for i in range(4)], **cluster}
        },
    }
    return config_from_mapping(data, "<test>").clusters[0]


@pytest.mark.parametrize("mode", ["tcp", "none"])
def test_without_grpc_probes_pings_are_never_sooner_than_the_servers_5_minutes(mode: str) -> None:
    options = dict(keepalive_options(HealthCheckConfig(mode=mode)))
    assert options["grpc.keepalive_time_ms"] >= SAFE_TIME_MS == 5 * 60 * 1000
    assert options["grpc.keepalive_permit_without_calls"] == 0


@pytest.mark.parametrize("interval", [0.1, 1.0, 5.0, 30.0, 600.0])
@pytest.mark.parametrize("rpc", ["watch", "check"])
def test_with_grpc_probes_a_probe_is_answered_between_two_pings(interval: float, rpc: str) -> None:
    check = HealthCheckConfig(mode="grpc", rpc=rpc, interval=interval, timeout=1.0)
    options = dict(keepalive_options(check))
    # The longest a healthy backend goes without writing a probe's answer.
    silent_ms = (check.interval * (1 + check.jitter) + check.timeout) * 1000
    assert options["grpc.keepalive_time_ms"] >= silent_ms
    assert options["grpc.keepalive_time_ms"] >= 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options[PING_TIMEOUT] == options["grpc.keepalive_timeout_ms"] == 5_000


def test_the_defaults_end_a_frozen_backends_calls_within_15_s() -> None:
    options = dict(channel_options(_cluster(), Limits()))
    assert options["grpc.keepalive_time_ms"] + options[PING_TIMEOUT] <= 15_000


def test_a_clusters_own_keepalive_wins() -> None:
    cluster = _cluster(channel_options={"grpc.keepalive_time_ms": 600_000})
    options = channel_options(cluster, Limits())
    assert [v for k, v in options if k == "grpc.keepalive_time_ms"] == [600_000]


def _health(consecutive: int = 3) -> ClusterHealth:
    cc = _cluster(outlier_detection={"consecutive_failures": consecutive})
    clock = ManualClock()
    health = ClusterHealth(cc, Balancer(cc), clock=clock.time, call_later=clock.call_later)
    for e in health.endpoints:
        health.check_passed(e)
    return health


def test_deadline_exceeded_without_response_headers_ejects() -> None:
    health = _health()
    e = health.endpoints[0]
    for _ in range(3):
        health.failed(e, DEADLINE, answered=False)
    assert e.state is State.EJECTED


def test_deadline_exceeded_after_response_headers_does_not_eject() -> None:
    health = _health()
    e = health.endpoints[0]
    for _ in range(10):
        health.failed(e, DEADLINE, answered=True)
    assert e.state is State.SERVING
    assert e.failures == 0


def test_an_answered_call_breaks_a_run_of_silent_deadlines() -> None:
    health = _health()
    e = health.endpoints[0]
    health.failed(e, DEADLINE, answered=False)
    health.failed(e, DEADLINE, answered=False)
    health.failed(e, DEADLINE, answered=True)  # it said something: alive
    health.failed(e, DEADLINE, answered=False)
    assert e.state is State.SERVING
