"""DNS resolver benchmark: the CPU one resolution costs, dnspython's asyncio resolver vs aiodns.

Run ``python bench/resolvers.py`` (``--quick``: a smoke run). It starts a dnsmasq
on a free loopback port (as the discovery tests do) answering a name with
``--addresses`` A records, then, in one event loop, resolves that name
``--queries`` times in a row with each library, interleaved run by run, and
prints the median CPU time (process time, so the server's is not counted)
and wall time per resolution. aiodns is optional (``pip install aiodns``);
without it only dnspython is measured. dnspython is what lbgw uses
(``lbgw/discovery.py`` says why); this shows what the choice costs.
It asserts no figure (STYLE.md, "Habits").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dns.asyncresolver
import dns.nameserver

from tests.integration.dnsmasq import dnsmasq

NAME = "backends.bench"


async def with_dnspython(port: int, queries: int) -> tuple[float, float]:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    resolver.cache = None
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(queries):
        await resolver.resolve(NAME, "A", search=False)
    return time.process_time() - cpu, time.perf_counter() - wall


async def with_aiodns(port: int, queries: int) -> tuple[float, float] | None:
    try:
        import aiodns  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
    except ImportError:
        return None
    resolver: Any = aiodns.DNSResolver(nameservers=[f"127.0.0.1:{port}"])
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(queries):
        await resolver.query_dns(NAME, "A")
    result = time.process_time() - cpu, time.perf_counter() - wall
    resolver.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--addresses", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.runs = 100, 1
    rows: dict[str, list[tuple[float, float]]] = {"dnspython": [], "aiodns": []}
    with tempfile.TemporaryDirectory() as tmp, dnsmasq(Path(tmp)) as server:
        server.write([(f"127.0.1.{n + 1}", NAME) for n in range(args.addresses)])
        server.wait_answering()
        for _ in range(args.runs):
            rows["dnspython"].append(asyncio.run(with_dnspython(server.port, args.queries)))
            found = asyncio.run(with_aiodns(server.port, args.queries))
            if found is not None:
                rows["aiodns"].append(found)
    print(f"{args.queries} resolutions of {args.addresses} A records, median of {args.runs} runs")
    print(f"{'library':<10} {'CPU µs/query':>13} {'wall µs/query':>14}")
    for name, runs in rows.items():
        if not runs:
            print(f"{name:<10} {'not installed':>13}")
            continue
        cpu = statistics.median(c for c, _ in runs) / args.queries * 1e6
        wall = statistics.median(w for _, w in runs) / args.queries * 1e6
        print(f"{name:<10} {cpu:>13.1f} {wall:>14.1f}")


if __name__ == "__main__":
    main()
