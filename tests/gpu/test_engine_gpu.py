"""The engine on a GPU: greedy tokens with the Triton kernels equal those with the torch
references (fp32, synthetic model), over staggered, chunked, batched prompts; the same tokens
with CUDA graphs and overlapped steps as without; and no Triton compile after start-up.

Run on a GPU machine: `python -m pytest tests/gpu/test_engine_gpu.py`.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.loader import load_model

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)


def _params(i: int, new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, ignore_eos=True)


def _run(
    engine: Engine,
    prompts: list[list[int]],
    new_tokens: int,
    params: Callable[[int, int], SamplingParams] = _params,
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_work:
        if pending and steps % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params(i, new_tokens))
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
        engine.check_integrity()
        steps += 1
    return out


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama3.2-1b"])
def test_kernels_give_the_reference_tokens_in_fp32(shape: str) -> None:
    device = torch.device("cuda")
    loaded = load_model(f"synthetic:{shape}", torch.float32, device, seed=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 40000) for _ in range(n)] for n in (1, 7, 40, 129, 300, 700)]
    config = dict(model=f"synthetic:{shape}", device="cuda", dtype="float32", num_blocks=512,
                  max_num_batched_tokens=256, max_num_seqs=16)  # fmt: skip
    with_kernels = _run(Engine(EngineConfig(**config), loaded), prompts, 24)  # type: ignore[arg-type]
    with_refs = _run(Engine(EngineConfig(**config, use_kernels=False), loaded), prompts, 24)  # type: ignore[arg-type]
    assert with_kernels == with_refs


def test_bf16_engine_runs_and_is_deterministic() -> None:
    config = EngineConfig(model="synthetic:llama3.2-1b", device="cuda", dtype="bfloat16",
                          num_blocks=1024, max_num_batched_tokens=512)  # fmt: skip
    loaded = load_model(config.model, torch.bfloat16, torch.device("cuda"), seed=1)
    prompts = [[5 + i] * (10 + 50 * i) for i in range(6)]
    first = _run(Engine(config, loaded), prompts, 16)
    again = _run(Engine(config, loaded), prompts, 16)
    assert first == again and all(len(v) == 16 for v in first.values())


def _mixed_params(i: int, new_tokens: int) -> SamplingParams:
    """Greedy and seeded sampling, different lengths: sequences leave the batch at different
    steps, so graph buckets change and padding rows come and go."""
    if i % 3 == 2:
        return SamplingParams(max_tokens=new_tokens - i, temperature=0.8, top_p=0.9, seed=i,
                              ignore_eos=True)  # fmt: skip
    return SamplingParams(max_tokens=new_tokens - i, ignore_eos=True)


def test_graphs_and_overlap_give_the_eager_tokens() -> None:
    device = torch.device("cuda")
    loaded = load_model("synthetic:llama3.2-1b", torch.float32, device, seed=5)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 40000) for _ in range(rng.randrange(1, 200))] for _ in range(19)]
    config = dict(model="synthetic:llama3.2-1b", device="cuda", dtype="float32", num_blocks=700,
                  max_num_batched_tokens=256, max_num_seqs=12)  # fmt: skip
    fast = Engine(EngineConfig(**config), loaded)  # type: ignore[arg-type]
    assert fast._graphs is not None
    eager = Engine(EngineConfig(**config, cuda_graphs=False, overlap=False), loaded)  # type: ignore[arg-type]
    got = _run(fast, prompts, 40, _mixed_params)
    want = _run(eager, prompts, 40, _mixed_params)
    assert got == want
    assert all(len(got[str(i)]) == 40 - i for i in range(len(prompts)))
    assert fast._graphs.replays > 0
    assert fast.pool.num_free == fast.pool.num_blocks


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_engine_on_a_second_gpu_stepped_from_another_thread() -> None:
    """A decode worker's engine lives on cuda:1 and steps on a thread whose current device is
    cuda:0: kernels, graphs and the token copies must still run on (and wait for) cuda:1."""
    config = dict(model="synthetic:llama3.2-1b", dtype="bfloat16", num_blocks=512,
                  max_num_batched_tokens=256, max_num_seqs=8)  # fmt: skip
    prompts = [[5 + i] * (10 + 37 * i) for i in range(6)]
    loaded = load_model(config["model"], torch.bfloat16, torch.device("cuda:0"), seed=2)  # type: ignore[arg-type]
    want = _run(Engine(EngineConfig(**config, device="cuda:0"), loaded), prompts, 20)  # type: ignore[arg-type]
    result: list[dict[str, list[int]]] = []

    def on_cuda1() -> None:
        assert torch.cuda.current_device() == 0
        loaded1 = load_model(config["model"], torch.bfloat16, torch.device("cuda:1"), seed=2)  # type: ignore[arg-type]
        result.append(_run(Engine(EngineConfig(**config, device="cuda:1"), loaded1), prompts, 20))  # type: ignore[arg-type]

    thread = threading.Thread(target=on_cuda1)
    thread.start()
    thread.join()
    assert result == [want]


# Run in a fresh interpreter: kernels this process compiled in other tests would hide any that the
# engine's start-up misses. Prints the Triton compiles after start-up as JSON.
_COMPILES_AFTER_START = r"""
import json, random
from triton import knobs
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams

compiles = []

def record(*, repr, **_):
    compiles.append(repr)
    return False  # compile as usual

knobs.runtime.jit_cache_hook = record
engine = Engine(EngineConfig(model="synthetic:llama3.2-1b", device="cuda", dtype="bfloat16",
                             num_blocks=512, max_num_batched_tokens=256, max_num_seqs=8))
started = len(compiles)
rng = random.Random(4)
lengths = [1, 5, 16, 17, 33, 64, 100, 300, 700]  # chunked past the 256-token budget
pending = [[rng.randrange(3, 30000) for _ in range(n)] for n in lengths]
steps = 0
while pending or engine.has_work:
    if pending and steps % 3 == 0:  # prompts join running decodes: mixed steps
        for _ in range(1 + steps % 2):  # one or two at once
            if pending:
                engine.add_request(str(len(pending)), pending.pop(), SamplingParams(
                    max_tokens=12, ignore_eos=True))
    engine.step()
    steps += 1
print(json.dumps(compiles[started:]))
"""


def test_serving_compiles_nothing_after_start_up() -> None:
    """The engine's start-up compiles every kernel variant that requests then need: prompts of
    any length, alone or together, chunked, beside running decodes (the first requests of a
    fresh server otherwise wait seconds for the JIT)."""
    done = subprocess.run(
        [sys.executable, "-P", "-c", _COMPILES_AFTER_START],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiles = json.loads(done.stdout.strip().splitlines()[-1])
    assert compiles == [], "\n".join(compiles)
