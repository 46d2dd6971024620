"""What a reload changes (``reload.plan``) and how DNS discovery is configured.

The plan is decided without I/O: each case is two configs and the parts a
reload must touch. The ``dns`` table's errors are read as a user reads them:
the file, the dotted key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lbgw.config import Config, DnsConfig, config_from_mapping, load_config
from lbgw.exceptions import ConfigError
from lbgw.reload import config_hash, plan


def cfg(
    clusters: dict[str, Any] | None = None,
    listeners: tuple[str, ...] = ("127.0.0.1:0",),
    **extra: Any,
) -> Config:
    clusters = clusters or {"api": {"endpoints": ["h:1", "h:2"]}}
    return config_from_mapping(
        {"listeners": [{"address": a} for a in listeners], "clusters": clusters, **extra},
        source="<test>",
    )


def test_the_same_config_plans_nothing() -> None:
    change = plan(cfg(), cfg())
    assert change.empty and change.summary()["updated"] == []


def test_endpoints_and_weights_alone_update_the_cluster_in_place() -> None:
    new = cfg({"api": {"endpoints": ["h:1", {"address": "h:3", "weight": 5}]}})
    change = plan(cfg(), new)
    assert [c.name for c in change.updated] == ["api"]
    assert not change.rebuilt and not change.listeners and not change.routes


@pytest.mark.parametrize(
    "changed",
    [
        {"strategy": "round_robin"},
        {"health_check": {"interval": 1.0}},
        {"retries": {"max_attempts": 3}},
        {"sticky": {"enabled": True, "secret": "s"}},
        {"outlier_detection": {"consecutive_failures": 2}},
        {"channel_options": {"grpc.keepalive_time_ms": 30000}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_any_other_cluster_change_rebuilds_it(changed: dict[str, Any]) -> None:
    new = cfg({"api": {"endpoints": ["h:1", "h:2"], **changed}})
    change = plan(cfg(), new)
    assert [c.name for c in change.rebuilt] == ["api"] and not change.updated


def test_clusters_added_and_removed_and_routes() -> None:
    old = cfg(
        {"api": {"endpoints": ["h:1"]}, "web": {"endpoints": ["h:2"]}},
        routes=[
            {"service": "a.A", "cluster": "api"},
            {"default": True, "cluster": "web"},
        ],
    )
    new = cfg(
        {"api": {"endpoints": ["h:1"]}, "img": {"endpoints": ["h:3"]}},
        routes=[
            {"service": "a.A", "cluster": "api"},
            {"default": True, "cluster": "img"},
        ],
    )
    change = plan(old, new)
    assert [c.name for c in change.added] == ["img"]
    assert change.removed == ("web",)
    assert change.routes and not change.updated and not change.rebuilt


def test_listeners_limits_workers_and_log() -> None:
    change = plan(cfg(), cfg(listeners=("127.0.0.1:0", "127.0.0.1:1")))
    assert change.listeners and not change.rebuilt
    # New limits: new server options, and new backend channel options for every cluster.
    change = plan(cfg(), cfg(limits={"max_receive_message_bytes": 1024}))
    assert change.listeners and [c.name for c in change.rebuilt] == ["api"]
    change = plan(cfg(), cfg(server={"workers": 2}, log={"level": "debug"}))
    assert change.workers and change.log
    change = plan(cfg(), cfg(server={"grace_period": 1.0}, tracing={"exporter": "console"}))
    assert change.later == ("tracing", "grace_period") and change.empty


def test_config_hash_names_the_bytes() -> None:
    assert config_hash(b"a") == config_hash(b"a") != config_hash(b"b")
    assert len(config_hash(b"a")) == 12


def test_a_dns_table_instead_of_endpoints() -> None:
    config = cfg({"pods": {"dns": {"name": "backends.prod.svc.cluster.local", "port": 50051}}})
    (dns,) = config.cluster("pods").dns
    assert dns == DnsConfig("backends.prod.svc.cluster.local", 50051)
    assert (dns.type, dns.refresh_interval, dns.respect_ttl, dns.nameservers) == (
        "a",
        5.0,
        False,
        (),
    )
    assert config.cluster("pods").endpoints == ()
    two = cfg(
        {
            "pods": {
                "dns": [{"name": "a.test", "port": 1}, {"name": "_g._tcp.b.test", "type": "srv"}]
            }
        }
    )
    assert [d.name for d in two.cluster("pods").dns] == ["a.test", "_g._tcp.b.test"]


def test_a_dns_cluster_changed_is_rebuilt() -> None:
    old = cfg({"pods": {"dns": {"name": "a.test", "port": 1}}})
    new = cfg({"pods": {"dns": {"name": "a.test", "port": 2}}})
    assert [c.name for c in plan(old, new).rebuilt] == ["pods"]


LISTENER = '[[listeners]]\naddress = "127.0.0.1:0"\n'


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        (
            "[clusters.api]\n",
            "clusters.api.endpoints",
            "a non-empty array of endpoints, or a table",
        ),
        (
            '[clusters.api]\nendpoints = ["h:1"]\n[clusters.api.dns]\nname = "a.test"\nport = 1\n',
            "clusters.api.endpoints",
            "either endpoints or a dns table, not both",
        ),
        (
            '[clusters.api.dns]\nname = "a.test"\n',
            "clusters.api.dns.port",
            "a port from 1 to 65535",
        ),
        (
            '[clusters.api.dns]\nname = "a.test"\ntype = "srv"\nport = 5\n',
            "clusters.api.dns.port",
            'no port with type = "srv"',
        ),
        ('[clusters.api.dns]\nname = "a b"\nport = 1\n', "clusters.api.dns.name", "a DNS name"),
        ("[clusters.api.dns]\nport = 1\n", "clusters.api.dns.name", "a DNS name"),
        (
            '[clusters.api.dns]\nname = "a.test"\nport = 1\nnameservers = ["dns.local:53"]\n',
            "clusters.api.dns.nameservers[0]",
            "an IP address and port",
        ),
        (
            '[clusters.api.dns]\nname = "a.test"\nport = 1\nrefresh_interval = 0\n',
            "clusters.api.dns.refresh_interval",
            "a positive number",
        ),
        (
            '[[clusters.api.dns]]\nname = "a.test"\n',
            "clusters.api.dns[0].port",
            "a port from 1 to 65535",
        ),
        (
            '[clusters.api.dns]\nname = "a.test"\nport = 1\nttl = 3\n',
            "clusters.api.dns.ttl",
            "one of the keys",
        ),
    ],
)
def test_dns_errors_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = tmp_path / "lbgw.toml"
    path.write_text(LISTENER + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert f"{path}: {key}: expected {expected}" in str(info.value)
