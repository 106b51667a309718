"""Engine throughput vs HF transformers (same run), and scheduler overhead per step.

    python benchmarks/bench_engine.py [--new-tokens 32]

Rows: greedy decode tokens/s of the engine and of HF `generate` on the default model (fp32) at
batch 1 and 8, their ratio, and the floor: a decode step must read every weight once, so
tokens/s <= batch * copy bandwidth / weight bytes (copy bandwidth counts bytes read + written;
reading the weights is that traffic). At larger batches compute takes over from this bound.
Then the scheduler's Python time per step at batch 64 on a tiny synthetic model.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import copy_bandwidth_gbs, header, table

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.fetch import default_model_path


def prompts(engine: Engine, n: int) -> list[list[int]]:
    assert engine.tokenizer is not None
    return [
        engine.tokenizer.encode(f"Item {i}: the history of computing began with") for i in range(n)
    ]


def engine_tokens_per_s(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(batch):
        engine.add_request(f"w{i}", p, SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_work:  # warm-up
        engine.step()
    for i, p in enumerate(batch):
        engine.add_request(f"b{i}", p, params)
    engine.step()  # prefill, not counted
    start, count = time.perf_counter(), 0
    while engine.has_work:
        count += len(engine.step())
    return count / (time.perf_counter() - start)


def hf_tokens_per_s(batch: list[list[int]], new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    width = max(map(len, batch))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=2, min_new_tokens=new_tokens)
    model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kwargs)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    decode = time.perf_counter() - t - prefill
    return len(batch) * (new_tokens - 1) / decode


def scheduler_overhead(batch: int = 64, steps: int = 200) -> tuple[float, float]:
    """(us per engine step, us of it in schedule()) at `batch` running decodes, tiny model."""
    engine = Engine(EngineConfig(model="synthetic:tiny", max_num_seqs=batch, num_blocks=4096,
                                 max_num_batched_tokens=4096))  # fmt: skip
    for i in range(batch):
        engine.add_request(
            str(i), list(range(3, 40)), SamplingParams(max_tokens=steps + 10, ignore_eos=True)
        )
    engine.step()
    sched = 0.0
    original = engine.scheduler.schedule

    def timed():  # type: ignore[no-untyped-def]
        nonlocal sched
        t = time.perf_counter()
        plan = original()
        sched += time.perf_counter() - t
        return plan

    engine.scheduler.schedule = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - start
    return total / steps * 1e6, sched / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    engine = Engine(EngineConfig(max_num_batched_tokens=1024))
    weight_bytes = sum(
        t.numel() * t.element_size()
        for t in [engine.model.weights.embed, engine.model.weights.norm]
        + [w for layer in engine.model.weights.layers for w in vars(layer).values()]
        if t is not None
    )
    bandwidth = copy_bandwidth_gbs()
    rows = []
    for batch_size in (1, 8):
        batch = prompts(engine, batch_size)
        ours = engine_tokens_per_s(engine, batch, args.new_tokens)
        hf = hf_tokens_per_s(batch, args.new_tokens)
        floor = batch_size * bandwidth * 1e9 / weight_bytes
        rows.append(
            (str(batch_size), f"{ours:.1f}", f"{hf:.1f}", f"{ours / hf:.2f}x", f"{floor:.0f}")
        )
    print(header("engine vs HF transformers, default model, fp32, greedy decode"))
    print(f"copy bandwidth {bandwidth:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB\n")
    print(table(rows, ("batch", "kvmesh tok/s", "HF tok/s", "ratio", "floor tok/s")))
    step_us, sched_us = scheduler_overhead()
    print("\nscheduler at batch 64, synthetic tiny model")
    print(table([(f"{step_us:.0f}", f"{sched_us:.0f}")], ("engine step us", "schedule() us")))


if __name__ == "__main__":
    main()
