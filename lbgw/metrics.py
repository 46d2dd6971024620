"""Prometheus metrics: plain counts on the call path, metric families at scrape time.

The call path never calls prometheus_client. The proxy bumps plain ints and
dicts (``Meter``: one per gateway, one ``ClusterMeter`` per cluster, and each
endpoint's ``codes`` and ``busy_ns``); everything else the metrics report,
lbgw keeps already (in-flight counts in the kernels, the retry budget's
counters, endpoint states, check results, ejections). ``GatewayCollector``
turns all of it into metric families when ``/metrics`` is scraped, and
prometheus_client writes the text format. Measured, this costs well under
1% of a proxied call's CPU (``bench/proxy.py --metrics``; bench/README.md).

Conventions (Envoy's and gRPC's): names start with ``lbgw_``; times are in
seconds; a ``cluster`` label; ``grpc_code`` where a status is counted; the
latency histograms use gRPC's buckets (gRFC A66); no per-endpoint labels
unless ``[admin] per_endpoint_metrics = true``.

With ``--workers N`` every worker mirrors its families into prometheus_client's
multiprocess mode once a second (``Mirror``), and the supervisor's admin
port serves their sum (``admin_fleet.py``).

**Adding a metric** is one ``yield`` in ``GatewayCollector.collect`` (a
counter, gauge or histogram family, from a count lbgw keeps; a new count
on the call path is a plain int on an object the call already holds), one
line in ``MULTIPROCESS_MODES`` if it is a gauge, and one row in
docs/admin.md. ``Mirror`` carries it to ``--workers`` without more code.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import grpc

from lbgw.endpoints import State

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from lbgw.cluster import Cluster
    from lbgw.endpoints import Endpoint

__all__ = [
    "LATENCY_BUCKETS",
    "MULTIPROCESS_MODES",
    "ClusterMeter",
    "GatewayCollector",
    "Histogram",
    "Meter",
    "Mirror",
]

#: gRFC A66's latency buckets, in seconds (gRPC's OpenTelemetry metrics use these).
LATENCY_BUCKETS: Final = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004,
    0.005, 0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08,
    0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip
_BOUNDS_NS: Final = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)
_LE: Final = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")

#: How ``--workers`` combines each gauge over the workers (prometheus_client's modes).
MULTIPROCESS_MODES: Final[Mapping[str, str]] = {
    "lbgw_downstream_rq_active": "livesum",
    "lbgw_upstream_rq_active": "livesum",
    # Each worker sees every endpoint: the largest count over the workers.
    "lbgw_endpoints": "livemax",
    "lbgw_outlier_ejections_active": "livemax",
    "lbgw_build_info": "livemax",
    # Every worker loads the same certificates.
    "lbgw_tls_cert_expiry_timestamp_seconds": "livemax",
}


class Histogram:
    """Counts per A66 bucket (not cumulative; the last is +Inf) and the sum, in ns."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS_NS) + 1)
        self.sum_ns = 0

    def __repr__(self) -> str:
        return f"<Histogram count={sum(self.counts)} sum={self.sum_ns / 1e9:.3f}s>"

    def observe(self, ns: int) -> None:
        self.counts[bisect.bisect_left(_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """The cumulative buckets and the sum in seconds, as HistogramMetricFamily takes them."""
        out: list[tuple[str, float]] = []
        total = 0
        for le, n in zip(_LE, self.counts, strict=True):
            total += n
            out.append((le, total))
        return out, self.sum_ns / 1e9


class ClusterMeter:
    """One cluster's counts on the call path: attempts by code, their durations, retries."""

    __slots__ = ("codes", "duration", "retry_success")

    def __init__(self) -> None:
        self.codes: dict[grpc.StatusCode, int] = {}
        self.duration = Histogram()
        self.retry_success = 0  # calls that succeeded on a retry

    def __repr__(self) -> str:
        return f"<ClusterMeter attempts={sum(self.codes.values())} retried_ok={self.retry_success}>"

    def attempt(self, e: Endpoint, code: grpc.StatusCode, ns: int) -> None:
        """One attempt on ``e`` ended with ``code`` after ``ns`` (the proxy, per attempt)."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        codes = e.codes
        codes[code] = codes.get(code, 0) + 1
        e.busy_ns += ns
        self.duration.observe(ns)


class Meter:
    """The gateway's counts on the call path: client calls by code and their durations."""

    __slots__ = ("clusters", "codes", "duration")

    def __init__(self, clusters: Iterable[str] = ()) -> None:
        self.codes: dict[grpc.StatusCode, int] = {}
        self.duration = Histogram()
        self.clusters: dict[str, ClusterMeter] = {name: ClusterMeter() for name in clusters}

    def __repr__(self) -> str:
        return f"<Meter calls={sum(self.codes.values())} clusters={len(self.clusters)}>"

    def cluster(self, name: str) -> ClusterMeter:
        meter = self.clusters.get(name)
        if meter is None:
            meter = self.clusters[name] = ClusterMeter()
        return meter

    def call(self, code: grpc.StatusCode, ns: int) -> None:
        """A client's call ended with ``code`` after ``ns`` (a refused call too)."""
        codes = self.codes
        codes[code] = codes.get(code, 0) + 1
        self.duration.observe(ns)


def _code_counts(codes: Mapping[grpc.StatusCode, int]) -> Iterator[tuple[str, int]]:
    for code, n in sorted(codes.items(), key=lambda item: item[0].value[0]):
        yield code.name, n


class GatewayCollector:
    """lbgw's metric families, read from the gateway when scraped (a prometheus_client collector).

    ``gateway`` is anything with ``clusters`` (name -> ``Cluster``) and
    ``meter``; ``info`` gives ``lbgw_build_info``'s labels. prometheus_client
    is imported only here and in ``Mirror``, so that a gateway without an
    admin port does not load it (some 40 ms at start-up).
    """

    def __init__(
        self, gateway: Any, info: Mapping[str, str], *, per_endpoint: bool = False
    ) -> None:
        self._gateway = gateway
        self._info = dict(info)
        self._per_endpoint = per_endpoint

    def describe(self) -> list[Metric]:
        return []  # unchecked: the families depend on the clusters

    def collect(self) -> Iterator[Metric]:  # noqa: PLR0915 - a few lines per family
        from prometheus_client.core import (  # noqa: PLC0415 - see the class docstring
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        gateway = self._gateway
        meter: Meter = gateway.meter
        clusters: list[Cluster] = list(gateway.clusters.values())
        per_endpoint = self._per_endpoint
        ep = ["endpoint"] if per_endpoint else []

        info = GaugeMetricFamily(
            "lbgw_build_info",
            "lbgw's version, kernel implementation and event loop; always 1",
            labels=list(self._info),
        )
        info.add_metric(list(self._info.values()), 1)
        yield info

        # -- downstream: the clients' calls
        total = CounterMetricFamily(
            "lbgw_downstream_rq", "client calls ended, by status code", labels=["grpc_code"]
        )
        for code, n in _code_counts(meter.codes):
            total.add_metric([code], n)
        yield total
        yield GaugeMetricFamily(
            "lbgw_downstream_rq_active",
            "client calls in flight",
            value=sum(c.budget.active for c in clusters),
        )
        buckets, seconds = meter.duration.cumulative()
        duration = HistogramMetricFamily(
            "lbgw_downstream_rq_duration_seconds",
            "client calls' duration, from the pick to the status, in seconds",
        )
        duration.add_metric([], buckets, seconds)
        yield duration

        # -- upstream: the attempts on the endpoints
        up_total = CounterMetricFamily(
            "lbgw_upstream_rq",
            "attempts on endpoints ended, by cluster and status code",
            labels=["cluster", *ep, "grpc_code"],
        )
        up_active = GaugeMetricFamily(
            "lbgw_upstream_rq_active", "attempts in flight", labels=["cluster", *ep]
        )
        up_duration = HistogramMetricFamily(
            "lbgw_upstream_rq_duration_seconds",
            "attempts' duration on an endpoint, in seconds",
            labels=["cluster"],
        )
        retries = CounterMetricFamily("lbgw_upstream_rq_retry", "retries sent", labels=["cluster"])
        retry_ok = CounterMetricFamily(
            "lbgw_upstream_rq_retry_success", "calls that succeeded on a retry", labels=["cluster"]
        )
        overflow = CounterMetricFamily(
            "lbgw_upstream_rq_retry_overflow",
            "retries the retry budget refused",
            labels=["cluster"],
        )
        endpoints = GaugeMetricFamily(
            "lbgw_endpoints",
            "endpoints by state (drained: taken out by hand)",
            labels=["cluster", "state"],
        )
        checks = CounterMetricFamily(
            "lbgw_health_check", "active health check results", labels=["cluster", "result"]
        )
        ejected = GaugeMetricFamily(
            "lbgw_outlier_ejections_active",
            "endpoints ejected now (outlier detection)",
            labels=["cluster"],
        )
        ejections = CounterMetricFamily(
            "lbgw_outlier_ejections", "outlier ejections since start", labels=["cluster"]
        )
        for c in clusters:
            name = c.name
            cm = meter.cluster(name)
            kernel = c.balancer.kernel
            members = c.endpoints
            if per_endpoint:
                for e in members:
                    for code, n in _code_counts(e.codes):
                        up_total.add_metric([name, e.address, code], n)
                    up_active.add_metric([name, e.address], kernel.in_flight(e.index))
            else:
                for code, n in _code_counts(cm.codes):
                    up_total.add_metric([name, code], n)
                up_active.add_metric([name], sum(kernel.in_flight(e.index) for e in members))
            buckets, seconds = cm.duration.cumulative()
            up_duration.add_metric([name], buckets, seconds)
            retries.add_metric([name], c.budget.sent)
            retry_ok.add_metric([name], cm.retry_success)
            overflow.add_metric([name], c.budget.over_budget)
            states = dict.fromkeys([*(s.value for s in State), "drained"], 0)
            for e in members:
                states["drained" if e.drained else e.state.value] += 1
            for state, n in states.items():
                endpoints.add_metric([name, state], n)
            for result, n in c.health.checks.items():
                checks.add_metric([name, result], n)
            ejected.add_metric([name], sum(e.state is State.EJECTED for e in members))
            ejections.add_metric([name], c.health.ejections)
        yield from (up_total, up_active, up_duration, retries, retry_ok, overflow, endpoints)
        yield from (checks, ejected, ejections, *self._limits(gateway, clusters))
        yield from self._fleet(gateway)

    def _limits(self, gateway: Any, clusters: list[Cluster]) -> Iterator[Metric]:
        """The gateway's cap and the clusters' circuit breakers (issue 15)."""
        from prometheus_client.core import CounterMetricFamily  # noqa: PLC0415

        admission = getattr(gateway, "admission", None)
        if admission is not None:
            yield CounterMetricFamily(
                "lbgw_downstream_rq_overflow",
                "client calls refused by the gateway's cap (max_calls_in_flight)",
                value=admission.refused,
            )
        breakers = CounterMetricFamily(
            "lbgw_circuit_breaker_open",
            "calls and retries a cluster's circuit breaker refused, by limit",
            labels=["cluster", "limit"],
        )
        for c in clusters:
            for limit, n in c.breaker.overflows.items():
                breakers.add_metric([c.name, limit], n)
        yield breakers

    def _fleet(self, gateway: Any) -> Iterator[Metric]:
        """TLS certificates and reloads (issue 14), DNS discovery and config reloads (issue 16)."""
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        tls = getattr(gateway, "tls", None)
        if tls is not None:
            expiry = GaugeMetricFamily(
                "lbgw_tls_cert_expiry_timestamp_seconds",
                "when each certificate in use expires (notAfter), Unix seconds",
                labels=["listener", "cluster"],
            )
            for (kind, name), when in sorted(tls.expiry_timestamps().items()):
                expiry.add_metric([name, ""] if kind == "listener" else ["", name], when)
            yield expiry
            reloads = CounterMetricFamily(
                "lbgw_tls_reload",
                "certificate reloads after their files changed, by result",
                labels=["result"],
            )
            for result, n in sorted(tls.reload_counts().items()):
                reloads.add_metric([result], n)
            yield reloads
        discoveries = getattr(gateway, "discoveries", None)
        if discoveries is not None:
            dns = CounterMetricFamily(
                "lbgw_dns_resolution",
                "DNS discovery's resolutions by result (a failure or an empty answer keeps "
                "the last good set)",
                labels=["cluster", "result"],
            )
            changes = CounterMetricFamily(
                "lbgw_dns_endpoint_changes",
                "endpoint sets DNS discovery applied to a cluster",
                labels=["cluster"],
            )
            for name, d in sorted(discoveries.items()):
                dns.add_metric([name, "ok"], d.resolutions)
                dns.add_metric([name, "failure"], d.failures - d.empty)
                dns.add_metric([name, "empty"], d.empty)
                changes.add_metric([name], d.changes)
            yield dns
            yield changes
        reloader = getattr(gateway, "reloader", None)
        if reloader is not None:  # with --workers, each worker counts the reloads it applied
            config_reloads = CounterMetricFamily(
                "lbgw_config_reload",
                "config reloads (SIGHUP, POST /reload) by result: error, a config refused "
                "or not applied, the old one still running",
                labels=["result"],
            )
            config_reloads.add_metric(["ok"], reloader.reloads)
            config_reloads.add_metric(["error"], reloader.failures)
            yield config_reloads


class Mirror:
    """Copies a collector's families into prometheus_client's multiprocess files (``--workers``).

    Each ``sync()`` adds what each counter and histogram bucket grew by since
    the last one and sets each gauge, so that ``MultiProcessCollector`` on the
    supervisor sums the workers. Needs ``PROMETHEUS_MULTIPROC_DIR`` set before
    prometheus_client is first imported (the supervisor sets it for its
    workers). A histogram's buckets are written through its children's
    ``_buckets`` and ``_sum``: prometheus_client has no public way to add a
    count to a bucket; tests/integration/test_admin_workers.py breaks if that
    changes.
    """

    def __init__(self, collector: GatewayCollector) -> None:
        self._collector = collector
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}
        self._gauges: dict[str, set[tuple[str, ...]]] = {}

    def __repr__(self) -> str:
        return f"<Mirror families={len(self._metrics)} series={len(self._last)}>"

    def _metric(self, family: Metric, labels: list[str]) -> Any:
        from prometheus_client import Counter, Gauge  # noqa: PLC0415 - after the env is set
        from prometheus_client import Histogram as PromHistogram  # noqa: PLC0415

        metric = self._metrics.get(family.name)
        if metric is None:
            if family.type == "counter":
                metric = Counter(family.name, family.documentation, labels, registry=None)
            elif family.type == "gauge":
                mode = MULTIPROCESS_MODES.get(family.name, "livesum")
                metric = Gauge(
                    family.name,
                    family.documentation,
                    labels,
                    registry=None,
                    multiprocess_mode=mode,  # type: ignore[arg-type]
                )
            else:
                metric = PromHistogram(
                    family.name,
                    family.documentation,
                    labels,
                    registry=None,
                    buckets=LATENCY_BUCKETS,  # prometheus_client adds +Inf
                )
            self._metrics[family.name] = metric
        return metric

    def sync(self) -> None:
        for family in self._collector.collect():
            if family.type == "counter":
                for s in family.samples:
                    if not s.name.endswith("_total"):
                        continue
                    labels = tuple(s.labels.values())
                    metric = self._metric(family, list(s.labels))
                    child = metric.labels(*labels) if labels else metric
                    grew = s.value - self._last.get((s.name, labels), 0.0)
                    if grew > 0:
                        child.inc(grew)
                    self._last[s.name, labels] = s.value
            elif family.type == "gauge":
                seen: set[tuple[str, ...]] = set()
                for s in family.samples:
                    labels = tuple(s.labels.values())
                    metric = self._metric(family, list(s.labels))
                    (metric.labels(*labels) if labels else metric).set(s.value)
                    seen.add(labels)
                for gone in self._gauges.get(family.name, set()) - seen:
                    self._metrics[family.name].labels(*gone).set(0)
                self._gauges[family.name] = seen
            elif family.type == "histogram":
                self._sync_histogram(family)

    def _sync_histogram(self, family: Metric) -> None:
        series: dict[tuple[str, ...], dict[str, float]] = {}
        names: list[str] = []
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            names = list(labels)
            key = tuple(labels.values())
            values = series.setdefault(key, {})
            if s.name.endswith("_bucket"):
                values[s.labels["le"]] = s.value
            elif s.name.endswith("_sum"):
                values["sum"] = s.value
        for key, values in series.items():
            metric = self._metric(family, names)
            child = metric.labels(*key) if key else metric
            previous = 0.0
            for i, le in enumerate(_LE):  # cumulative here, each bucket's own there
                cumulative = values.get(le, 0.0)
                own = cumulative - previous
                previous = cumulative
                last_key = (f"{family.name}_bucket", (*key, le))
                grew = own - self._last.get(last_key, 0.0)
                if grew > 0:
                    child._buckets[i].inc(grew)
                self._last[last_key] = own
            sum_key = (f"{family.name}_sum", key)
            grew = values.get("sum", 0.0) - self._last.get(sum_key, 0.0)
            if grew > 0:
                child._sum.inc(grew)
            self._last[sum_key] = values.get("sum", 0.0)


def build_info(implementation: str, event_loop: str) -> dict[str, str]:
    """``lbgw_build_info``'s labels."""
    from lbgw import __version__  # noqa: PLC0415 - lbgw/__init__ imports the gateway

    return {"version": __version__, "implementation": implementation, "event_loop": event_loop}
