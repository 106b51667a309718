"""Tune the skinny decode linear (kernels/linear.py) in the regime the model runs it in.

    python benchmarks/tune_linear.py [--model synthetic:llama3-8b] [--buckets 1,2,...,64]
        [--quantization none,fp8,int8] [--write]

A decode step runs each projection once per layer, on a new weight each time: the weights stream
from HBM and the kernels run back to back with no host in between (a CUDA graph). The autotuner
times a candidate on one weight in isolation, which misjudges the narrow shapes (RESULTS.md: its
pick for qkv, split-K four ways, took 28.9 us a layer in the model against 22.0 for the previous
config). Here every candidate of every projection and M bucket (split-K ones on any K, where the
autotuner keeps them to long K) runs in a captured graph over `copies` distinct weights (>= 512
MiB of them, well past the L2), and its time is the graph's replay time over the calls; every
dot candidate whose tiles fit a TMA box is timed twice, with pointer loads and with its tiles by
TMA (LinearTuning.tma). Each projection is called as the model calls it (the norm on the input
of qkv, gate_up and lm_head, its weight folded into theirs; SiLU-and-mul of gate_up's product;
the residual added by o and down, which hand their rows' sums of squares to the norm of gate_up
and the next qkv). The table prints the best candidate beside the torch path (norm kernel,
cuBLAS, SiLU-and-mul kernel) and, for lm_head, whose norm sums x's squares itself and whose
unsplit candidates run both with the norm in the kernel and with the norm kernel first
(norm_first), the best time with the norm in the kernel, all timed the same way, and the copy-
bandwidth floor measured in the same run. --write merges the winners into
kernels/linear_tuned.json under this card's name, where `linear` finds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import copy_bandwidth_gbs, header, table
from triton.runtime.errors import OutOfResources

from kvmesh.kernels.linear import (
    CODE_TUNING,
    MAX_M,
    TUNING,
    LinearTuning,
    RowSquares,
    candidate,
    linear,
    linear_torch,
    shape_key,
    tma_fits,
    write_tuned,
)
from kvmesh.kernels.quant import FP8_DTYPE, Weight, quantize_weight
from kvmesh.shared.model.config import SHAPES
from kvmesh.shared.model.loader import SYNTHETIC_PREFIX

STREAM_BYTES = 512 << 20  # weights a timed graph streams through, at least


@dataclass(frozen=True)
class Projection:
    """A decode projection as the model calls it (shared/model/llama.py)."""

    name: str
    n: int
    k: int
    norm: bool = False  # RMSNorm on the input, its weight folded in (qkv, gate_up, lm_head)
    handed: bool = False  # the norm's sums of squares from the projection before (RowSquares)
    swiglu: bool = False  # silu(gate) * up of the product (gate_up)
    residual: bool = False  # adds the residual stream and hands its squares on (o, down)


def projections(model: str) -> list[Projection]:
    """A model's decode projections."""
    cfg = SHAPES[model.removeprefix(SYNTHETIC_PREFIX)]
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return [
        Projection("qkv", cfg.q_size + 2 * cfg.kv_size, h, norm=True, handed=True),
        Projection("o", h, cfg.q_size, residual=True),
        Projection("gate_up", 2 * inter, h, norm=True, handed=True, swiglu=True),
        Projection("down", h, inter, residual=True),
        Projection("lm_head", cfg.vocab_size, h, norm=True),
    ]


def streamed_us(call: Callable[[Weight], object], weights: list[Weight]) -> float:
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


def both_ways(p: Projection) -> bool:
    """Whether the projection's unsplit candidates are timed with and without norm_first."""
    return p.norm and not p.handed


