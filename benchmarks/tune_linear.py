"""Tune the skinny decode linear (kernels/linear.py) in the regime the model runs it in.

    python benchmarks/tune_linear.py [--model synthetic:llama3-8b] [--buckets 1,2,...,64] [--write]

A decode step runs each projection once per layer, on a new weight each time: the weights stream
from HBM and the kernels run back to back with no host in between (a CUDA graph). The autotuner
times a candidate on one weight in isolation, which misjudges the narrow shapes (RESULTS.md:
its pick for qkv, split-K four ways, took 28.9 us a layer in the model against 22.0 for the
previous config). Here every candidate of every projection and M bucket (split-K ones on any K,
where the autotuner keeps them to long K) runs in a captured
graph over `copies` distinct weights (>= 512 MiB of them, well past the L2), and its time is
the graph's replay time over the calls. The table prints the best candidate beside cuBLAS
(the SiLU-and-mul kernel first, for the gated down projection) timed the same way, and the
copy-bandwidth floor measured in the same run. --write merges the winners into
kernels/linear_tuned.json under this card's name, where `linear` finds them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import copy_bandwidth_gbs, header, table
from triton.runtime.errors import OutOfResources

from kernels.activation import silu_and_mul
from kernels.linear import (
    GATED_MAX_M,
    MAX_M,
    TUNING,
    LinearTuning,
    candidate,
    linear,
    shape_key,
    write_tuned,
)
from shared.models.config import SHAPES
from shared.models.loader import SYNTHETIC_PREFIX

STREAM_BYTES = 512 << 20  # weights a timed graph streams through, at least


def projections(model: str) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, gated) of a model's decode projections."""
    cfg = SHAPES[model.removeprefix(SYNTHETIC_PREFIX)]
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return [
        ("qkv", cfg.q_size + 2 * cfg.kv_size, h, False),
        ("o", h, cfg.q_size, False),
        ("gate_up", 2 * inter, h, False),
        ("down (gated)", h, inter, True),
        ("lm_head", cfg.vocab_size, h, False),
    ]


def streamed_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Microseconds a call over a graph that runs `call` on each weight in turn."""
    for w in weights[:2]:  # compiles, sizes the split-K counters, warms cuBLAS: before capture
        call(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(weights))


def tune(
    n: int, k: int, gated: bool, bucket: int, dtype: torch.dtype
) -> tuple[LinearTuning, float, float]:  # fmt: skip
    """(best candidate, its us, cuBLAS's us) for one projection at M = bucket rows."""
    copies = max(2, min(32, math.ceil(STREAM_BYTES / (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda").to(dtype) for _ in range(copies)]
    x = torch.randn(bucket, (2 if gated else 1) * k, device="cuda").to(dtype)
    if gated:
        cublas = streamed_us(lambda w: F.linear(silu_and_mul(x), w), weights)
    else:
        cublas = streamed_us(lambda w: F.linear(x, w), weights)
    timed: list[tuple[float, LinearTuning]] = []
    for t in TUNING:
        # above GATED_MAX_M rows a gated call runs SiLU-and-mul, then the plain kernel
        if candidate(t, n, k, bucket, gated and bucket <= GATED_MAX_M, any_split=True):

            def call(w: torch.Tensor, t: LinearTuning = t) -> torch.Tensor:
                return linear(x, w, t, gated=gated)

            try:
                timed.append((streamed_us(call, weights), t))
            except OutOfResources as err:  # pipeline_smem's estimate fell short: say so
                print(f"  {t}: {err}", flush=True)
    best_us, best = min(timed, key=lambda item: item[0])
    return best, best_us, cublas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="synthetic:llama3-8b", help="a synthetic:<shape> model")
    ap.add_argument("--buckets", default="1,2,4,8,16,32,64")
    ap.add_argument("--write", action="store_true", help="merge the winners into the table")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "tuning needs a CUDA device"
    dtype = torch.bfloat16
    buckets = [int(b) for b in args.buckets.split(",")]
    assert all(1 <= b <= MAX_M and b & (b - 1) == 0 for b in buckets), "powers of 2 up to 64"
    print(header("Skinny linear tuned in the model's regime"), flush=True)
    copy_gbs = copy_bandwidth_gbs()
    print(f"{args.model}, {dtype}; copy {copy_gbs:,.0f} GB/s (read + write)", flush=True)
    rows: list[tuple[str, ...]] = []
    winners: dict[str, LinearTuning] = {}
    for name, n, k, gated in projections(args.model):
        for bucket in buckets:
            best, us, cublas = tune(n, k, gated, bucket, dtype)
            floor_us = n * k * 2 / copy_gbs / 1e3
            winners[shape_key(n, k, bucket, gated and bucket <= GATED_MAX_M, dtype)] = best
            row = (f"{name} [{n}, {k}]", str(bucket), str(best), f"{us:.1f}",
                   f"{n * k * 2 / us / 1e3:,.0f} GB/s", f"{floor_us / us:.0%}",
                   f"{cublas:.1f}", f"{cublas / us:.2f}x")  # fmt: skip
            rows.append(row)
            print(" | ".join(row), flush=True)
    head = ("projection", "M", "best config", "us", "weight rate", "of copy", "cuBLAS us",
            "vs cuBLAS")  # fmt: skip
    print()
    print(table(rows, head))
    if args.write:
        write_tuned(torch.cuda.get_device_name(), winners)
        print(f"\nwrote {len(winners)} configs for {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
