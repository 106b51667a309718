"""Faults under load: what each costs the streams running through it.

    python benchmarks/bench_faults.py [--model synthetic:tiny --streams 32 --new-tokens 128]

For each fault, a fresh `kvmesh up --prefill 1 --decode 2` (real processes, a real Redis
server, loopback) serves `streams` concurrent greedy requests; once a decode worker is
streaming, the fault is injected:
  * kill -9 of that decode worker (the gateway resumes its streams on the other one);
  * SIGSTOP of it for 15 s (its keepalive pings go unanswered; then SIGCONT);
  * kill -9 of Redis and an empty restart on the same port 1 s later.
The baseline is the same load with no fault, in the same run. Prints, per fault: requests that
failed (must be 0), streams resumed on another worker, and the worst gap between two
consecutive messages of a stream (p50 and p99 over the streams, and the largest), against the
baseline's; the floor of a gap is one decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from common import header, table  # noqa: E402
from meshproc import inspect_all, start_mesh  # noqa: E402

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from kvmesh.services.bench import percentile  # noqa: E402
from kvmesh.shared.control.redis_server import RedisServer  # noqa: E402


@dataclass
class Stream:
    ok: bool = False
    tokens: int = 0
    worst_gap_s: float = 0.0
    resumes: int = 0
    error: str = ""


@dataclass
class Run:
    streams: list[Stream] = field(default_factory=list)


async def one_stream(address: str, i: int, new_tokens: int) -> Stream:
    out = Stream()
    request = gateway_pb2.GenerateRequest(
        request_id=f"fault-{i}", prompt_token_ids=[(7 * i + j) % 400 + 3 for j in range(48)],
        max_tokens=new_tokens, ignore_eos=True,
    )  # fmt: skip
    async with grpc.aio.insecure_channel(address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=300)
        last = time.perf_counter()
        try:
            async for msg in call:
                now = time.perf_counter()
                if out.tokens:  # from the first token on: TTFT is not a gap
                    out.worst_gap_s = max(out.worst_gap_s, now - last)
                last, out.tokens = now, out.tokens + len(msg.token_ids)
            trailers = dict(await call.trailing_metadata() or ())
            out.resumes = int(trailers.get("kvmesh-resumes", "0"))
            out.ok = out.tokens == new_tokens
        except grpc.aio.AioRpcError as e:
            out.error = f"{e.code().name}: {e.details()}"
    return out


Fault = Callable[[RedisServer, str], Awaitable[None]]


async def no_fault(server: RedisServer, victim: str) -> None:
    return None


async def kill_decode(server: RedisServer, victim: str) -> None:
    os.kill(int(victim.split("-")[-2]), signal.SIGKILL)


async def stop_decode(server: RedisServer, victim: str) -> None:
    pid = int(victim.split("-")[-2])
    os.kill(pid, signal.SIGSTOP)
    await asyncio.sleep(15)
    os.kill(pid, signal.SIGCONT)


async def restart_redis(server: RedisServer, victim: str) -> None:
    os.kill(server.pid or 0, signal.SIGKILL)
    server.stop()
    await asyncio.sleep(1.0)
    server.start()


FAULTS: dict[str, Fault] = {
    "none (baseline)": no_fault,
    "kill -9 of a decode worker": kill_decode,
    "SIGSTOP of a decode worker, 15 s": stop_decode,
    "Redis kill -9, empty restart": restart_redis,
}


async def under_fault(address: str, server: RedisServer, fault: Fault, args) -> list[Stream]:
    tasks = [asyncio.create_task(one_stream(address, i, args.new_tokens))
             for i in range(args.streams)]  # fmt: skip
    victim = None
    while victim is None:  # a decode worker that streams
        await asyncio.sleep(0.1)
        busy = [s for s in await inspect_all(server.url)
                if s.worker_id.startswith("decode") and s.running > 0]  # fmt: skip
        victim = busy[0].worker_id if busy else None
    injected = asyncio.create_task(fault(server, victim))
    streams = await asyncio.gather(*tasks)
    await injected
    return list(streams)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="synthetic:tiny")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for name, fault in FAULTS.items():
        server = RedisServer().start()
        mesh, address = start_mesh(server.url, "--model", args.model, "--prefill", "1",
                                   "--decode", "2")  # fmt: skip
        try:
            streams = asyncio.run(under_fault(address, server, fault, args))
        finally:
            mesh.stop()
            server.stop()
        gaps = [s.worst_gap_s * 1e3 for s in streams if s.ok]
        failed = [s.error for s in streams if not s.ok]
        rows.append((name, f"{len(failed)} of {len(streams)}",
                     str(sum(1 for s in streams if s.resumes)),
                     f"{percentile(gaps, 0.5):.0f}", f"{percentile(gaps, 0.99):.0f}",
                     f"{max(gaps, default=float('nan')):.0f}"))  # fmt: skip
        print(rows[-1], failed[:3], flush=True)
    print(header(f"Faults under load: {args.model}, {args.streams} streams of "
                 f"{args.new_tokens} tokens, kvmesh up --prefill 1 --decode 2"))  # fmt: skip
    head = ("fault", "requests failed", "streams resumed", "worst gap p50 ms",
            "worst gap p99 ms", "worst gap max ms")  # fmt: skip
    print(table(rows, head))


if __name__ == "__main__":
    main()