def tune(
    p: Projection, bucket: int, dtype: torch.dtype, scheme: str = "none"
) -> tuple[LinearTuning, float, float, float | None]:  # fmt: skip
    """(best candidate, its us, the torch path's us, the best us with the norm inside the kernel
    (lm_head; else None)) at M = bucket rows. With a norm that sums x's squares itself, every
    unsplit candidate is timed twice: norm in the kernel, and norm kernel first (norm_first).
    scheme fp8/int8: w as the loader quantizes it (codes, row scales, the norm's gain apart),
    CODE_TUNING's candidates timed too."""
    w_bytes = 2 if scheme == "none" else 1
    copies = max(2, min(32, math.ceil(STREAM_BYTES / (p.n * p.k * w_bytes))))
    weights = [
        quantize_weight(torch.randn(p.n, p.k, device="cuda").to(dtype), scheme)
        for _ in range(copies)
    ]
    x = torch.randn(bucket, p.k, device="cuda").to(dtype)
    r = torch.randn(bucket, p.n, device="cuda").to(dtype) if p.residual else None
    gain = None if scheme == "none" else torch.rand(p.k, device="cuda").to(dtype) + 0.5
    norm = (gain, 1e-5) if p.norm else None
    # the partial sums of x's squares o and down would leave (64-column blocks)
    blocks = math.ceil(p.k / 64)
    parts = (x.float().pow(2).sum(1) / blocks).expand(blocks, bucket).contiguous()
    squares = RowSquares(parts) if p.handed else None
    cublas = streamed_us(lambda w: linear_torch(x, w, r, norm, p.swiglu), weights)
    timed: list[tuple[float, LinearTuning]] = []
    for base in TUNING + (CODE_TUNING if w_bytes == 1 else []):
        if not candidate(base, p.n, p.k, bucket, True, w_bytes):
            continue
        both = both_ways(p) and base.split_k == 1
        forms = [base, dataclasses.replace(base, norm_first=True)] if both else [base]
        # and each with its tiles by TMA, where they fit (not codes: linear loads them by pointer)
        tma = [dataclasses.replace(t, tma=True) for t in forms] if w_bytes == 2 else []
        forms += [
            t
            for t in tma
            if tma_fits(t, p.n, p.k) and candidate(t, p.n, p.k, bucket, True, w_bytes)
        ]
        for t in forms:

            def call(w: Weight, t: LinearTuning = t) -> torch.Tensor:
                out = RowSquares() if p.residual else None
                return linear(x, w, t, residual=r, norm=norm, swiglu=p.swiglu, squares=squares,
                              squares_out=out)  # fmt: skip

            try:
                timed.append((streamed_us(call, weights), t))
            except OutOfResources as err:  # pipeline_smem's estimate fell short: say so
                print(f"  {t}: {err}", flush=True)
    best_us, best = min(timed, key=lambda item: item[0])
    in_kernel = [us for us, t in timed if both_ways(p) and t.split_k == 1 and not t.norm_first]
    return best, best_us, cublas, min(in_kernel) if in_kernel else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="synthetic:llama3-8b", help="a synthetic:<shape> model")
    ap.add_argument("--buckets", default="1,2,4,8,16,32,64")
    ap.add_argument("--write", action="store_true", help="merge the winners into the table")
    ap.add_argument("--quantization", default="none",
                    help="weights as none, fp8 or int8 (several: comma-separated)")  # fmt: skip
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
    for scheme in args.quantization.split(","):
        codes = {"none": dtype, "fp8": FP8_DTYPE, "int8": torch.int8}[scheme]
        linears = projections(args.model)
        if scheme != "none":  # lm_head stays in the model's dtype (loader.load_model)
            linears = [p for p in linears if p.name != "lm_head"]
        for p, bucket in itertools.product(linears, buckets):
            best, us, cublas, in_kernel = tune(p, bucket, dtype, scheme)
            nbytes = p.n * p.k * codes.itemsize
            winners[shape_key(p.n, p.k, bucket, dtype, codes)] = best
            row = (f"{p.name} [{p.n}, {p.k}] {scheme}", str(bucket), str(best), f"{us:.1f}",
                   f"{nbytes / us / 1e3:,.0f} GB/s", f"{nbytes / copy_gbs / 1e3 / us:.0%}",
                   f"{cublas:.1f}", f"{cublas / us:.2f}x",
                   "-" if in_kernel is None else f"{in_kernel:.1f}")  # fmt: skip
            rows.append(row)
            print(" | ".join(row), flush=True)
    head = ("projection", "M", "best config", "us", "weight rate", "of copy", "torch us",
            "vs torch", "best with the norm in the kernel, us")  # fmt: skip
    print()
    print(table(rows, head))
    if args.write:
        write_tuned(torch.cuda.get_device_name(), winners)
        print(f"\nwrote {len(winners)} configs for {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
