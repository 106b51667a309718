"""Prefix caching on a GPU: with the Triton kernels, CUDA graphs and overlapped steps, prompts
that share a long prefix and conversations that grow turn by turn give the tokens of the same
engine without prefix caching (fp32, synthetic model), and later prompts find cached tokens.

Run on a GPU machine: `python -m pytest tests/gpu/test_prefix_cache_gpu.py`.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.loader import load_model

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

MODEL = "synthetic:llama3.2-1b"
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


def _run(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Each prompt's tokens and cached-token count; a new prompt every other step."""
    tokens: list[list[int]] = [[] for _ in prompts]
    cached = [0] * len(prompts)
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_work:
        if pending and steps % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, PARAMS)
        for o in engine.step():
            tokens[int(o.request_id)] += o.new_token_ids
            cached[int(o.request_id)] = o.num_cached_tokens
        engine.check_integrity()
        steps += 1
    assert engine.pool.num_free == engine.pool.num_blocks
    return tokens, cached


def _merge(*runs: tuple[list[list[int]], list[int]]) -> tuple[list[list[int]], list[int]]:
    return [t for r in runs for t in r[0]], [c for r in runs for c in r[1]]


def test_shared_prefixes_and_growing_conversations_give_the_uncached_tokens() -> None:
    device = torch.device("cuda")
    loaded = load_model(MODEL, torch.float32, device, seed=7)
    config = dict(model=MODEL, device="cuda", dtype="float32", num_blocks=600,
                  max_num_batched_tokens=256, max_num_seqs=12, seed=7)  # fmt: skip
    engines = {
        on: Engine(EngineConfig(**config, prefix_caching=on), loaded)  # type: ignore[arg-type]
        for on in (True, False)
    }
    rng = random.Random(2)
    system = [rng.randrange(3, 40000) for _ in range(700)]
    prompts = [system + [rng.randrange(3, 40000) for _ in range(rng.randrange(1, 60))]
               for _ in range(6)]  # fmt: skip
    # the first computes the system prompt alone; the others find its 43 full blocks
    results = {on: _merge(_run(e, prompts[:1]), _run(e, prompts[1:])) for on, e in engines.items()}
    assert results[True][0] == results[False][0]
    assert results[True][1] == [0] + [700 // 16 * 16] * 5
    assert results[False][1] == [0] * 6
    # turns: each holds the previous prompt, its answer and a new question
    for _ in range(2):
        prompts = [p + out + [rng.randrange(3, 40000) for _ in range(20)]
                   for p, out in zip(prompts, results[True][0], strict=True)]  # fmt: skip
        results = {on: _run(e, prompts) for on, e in engines.items()}
        assert results[True][0] == results[False][0]
        assert all(c >= 700 for c in results[True][1])
