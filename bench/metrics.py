"""What the Prometheus metrics cost: per call on the call path, and per scrape.

Run ``python bench/metrics.py`` (``--quick`` for a smoke run). It times, in
this process's CPU time (``time.process_time``, so that other processes on a
shared machine matter less), the bookkeeping the proxy does per call when
the admin port is on (``Meter.call`` and ``ClusterMeter.attempt`` with their
clock reads: one attempt, one call), and one scrape (``generate_latest``
over ``GatewayCollector``) of a gateway with 1, 10 and 100 endpoints, each
with a few status codes counted. Best of ``--repeat`` runs, each of
``--number`` loops, minus an empty loop. It prints a table and asserts
nothing; ``bench/proxy.py --configs lbgw,lbgw-metrics`` measures the same
cost within a whole proxied call, and ``bench/callgrind.py --metrics``
counts its instructions.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Sequence
from types import SimpleNamespace

import grpc
from prometheus_client import CollectorRegistry, generate_latest

from lbgw.config import config_from_mapping
from lbgw.metrics import GatewayCollector, Meter
from lbgw.testing import offline_cluster

CODES = (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


def _per_call(number: int, repeat: int) -> float:
    """ns of CPU per call: one attempt and one client call counted, with their clock reads."""
    meter = Meter(["echo"])
    cm = meter.cluster("echo")
    cluster = _gateway(1).clusters["echo"]
    e = cluster.endpoints[0]
    ok = grpc.StatusCode.OK
    clock = time.monotonic_ns

    def call() -> None:
        began = clock()
        start = clock()
        cm.attempt(e, ok, clock() - start)
        meter.call(ok, clock() - began)

    def empty() -> None:
        pass

    t = min(timeit.repeat(call, number=number, repeat=repeat, timer=time.process_time))
    z = min(timeit.repeat(empty, number=number, repeat=repeat, timer=time.process_time))
    return (t - z) / number * 1e9


def _gateway(n: int) -> SimpleNamespace:
    config = config_from_mapping(
        {
            "listeners": [{"address": "127.0.0.1:0"}],
            "clusters": {"echo": {"endpoints": [f"10.0.{i // 250}.{i % 250}:1" for i in range(n)]}},
        }
    )
    cluster = offline_cluster(config.clusters[0])
    meter = Meter(["echo"])
    cm = meter.cluster("echo")
    for e in cluster.endpoints:
        for k, code in enumerate(CODES):
            for _ in range(k + 1):
                cm.attempt(e, code, 1_000_000 * (k + 1))
                meter.call(code, 2_000_000)
    return SimpleNamespace(clusters={"echo": cluster}, meter=meter)


def _per_scrape(n: int, per_endpoint: bool, repeat: int) -> float:
    """µs of CPU per scrape of a gateway with ``n`` endpoints."""
    registry = CollectorRegistry()
    info = {"version": "bench", "implementation": "bench", "event_loop": "bench"}
    registry.register(GatewayCollector(_gateway(n), info, per_endpoint=per_endpoint))
    number = 20
    t = min(
        timeit.repeat(
            lambda: generate_latest(registry), number=number, repeat=repeat, timer=time.process_time
        )
    )
    return t / number * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/metrics.py", description=__doc__.splitlines()[0])
    p.add_argument("--number", type=int, default=200_000, help="loops per run (per call)")
    p.add_argument("--repeat", type=int, default=7, help="runs; the best is shown")
    p.add_argument("--quick", action="store_true", help="smoke run: few loops")
    args = p.parse_args(argv)
    number, repeat = (2_000, 2) if args.quick else (args.number, args.repeat)
    print("# lbgw metrics: CPU time of this process, best of", repeat, "runs")
    print(f"{'what':<52} {'CPU':>12}")
    print("-" * 65)
    per_call = _per_call(number, repeat)
    print(f"{'per call: one attempt and one call counted':<52} {per_call:>9.0f} ns")
    for n in (1, 10, 100):
        for per_endpoint in (False, True):
            what = f"per scrape: {n} endpoint(s)" + (", per endpoint" if per_endpoint else "")
            print(f"{what:<52} {_per_scrape(n, per_endpoint, repeat):>9.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
