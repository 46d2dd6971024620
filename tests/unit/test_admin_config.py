"""``[admin]``: its keys and the loopback rule; what /config, /explain and the fleet compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbgw.admin import REDACTED, explain_json, explain_table, redact
from lbgw.admin_fleet import merge_clusters
from lbgw.cluster import Cluster
from lbgw.config import AdminConfig, config_from_mapping, load_config
from lbgw.endpoints import State
from lbgw.exceptions import ConfigError
from lbgw.health import HealthService
from lbgw.metrics import LATENCY_BUCKETS, Histogram
from lbgw.testing import offline_cluster

BASE = """
[[listeners]]
address = "127.0.0.1:0"

[clusters.users]
endpoints = ["10.0.0.1:50051"]
"""


def write(tmp_path: Path, admin: str) -> Path:
    path = tmp_path / "lbgw.toml"
    path.write_text(BASE + "\n[admin]\n" + admin, encoding="utf-8")
    return path


def test_admin_is_off_unless_an_address_is_given(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).admin == AdminConfig()
    assert AdminConfig().address is None
    config = load_config(write(tmp_path, 'address = "127.0.0.1:9901"\nper_endpoint_metrics = true'))
    assert config.admin == AdminConfig("127.0.0.1:9901", per_endpoint_metrics=True)


@pytest.mark.parametrize("address", ["127.0.0.1:9901", "127.8.9.10:0", "localhost:9901", "[::1]:9"])
def test_a_loopback_address_needs_no_allow_remote(tmp_path: Path, address: str) -> None:
    assert load_config(write(tmp_path, f'address = "{address}"')).admin.address == address


@pytest.mark.parametrize("address", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901", "admin:80"])
def test_a_non_loopback_address_is_refused_naming_allow_remote(
    tmp_path: Path, address: str
) -> None:
    path = write(tmp_path, f'address = "{address}"')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "admin.address"
    assert f"{path}: admin.address: expected a loopback address" in str(caught.value)
    assert "[admin] allow_remote = true" in str(caught.value)
    allowed = write(tmp_path, f'address = "{address}"\nallow_remote = true')
    assert load_config(allowed).admin.allow_remote


def test_a_bad_admin_address_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, 'address = "9901"'))
    assert caught.value.key == "admin.address"
    assert "host:port" in caught.value.expected


def test_redact_hides_secrets_and_keeps_the_rest() -> None:
    config = {"clusters": [{"sticky": {"secret": "hunter2", "key": "lbgw-sticky"}, "w": 1}]}
    assert redact(config) == {
        "clusters": [{"sticky": {"secret": REDACTED, "key": "lbgw-sticky"}, "w": 1}]
    }
    assert redact({"secret": ""}) == {"secret": ""}  # nothing to hide: shown as unset


def test_histogram_counts_each_value_in_the_a66_bucket_that_holds_it() -> None:
    h = Histogram()
    for ns in (0, 10_000, 10_001, 2_000_000_000, 10**12):
        h.observe(ns)
    buckets, seconds = h.cumulative()
    cumulative = dict(buckets)
    assert cumulative["0.0"] == 1  # le is inclusive, as Prometheus's
    assert cumulative["1e-05"] == 2
    assert cumulative["5e-05"] == 3
    assert cumulative["2.0"] == 4
    assert cumulative["100.0"] == 4 and cumulative["+Inf"] == 5
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert seconds == pytest.approx(1002.000020001)


def test_merged_clusters_add_up_the_workers_views() -> None:
    def view(calls: int, state: str, history: list[float]) -> list[dict[str, object]]:
        endpoint = {
            "address": "10.0.0.1:1",
            "state": state,
            "in_flight": 1,
            "calls_total": calls,
            "calls_per_second": 2.0,
            "calls_1m": calls,
            "ejections": 0,
            "latency_ms": 1.0,
            "history": history,
        }
        return [
            {
                "name": "users",
                "in_flight": 1,
                "serving": True,
                "retries": {"sent": 1, "over_budget": 0},
                "endpoints": [endpoint],
            }
        ]

    merged = merge_clusters(
        [view(3, "serving", [1.0, 2.0]), view(5, "serving", [4.0]), view(1, "ejected", [])]
    )
    (cluster,) = merged
    (endpoint,) = cluster["endpoints"]
    assert cluster["in_flight"] == 3 and cluster["retries"] == {"sent": 3, "over_budget": 0}
    assert endpoint["calls_total"] == 9 and endpoint["in_flight"] == 3
    assert endpoint["state"] == "serving" and endpoint["states"] == {"serving": 2, "ejected": 1}
    assert endpoint["history"] == [1.0, 6.0]  # aligned on the latest second
    assert endpoint["share_1m"] == 1.0


def test_explain_table_marks_the_chosen_candidate() -> None:
    text = explain_table(
        {
            "method": "/a.B/C",
            "route": "default",
            "cluster": "users",
            "strategy": "least_request",
            "kernel": "least_request",
            "candidates": [
                {"address": "10.0.0.1:1", "weight": 1.0, "in_flight": 3},
                {"address": "10.0.0.2:1", "weight": 1.0, "in_flight": 0},
            ],
            "draw": ["10.0.0.1:1", "10.0.0.2:1"],
            "skipped": [{"address": "10.0.0.3:1", "reason": "ejected"}],
            "endpoint": "10.0.0.2:1",
        }
    )
    assert "draw      10.0.0.1:1 vs 10.0.0.2:1" in text
    assert "skipped   10.0.0.3:1: ejected" in text
    chosen = next(line for line in text.splitlines() if line.startswith("10.0.0.2:1"))
    assert chosen.endswith(" *")
    assert text.splitlines()[-1] == "endpoint  10.0.0.2:1"


def _cluster(strategy: str = "swrr") -> Cluster:
    config = config_from_mapping(
        {
            "listeners": [{"address": "127.0.0.1:0"}],
            "clusters": {
                "users": {
                    "endpoints": [{"address": f"10.0.0.{i}:1", "weight": i} for i in (1, 2, 3)],
                    "strategy": strategy,
                }
            },
        }
    )
    return offline_cluster(config.clusters[0])


def test_a_drained_endpoint_leaves_rotation_until_undrained_whatever_its_checks_say() -> None:
    cluster = _cluster()
    e = cluster.endpoints[0]
    cluster.health.set_drained(e, True)
    assert not cluster.balancer.is_eligible(e.index)
    cluster.health.check_passed(e)  # its checks go on, and do not bring it back
    assert e.state is State.SERVING and not cluster.balancer.is_eligible(e.index)
    picks = {cluster.balancer.pick().address for _ in range(12)}
    assert e.address not in picks
    assert cluster.health.skipped() == [(e.address, "drained")]
    cluster.health.set_drained(e, False)
    assert cluster.balancer.is_eligible(e.index)


@pytest.mark.parametrize("strategy", ["swrr", "round_robin", "random", "least_request", "ewma"])
def test_a_dry_run_decision_is_the_next_real_one_and_counts_nothing(strategy: str) -> None:
    cluster = _cluster(strategy)
    kernel = cluster.balancer.kernel
    for _ in range(20):
        dry = cluster.decide((), "ipv4:10.9.9.9:1", "/a.B/C", dry_run=True)
        assert sum(kernel.in_flight(i) for i in range(kernel.n)) == 0
        real = cluster.decide((), "ipv4:10.9.9.9:1", "/a.B/C")
        assert real.endpoint is dry.endpoint
        cluster.balancer.done(real.endpoint, 0, None)


def test_manual_health_fail_is_undone_by_ok_but_not_after_a_drain() -> None:
    service = HealthService()
    service.fail(True)
    assert not service.serving
    service.fail(False)
    assert service.serving
    service.drain()
    service.fail(False)
    assert not service.serving


@pytest.mark.parametrize(
    ("strategy", "params", "draws"),
    [
        ("least_request", {}, False),  # unequal weights: EDF, no draw
        ("ewma", {"choice": "best"}, False),
        ("ewma", {}, True),
        ("swrr", {}, False),
    ],
)
def test_explain_lists_a_draw_only_for_a_power_of_two_choices_pick(
    strategy: str, params: dict[str, str], draws: bool
) -> None:
    config = config_from_mapping(
        {
            "listeners": [{"address": "127.0.0.1:0"}],
            "clusters": {
                "users": {
                    "endpoints": [{"address": f"10.0.0.{i}:1", "weight": i} for i in (1, 2)],
                    "strategy": strategy,
                    "params": params,
                }
            },
        }
    )
    cluster = offline_cluster(config.clusters[0])
    decision = cluster.decide((), "ipv4:10.9.9.9:1", "/a.B/C", dry_run=True)
    data = explain_json("/a.B/C", "default", cluster, decision)
    assert (data["draw"] is not None) is draws
    if draws:
        assert data["endpoint"] in data["draw"]
