"""Throughput cost of tracing on loopback: the same workload through a mesh with tracing off and
with every process exporting spans to a real OTLP collector, measured in the same run.

    python benchmarks/bench_tracing.py [--requests 64 --concurrency 16 --rounds 3]

Rounds alternate between the two meshes, in alternating order, to spread machine noise; the
table gives output tokens/s of each (best round) and the cost. The floor for the cost is 0%.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from bench_mesh import MODEL  # noqa: E402
from common import header, table  # noqa: E402
from meshproc import start_mesh  # noqa: E402
from otlp_collector import OtlpCollector  # noqa: E402

from kvmesh.services.bench import Workload, bench_mesh  # noqa: E402
from kvmesh.shared.control.redis_server import RedisServer  # noqa: E402


def tokens_per_s(address: str, workload: Workload) -> float:
    report = asyncio.run(bench_mesh(address, workload, progress=False))
    return report.output_tokens / report.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workload = Workload(args.requests, args.concurrency, 48, args.new_tokens)
    with OtlpCollector() as collector, RedisServer() as plain_redis, RedisServer() as traced_redis:
        traced_env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        plain, plain_addr = start_mesh(plain_redis.url, "--model", MODEL)
        traced, traced_addr = start_mesh(traced_redis.url, "--model", MODEL, extra_env=traced_env)
        try:
            results: dict[str, list[float]] = {"off": [], "on": []}
            for address in (plain_addr, traced_addr):  # warm-up
                tokens_per_s(address, Workload(8, 8, 48, args.new_tokens))
            order = [("off", plain_addr), ("on", traced_addr)]
            for _ in range(args.rounds):
                order.reverse()  # neither mesh always runs first
                for name, address in order:
                    results[name].append(tokens_per_s(address, workload))
            spans = len(collector.spans())
        finally:
            plain.stop()
            traced.stop()
    off, on = max(results["off"]), max(results["on"])
    print(header("tracing cost, loopback mesh, synthetic:tiny"))
    print(f"{args.requests} requests x {args.new_tokens} tokens, concurrency {args.concurrency}, "
          f"best of {args.rounds} alternating rounds; {spans} spans exported\n")  # fmt: skip
    rows = [
        ("tracing off", f"{off:.0f}", "-"),
        ("tracing on (OTLP)", f"{on:.0f}", f"{(1 - on / off) * 100:.1f}%"),
    ]
    print(table(rows, ("mesh", "output tok/s", "cost")))


if __name__ == "__main__":
    main()
