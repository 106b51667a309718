"""`kvmesh bench`: a load generator for a running mesh (--addr) or an in-process engine (--local).

Sends `requests` prompts of `prompt_tokens` token ids with `concurrency` in flight, each asking
for exactly `new_tokens` tokens (ignore_eos), and reports TTFT, TPOT and end-to-end latency
(p50/p99) and throughput. Token-id prompts keep the workload identical for any model.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc
from kvmesh.services.rpc import auth_metadata
from kvmesh.services.tls import PLAINTEXT, TlsFiles, aio_channel
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.loop import EngineLoop
from kvmesh.shared.engine.sequence import SamplingParams


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    concurrency: int = 16
    prompt_tokens: int = 128
    new_tokens: int = 64
    vocab: int = 500  # prompt ids are drawn from [3, vocab)
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [[rng.randrange(3, self.vocab) for _ in range(self.prompt_tokens)]
                for _ in range(self.requests)]  # fmt: skip


@dataclass
class Report:
    ttft: list[float] = field(default_factory=list)  # seconds
    tpot: list[float] = field(default_factory=list)  # seconds per output token after the first
    e2e: list[float] = field(default_factory=list)  # seconds
    output_tokens: int = 0
    seconds: float = 0.0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        self.failures[f"{error.code().name}: {error.details()}"] += 1

    def record(self, start: float, first: float, end: float, tokens: int) -> None:
        self.ttft.append(first - start)
        self.tpot.append((end - first) / max(tokens - 1, 1))
        self.e2e.append(end - start)
        self.output_tokens += tokens

    def rows(self) -> list[tuple[str, str, str]]:
        out = []
        for name, values in (("TTFT ms", self.ttft), ("TPOT ms", self.tpot), ("E2E ms", self.e2e)):
            out.append((name, f"{percentile(values, 0.5) * 1e3:.2f}",
                        f"{percentile(values, 0.99) * 1e3:.2f}"))  # fmt: skip
        return out

    def render(self, title: str) -> str:
        lines = [title, f"{'metric':10} {'p50':>10} {'p99':>10}"]
        lines += [f"{n:10} {a:>10} {b:>10}" for n, a, b in self.rows()]
        lines.append(
            f"throughput {self.output_tokens / self.seconds:.1f} output tok/s, "
            f"{len(self.e2e) / self.seconds:.2f} req/s over {self.seconds:.1f} s; "
            f"{self.errors} errors"
        )
        lines += [f"  {n} x {why}" for why, n in self.failures.most_common(3)]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# One request: (index, prompt, report) -> None
Runner = Callable[[int, list[int], Report], Awaitable[None]]


async def _drive(workload: Workload, run_one: Runner, progress: bool) -> Report:
    report = Report()
    limit = asyncio.Semaphore(workload.concurrency)
    bar = tqdm(total=workload.requests, unit="req", disable=not progress)

    async def one(i: int, prompt: list[int]) -> None:
        async with limit:
            await run_one(i, prompt, report)
            bar.update()

    start = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(workload.prompts())))
    report.seconds = time.perf_counter() - start
    bar.close()
    return report


async def bench_mesh(
    address: str, workload: Workload, progress: bool = True, tls: TlsFiles = PLAINTEXT,
    api_key: str = "",
) -> Report:  # fmt: skip
    metadata = auth_metadata(api_key)
    async with aio_channel(address, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def run_one(i: int, prompt: list[int], report: Report) -> None:
            request = gateway_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=workload.new_tokens, ignore_eos=True
            )
            start = time.perf_counter()
            first, tokens = 0.0, 0
            try:
                async for msg in stub.Generate(request, metadata=metadata):
                    if msg.token_ids:
                        first = first or time.perf_counter()
                        tokens += len(msg.token_ids)
            except grpc.aio.AioRpcError as e:
                report.fail(e)
                return
            report.record(start, first, time.perf_counter(), tokens)

        return await _drive(workload, run_one, progress)


async def bench_engine(
    config: EngineConfig, workload: Workload, progress: bool = True, warmup: Workload | None = None
) -> Report:
    """The workload against an in-process engine; `warmup` first, unreported (as a client would
    warm a mesh before measuring it)."""
    loop = EngineLoop(Engine(config))
    serial = itertools.count()
    loop.start()
    params = SamplingParams(max_tokens=workload.new_tokens, ignore_eos=True)

    async def run_one(i: int, prompt: list[int], report: Report) -> None:
        rid = f"bench-{next(serial)}"  # warm-up and workload alike: ids never reused
        queue = loop.subscribe(rid)
        start = time.perf_counter()
        await loop.call(lambda e: e.add_request(rid, prompt, params))
        first, tokens = 0.0, 0
        while True:
            out = await queue.get()
            first = first or time.perf_counter()
            tokens += len(out.new_token_ids)
            if out.finished:
                break
        loop.unsubscribe(rid)
        report.record(start, first, time.perf_counter(), tokens)

    try:
        if warmup is not None:
            await _drive(warmup, run_one, progress=False)
        return await _drive(workload, run_one, progress)
    finally:
        loop.stop()
