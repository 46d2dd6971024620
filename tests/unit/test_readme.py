"""The README's configuration example is a valid config, so the docs stay true."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from lbgw.config import MethodKind, load_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_config_example_is_valid(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    match = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no ```toml block under ## Configuration"
    path = tmp_path / "lbgw.toml"
    path.write_text(match.group(1), encoding="utf-8")

    config = load_config(path)

    users, orders = config.clusters
    assert (users.name, users.strategy, len(users.endpoints)) == ("users", "ewma", 3)
    assert users.endpoints[0].weight == 3 and users.reflection
    assert users.channel_options == (("grpc.keepalive_time_ms", 30000),)
    assert (orders.strategy, orders.params.hash_key, orders.params.fallback) == (
        "maglev",
        "x-session-id",
        "swrr",
    )
    assert orders.sticky.key == "lbgw-sticky" and not orders.sticky.enabled
    assert users.health_check.mode == "grpc" and users.outlier_detection.consecutive_failures == 5
    assert config.routes[0].retry_on == (grpc.StatusCode.UNAVAILABLE,)
    assert config.tracing.service_name == "lbgw"
    assert dict(orders.methods)["/shop.orders.v1.Orders/Watch"] is MethodKind.SERVER_STREAMING
    assert [r.match for r in config.routes] == ["method", "service", "package", "default"]
    assert config.tracing.effective_exporter == "otlp"  # the endpoint turns it on
    assert config.tracing.endpoint_url == "http://localhost:4317"
