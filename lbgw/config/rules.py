"""The rules that span fields, and the one section whose file shape is not its type's.

A field's own range, choices and rule live on the field (``model.py``).
What needs two fields or more is here, as a check the reader runs once a
section is built: ``check(section, table as written)``, refusing with
``Invalid(expected, got, at=dotted path within the section)``. Routes are
read here too, because a ``[[routes]]`` table names its match by its key
(``service = "pkg.Svc"``) rather than by ``match`` and ``value`` fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from lbgw.config.fields import (
    Invalid,
    Spec,
    is_dotted,
    is_metadata_key,
    is_method_name,
    parse_address,
)
from lbgw.config.model import (
    HASH_STRATEGIES,
    ROUTE_MATCHES,
    WEIGHTED_STRATEGIES,
    AdminConfig,
    ClusterConfig,
    ClusterTlsConfig,
    Config,
    DnsConfig,
    ListenerTlsConfig,
    RouteConfig,
    TracingConfig,
    is_loopback,
)
from lbgw.kernels import MAX_BACKENDS, MAX_TABLE_SIZE

if TYPE_CHECKING:
    from lbgw.config.reader import Reader

__all__ = ["CHECKS", "READERS", "read_routes"]

#: The keys of a [[routes]] table: its match, and RouteConfig's other fields.
_ROUTE_KEYS: Final = (
    *ROUTE_MATCHES,
    *(f.name for f in dataclasses.fields(RouteConfig) if f.name not in ("match", "value")),
)


def check_cluster(cluster: ClusterConfig, table: Mapping[str, Any]) -> None:
    """Endpoints once each; slow start only for weights; what hashing needs of params."""
    check_discovery(cluster, table)
    n = len(cluster.endpoints)
    if n > MAX_BACKENDS:
        raise Invalid(f"at most {MAX_BACKENDS} endpoints", at="endpoints")
    seen: set[str] = set()
    for i, endpoint in enumerate(cluster.endpoints):
        if endpoint.address in seen:
            raise Invalid("each address once in a cluster", endpoint.address, at=f"endpoints[{i}]")
        seen.add(endpoint.address)
    strategy = cluster.strategy
    if cluster.slow_start.window > 0 and strategy not in WEIGHTED_STRATEGIES:
        raise Invalid(
            f"0 for strategy {strategy!r}, which does not pick by weight "
            f"(slow start works with {', '.join(WEIGHTED_STRATEGIES)})",
            cluster.slow_start.window,
            at="slow_start.window",
        )
    if strategy not in HASH_STRATEGIES:
        return
    params = cluster.params
    if params.hash_on == "metadata":
        if not is_metadata_key(params.hash_key):
            raise Invalid(
                'a metadata key such as "x-session-id" (hash_on = "metadata")',
                params.hash_key or None,
                at="params.hash_key",
            )
    elif "hash_key" in table.get("params", {}):
        raise Invalid(f'no hash_key with hash_on = "{params.hash_on}"', at="params.hash_key")
    if strategy == "ring_hash" and params.max_ring_size < n:
        raise Invalid(
            f"at least the number of endpoints ({n}), one point each",
            params.max_ring_size,
            at="params.max_ring_size",
        )
    if strategy == "maglev" and params.table_size < n:  # every endpoint needs a slot
        raise Invalid(
            f"an integer from {max(2, n)} to {MAX_TABLE_SIZE}",
            params.table_size,
            at="params.table_size",
        )


def check_discovery(cluster: ClusterConfig, table: Mapping[str, Any]) -> None:
    """Either a list of endpoints or a ``dns`` table; a port for A records, none for SRV."""
    if not cluster.dns:
        if not cluster.endpoints:
            raise Invalid(
                "a non-empty array of endpoints, or a table [clusters.NAME.dns]", at="endpoints"
            )
        return
    if "endpoints" in table:
        raise Invalid("either endpoints or a dns table, not both", at="endpoints")
    raw = table.get("dns")
    tables = raw if isinstance(raw, list) else [raw or {}]
    for n, dns in enumerate(cluster.dns):
        at = "dns" if not isinstance(raw, list) else f"dns[{n}]"
        if dns.type == "a" and dns.port == 0:
            raise Invalid('a port from 1 to 65535 (type = "a")', at=f"{at}.port")
        if dns.type == "srv" and "port" in tables[n]:
            raise Invalid(
                'no port with type = "srv": the SRV records give the ports', at=f"{at}.port"
            )


def read_dns(
    reader: Reader, value: object, key: str, siblings: Mapping[str, Any]
) -> tuple[DnsConfig, ...]:
    """``[clusters.NAME.dns]`` (one name) or ``[[clusters.NAME.dns]]`` (several, merged)."""
    if value is None:
        return ()
    if isinstance(value, list):
        if not value:
            raise Invalid("a table, or a non-empty array of tables", value)
        return tuple(reader.section(DnsConfig, v, f"{key}[{n}]") for n, v in enumerate(value))
    return (reader.section(DnsConfig, value, key),)


def check_tracing(tracing: TracingConfig, table: Mapping[str, Any]) -> None:
    """The export batch fits in the queue, as BatchSpanProcessor insists.

    The key blamed is the one this source set: the queue size if only it
    was given (an ``OTEL_BSP_MAX_QUEUE_SIZE`` below the file's batch, say).
    """
    queue, batch = tracing.bsp_max_queue_size, tracing.bsp_max_export_batch_size
    if batch <= queue:
        return
    if "bsp_max_queue_size" in table and "bsp_max_export_batch_size" not in table:
        raise Invalid(f"at least the export batch size, {batch}", queue, at="bsp_max_queue_size")
    raise Invalid(f"at most the queue size, {queue}", batch, at="bsp_max_export_batch_size")


def check_admin(admin: AdminConfig, table: Mapping[str, Any]) -> None:
    """A non-loopback admin address only with ``allow_remote = true``."""
    refused = remote_admin_refused(admin)
    if refused is not None:
        raise Invalid(refused, admin.address, at="address")


def remote_admin_refused(admin: AdminConfig) -> str | None:
    """What a non-loopback admin address without ``allow_remote`` should have been, or None."""
    if admin.address is None or admin.allow_remote:
        return None
    host, _ = parse_address(admin.address)
    if is_loopback(host):
        return None
    return (
        "a loopback address such as 127.0.0.1:9901; the admin port can drain the gateway, "
        "so serving it beyond this machine needs [admin] allow_remote = true"
    )


def check_config(config: Config, table: Mapping[str, Any]) -> None:
    """Each route names a cluster that exists, and matches what no other route does."""
    check_client_identity(config)
    names = {c.name for c in config.clusters}
    seen: set[tuple[str, str]] = set()
    for n, route in enumerate(config.routes):
        if route.cluster not in names:
            raise Invalid(
                f"one of the clusters {', '.join(sorted(names))}",
                route.cluster,
                at=f"routes[{n}].cluster",
            )
        if (route.match, route.value) in seen:
            raise Invalid(f"each {route.match} routed once", route.value or True, at=f"routes[{n}]")
        seen.add((route.match, route.value))


def read_routes(
    reader: Reader, value: object, key: str, siblings: Mapping[str, Any]
) -> tuple[RouteConfig, ...]:
    """``[[routes]]``; without it, a lone cluster takes every call."""
    if value is None:
        clusters: tuple[ClusterConfig, ...] = siblings["clusters"]
        if len(clusters) == 1:
            return (RouteConfig("default", "", clusters[0].name),)
        raise Invalid("an array of tables [[routes]] when there are two or more clusters")
    if not isinstance(value, list) or not value:
        raise Invalid("a non-empty array of tables [[routes]]", value)
    return tuple(_route(reader, item, f"{key}[{n}]") for n, item in enumerate(value))


def _route(reader: Reader, item: object, key: str) -> RouteConfig:
    table = reader.table(item, key, _ROUTE_KEYS)
    matches = [m for m in ROUTE_MATCHES if m in table]
    if len(matches) != 1:
        raise reader.fail(key, "exactly one of method, service, package or default = true")
    match = matches[0]
    mkey = f"{key}.{match}"
    text = ""
    if match == "default":
        if table[match] is not True:
            raise reader.fail(mkey, "true", table[match])
    else:
        text = reader.scalar(str, Spec(), table[match], mkey, {})
        if match == "method" and not is_method_name(text):
            raise reader.fail(mkey, "a full method name /package.Service/Method")
        if match != "method" and not is_dotted(text):
            raise reader.fail(mkey, "a dotted name such as pkg.v1.Service", text)
    rest = {k: v for k, v in table.items() if k != match}
    return reader.section(RouteConfig, rest, key, preset={"match": match, "value": text})


# -- TLS (issue 14) ---------------------------------------------------------------------------


def check_listener_tls(tls: ListenerTlsConfig, table: Mapping[str, Any]) -> None:
    """mTLS needs a CA and a required certificate together; identity needs mTLS.

    grpcio's server credentials either require a verified client certificate
    or do not ask for one (``dynamic_ssl_server_credentials``), so a CA
    without ``require_client_cert`` would verify nothing.
    """
    if tls.client_ca_file and not tls.require_client_cert:
        raise Invalid(
            "true with client_ca_file (lbgw cannot ask for an optional client certificate)",
            tls.require_client_cert,
            at="require_client_cert",
        )
    if tls.require_client_cert and not tls.client_ca_file:
        raise Invalid(
            "the CA that client certificates must chain to, with require_client_cert = true",
            at="client_ca_file",
        )
    for key in ("allowed_client_sans", "forward_client_cert"):
        if getattr(tls, key) and not tls.require_client_cert:
            raise Invalid(f"client certificates (client_ca_file) with {key}", at=key)


def check_cluster_tls(tls: ClusterTlsConfig, table: Mapping[str, Any]) -> None:
    """A client certificate comes with its key."""
    if bool(tls.cert_file) != bool(tls.key_file):
        missing = "key_file" if tls.cert_file else "cert_file"
        other = "cert_file" if tls.cert_file else "key_file"
        raise Invalid(f"{missing} as well as {other}, for a client certificate", at=missing)


def check_client_identity(config: Config) -> None:
    """One grpc server serves every listener and a call does not say which one it came in on,
    so the client-identity settings are the same on every listener, and all are mTLS."""
    listeners = config.listeners
    first = listeners[0].tls
    for n, listener in enumerate(listeners):
        tls = listener.tls
        for key in ("allowed_client_sans", "forward_client_cert"):
            mine = getattr(tls, key) if tls is not None else None
            theirs = getattr(first, key) if first is not None else None
            if mine != theirs and (mine or theirs):
                raise Invalid(
                    f"the same {key} on every listener (one server serves them all)",
                    at=f"listeners[{n}].tls.{key}" if tls is not None else f"listeners[{n}].tls",
                )


#: Checks run on a section once it is built, by the section's class.
CHECKS: Final[Mapping[type, tuple[Callable[[Any, Mapping[str, Any]], None], ...]]] = {
    ClusterConfig: (check_cluster,),
    TracingConfig: (check_tracing,),
    AdminConfig: (check_admin,),
    Config: (check_config,),
    ListenerTlsConfig: (check_listener_tls,),
    ClusterTlsConfig: (check_cluster_tls,),
}
#: Fields read by hand: (section class, field) -> read(reader, value or None, key, siblings).
READERS: Final[Mapping[tuple[type, str], Callable[..., Any]]] = {
    (Config, "routes"): read_routes,
    (ClusterConfig, "dns"): read_dns,
}
