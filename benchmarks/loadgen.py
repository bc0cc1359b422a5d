"""A load generator for when ``wrk`` is missing: asyncio + httpx, in its own process.

``python -m benchmarks.loadgen URL --connections 64 --duration 10 [--method POST]`` prints one
JSON object: ``requests``, ``rps``, ``p50_ms``, ``p99_ms``, ``errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx


async def _worker(
    client: httpx.AsyncClient, method: str, url: str, deadline: float, latencies: list[float]
) -> int:
    errors = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        try:
            response = await client.request(method, url)
            if response.status_code >= 400:
                errors += 1
        except httpx.HTTPError:
            errors += 1
        latencies.append(time.perf_counter() - started)
    return errors


async def run(url: str, method: str, connections: int, duration: float) -> dict[str, float]:
    """Keep ``connections`` requests in flight for ``duration`` seconds; the figures."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        deadline = started + duration
        errors = await asyncio.gather(
            *(_worker(client, method, url, deadline, latencies) for _ in range(connections))
        )
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": cuts[49] * 1000,
        "p99_ms": cuts[98] * 1000,
        "errors": sum(errors),
    }


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.url, args.method, args.connections, args.duration))))


if __name__ == "__main__":
    main()
