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
import statistics
import sys
import time
from pathlib import Path

import grpc
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import header, table  # noqa: E402
from meshproc import start_mesh  # noqa: E402

from protos import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from shared.engine import Engine, EngineConfig  # noqa: E402
from shared.engine_loop import EngineLoop  # noqa: E402
from shared.redis_server import RedisServer  # noqa: E402
from shared.sequence import SamplingParams  # noqa: E402

MODEL = "synthetic:tiny"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def through_mesh(address: str, prompts: list[list[int]], new_tokens: int, concurrency: int):
    limit = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tpot: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def one(prompt: list[int]) -> None:
            async with limit:
                start = time.perf_counter()
                first = last = 0.0
                count = 0
                request = gateway_pb2.GenerateRequest(
                    prompt_token_ids=prompt, max_tokens=new_tokens, ignore_eos=True
                )
                async for msg in stub.Generate(request):
                    if msg.token_ids:
                        last = time.perf_counter()
                        first = first or last
                        count += len(msg.token_ids)
                ttft.append(first - start)
                tpot.append((last - first) / max(count - 1, 1))

        await asyncio.gather(*(one(p) for p in prompts))
    return ttft, tpot


async def in_process(prompts: list[list[int]], new_tokens: int, concurrency: int):
    loop = EngineLoop(Engine(EngineConfig(model=MODEL)))
    loop.start()
    limit = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    tpot: list[float] = []

    async def one(i: int, prompt: list[int]) -> None:
        async with limit:
            rid = f"r{i}"
            queue = loop.subscribe(rid)
            start = time.perf_counter()
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
            await loop.call(lambda e: e.add_request(rid, prompt, params))
            first = last = 0.0
            count = 0
            while True:
                out = await queue.get()
                last = time.perf_counter()
                first = first or last
                count += len(out.new_token_ids)
                if out.finished:
                    break
            loop.unsubscribe(rid)
            ttft.append(first - start)
            tpot.append((last - first) / max(count - 1, 1))

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    loop.stop()
    return ttft, tpot


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
    prompts = [[(7 * i + j) % 500 + 3 for j in range(args.prompt)] for i in range(args.requests)]
    with RedisServer() as server:
        mesh, address = start_mesh(server.url, "--model", MODEL, "--prefill", "1", "--decode", "1")
        client = redis.from_url(server.url)
        try:
            asyncio.run(through_mesh(address, prompts[:4], args.new_tokens, 4))  # warm-up
            before, start = redis_calls(client), time.perf_counter()
            mesh_ttft, mesh_tpot = asyncio.run(
                through_mesh(address, prompts, args.new_tokens, args.concurrency)
            )
            elapsed = time.perf_counter() - start
            during = redis_calls(client) - before
            idle_before = redis_calls(client)
            time.sleep(elapsed)
            idle = redis_calls(client) - idle_before
        finally:
            mesh.stop()
    base_ttft, base_tpot = asyncio.run(in_process(prompts, args.new_tokens, args.concurrency))
    rows = []
    for name, ours, base in (("TTFT", mesh_ttft, base_ttft), ("TPOT", mesh_tpot, base_tpot)):
        for q in (0.5, 0.99):
            m, b = percentile(ours, q) * 1e3, percentile(base, q) * 1e3
            rows.append((f"{name} p{int(q * 100)}", f"{b:.2f}", f"{m:.2f}", f"{m - b:+.2f}"))
    print(header("mesh overhead vs the single-process engine, loopback, synthetic:tiny"))
    print(f"{args.requests} requests, concurrency {args.concurrency}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; floor for the added latency: 0 ms\n")  # fmt: skip
    print(table(rows, ("metric (ms)", "engine in-process", "mesh", "added")))
    per_request = (during - idle) / args.requests
    print(f"\nRedis round trips per request: {per_request:.1f} "
          f"({during} during the run, {idle} in an idle period as long: heartbeats and reaps)")  # fmt: skip
    print(f"mean TTFT engine {statistics.mean(base_ttft) * 1e3:.2f} ms, mesh "
          f"{statistics.mean(mesh_ttft) * 1e3:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
