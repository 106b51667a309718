"""What the mesh costs over the single-process engine, on loopback with a tiny synthetic model.

    python benchmarks/bench_mesh.py [--requests 48 --concurrency 8 --prompt 64 --new-tokens 32]

Runs one workload twice: through `kvmesh up --prefill 1 --decode 1` (gateway -> Redis-routed
prefill -> socket KV handoff -> decode, all real processes) and through an in-process engine
with the same batching limits (the baseline, measured in the same run). Prints TTFT and TPOT
p50/p99 for both, the difference, and the Redis round trips per request (commands counted by the
server during the run, minus the periodic heartbeats and reaps counted over an idle period of
the same length). Each round trip is one atomic Lua script.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from common import header, table  # noqa: E402
from meshproc import start_mesh  # noqa: E402

from kvmesh.services.bench import Workload, bench_engine, bench_mesh  # noqa: E402
from kvmesh.shared.control.redis_server import RedisServer  # noqa: E402
from kvmesh.shared.engine.engine import EngineConfig  # noqa: E402

MODEL = "synthetic:tiny"


def redis_calls(client: redis.Redis) -> int:
    """Round trips clients made: every Ledger operation is one script call (EVALSHA); the
    commands a script runs inside the server are counted by commandstats too, so skip them."""
    stats = client.info("commandstats")
    return sum(int(stats.get(k, {}).get("calls", 0)) for k in ("cmdstat_evalsha", "cmdstat_eval"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    workload = Workload(args.requests, args.concurrency, args.prompt, args.new_tokens)
    with RedisServer() as server:
        mesh, address = start_mesh(server.url, "--model", MODEL, "--prefill", "1", "--decode", "1")
        client = redis.from_url(server.url)
        try:
            asyncio.run(bench_mesh(address, Workload(4, 4, args.prompt, 4), progress=False))
            before, start = redis_calls(client), time.perf_counter()
            ours = asyncio.run(bench_mesh(address, workload, progress=False))
            elapsed = time.perf_counter() - start
            during = redis_calls(client) - before
            idle_before = redis_calls(client)
            time.sleep(elapsed)
            idle = redis_calls(client) - idle_before
        finally:
            mesh.stop()
    base = asyncio.run(bench_engine(EngineConfig(model=MODEL), workload, progress=False))
    rows = []
    for (name, b50, b99), (_, m50, m99) in zip(base.rows()[:2], ours.rows()[:2], strict=True):
        for q, b, m in (("p50", b50, m50), ("p99", b99, m99)):
            rows.append((f"{name.split()[0]} {q}", b, m, f"{float(m) - float(b):+.2f}"))
    print(header("mesh overhead vs the single-process engine, loopback, synthetic:tiny"))
    print(f"{args.requests} requests, concurrency {args.concurrency}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; floor for the added latency: 0 ms\n")  # fmt: skip
    print(table(rows, ("metric (ms)", "engine in-process", "mesh", "added")))
    per_request = (during - idle) / args.requests
    print(f"\nRedis round trips per request: {per_request:.1f} ({during} during the run, "
          f"{idle} in an idle period as long: heartbeats and reaps)")  # fmt: skip


if __name__ == "__main__":
    main()
