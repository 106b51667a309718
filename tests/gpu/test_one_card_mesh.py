"""The mesh on one GPU: `kvmesh up` with a prefill/decode pair (the KV handed off on the card,
by whatever transport shared/handoff/auto.py picks there), and with one aggregated worker.

    python -m pytest tests/gpu/test_one_card_mesh.py      # on a machine with a GPU

For each: 64 concurrent requests of a synthetic fp32 model end with 0 errors and the greedy
tokens of the in-process engine (a divergence is allowed only where the reference's top two
logits nearly tie), every KV block is free afterwards (engines and Redis), no process restarted,
and the processes on the card stayed within the mesh's share of its memory (each sized its KV
cache from its own share: shared/engine/memory.py).
"""

from __future__ import annotations

import asyncio
import random
import signal
from dataclasses import dataclass

import grpc
import pytest
import torch
from meshproc import generate, snapshot, start_mesh, wait_until_idle

from kvmesh.protos import gateway_pb2
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.engine.batch import ForwardBatch
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.kv_cache import blocks_for
from kvmesh.shared.engine.sequence import SamplingParams

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

MODEL = "synthetic:smollm2-135m"
DEVICE = "cuda:0"  # one card, also on a machine with several
REQUESTS = 64
MESH_SHARE = 0.9  # kvmesh up's default share of the card, split among its processes
GIB = 1 << 30


@pytest.fixture(scope="module")
def requests() -> list[gateway_pb2.GenerateRequest]:
    rng = random.Random(26)
    out = []
    for i in range(REQUESTS):
        prompt = [rng.randrange(3, 49152) for _ in range(rng.choice([1, 9, 60, 200, 480]))]
        max_tokens = rng.randint(1, 48)
        out.append(gateway_pb2.GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt,
                                               max_tokens=max_tokens, ignore_eos=True))  # fmt: skip
    return out


@dataclass
class Reference:
    engine: Engine  # idle: its cache serves _margin
    expected: dict[str, list[int]]  # request id -> greedy tokens


@pytest.fixture(scope="module")
def reference(requests: list[gateway_pb2.GenerateRequest]) -> Reference:
    """The in-process engine with the workers' settings, every request in one batch."""
    engine = Engine(EngineConfig(model=MODEL, device=DEVICE, dtype="float32", num_blocks=4096))
    expected: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        params = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
        engine.add_request(r.request_id, list(r.prompt_token_ids), params)
    while engine.has_work:
        for o in engine.step():
            expected[o.request_id].extend(o.new_token_ids)
    torch.cuda.synchronize()
    return Reference(engine, expected)


@torch.inference_mode()
def _margin(engine: Engine, tokens: list[int]) -> float:
    """The engine's top-1 minus top-2 logit after `tokens`, relative to the top-1's size: one
    fresh forward over its (idle) cache's first blocks."""
    n, bs = len(tokens), engine.config.block_size
    dev = engine.device
    positions = torch.arange(n, device=dev)
    batch = ForwardBatch(
        input_ids=torch.tensor(tokens, device=dev), positions=positions, slot_mapping=positions,
        block_table=torch.arange(blocks_for(n, bs), dtype=torch.int32, device=dev)[None],
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        sample_indices=torch.tensor([n - 1], device=dev), max_q_len=n, fresh=True,
    )  # fmt: skip
    top2 = engine.model.forward(batch, engine.kv_cache)[0].float().topk(2).values
    return float((top2[0] - top2[1]) / top2[0].abs().clamp(min=1.0))


@pytest.mark.parametrize("pools", [["--prefill", "1", "--decode", "1"], ["--aggregated", "1"]],
                         ids=["pair", "aggregated"])  # fmt: skip
def test_64_concurrent_requests_on_one_card(
    pools: list[str], requests: list[gateway_pb2.GenerateRequest], reference: Reference
) -> None:
    with RedisServer() as redis:
        mesh, address = start_mesh(redis.url, *pools, "--device", DEVICE, "--model", MODEL,
                                   "--dtype", "float32")  # fmt: skip
        try:
            before = {w["worker_id"] for w in asyncio.run(snapshot(redis.url))["workers"]}

            async def run() -> list:
                return await asyncio.gather(*(generate(address, r, timeout=600) for r in requests))

            results = asyncio.run(run())
            errors = [(r.request_id, res.code, res.details) for r, res in zip(requests, results,
                      strict=True) if res.code != grpc.StatusCode.OK]  # fmt: skip
            assert not errors, errors
            ties = []
            for r, res in zip(requests, results, strict=True):
                want = reference.expected[r.request_id]
                assert (
                    res.usage
                    == (len(r.prompt_token_ids), r.max_tokens)
                    == (len(r.prompt_token_ids), len(res.tokens))
                ), (r.request_id, res.usage)
                if res.tokens != want:
                    at = next(i for i, (a, b) in enumerate(zip(res.tokens, want, strict=True))
                              if a != b)  # fmt: skip
                    margin = _margin(reference.engine, [*r.prompt_token_ids, *want[:at]])
                    assert margin < 1e-4, (r.request_id, at, margin)
                    ties.append((r.request_id, at, margin))
            print(f"{pools}: divergences at near-ties: {ties}")

            states, snap = asyncio.run(wait_until_idle(redis.url, timeout=10))
            assert all(s.integrity_ok for s in states), states
            assert all(s.free_blocks == s.total_blocks and s.reservations == 0 for s in states)
            assert not snap["block_sets"], snap["block_sets"]
            after = {w["worker_id"] for w in snap["workers"]}
            assert after == before, (before, after)  # the same processes: none restarted
            assert not [line for line in mesh.lines if "restarting" in line]

            free, total = torch.cuda.mem_get_info(DEVICE)
            ours = torch.cuda.memory_reserved(DEVICE) + GIB  # this test's engine and context
            print(f"{pools}: the card holds {(total - free) / GIB:.2f} GiB of "
                  f"{total / GIB:.2f} (this test {ours / GIB:.2f})")  # fmt: skip
            assert total - free <= MESH_SHARE * total + ours
        finally:
            assert mesh.stop(signal.SIGINT) == 0, "\n".join(mesh.lines[-40:])
