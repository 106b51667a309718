"""Skinny linear for decode: y = x @ w.T for a few rows of x (M <= 64) against a large weight.

At decode batch sizes a projection is a stream of its weight (Llama-3-8B's o_proj reads 32 MiB of
bf16 weight against 8 KiB of x at M = 1), so the kernel's one job is to read w at the card's
bandwidth; on H100 cuBLAS reaches only 40-80% of copy bandwidth on the 4096-row shapes.

    w [N, K] row-major      x [M, K]         y [M, N]
    +---------------+       +---------+      +--+--+--
    | program 0     | -+    |  all of |      |p0|p1| ...   program p owns BLOCK_N rows of w
    +---------------+  |    |  x, in  |      |  |  |       (= BLOCK_N columns of y) and walks
    | program 1     |  |    |  every  |      +--+--+--     K in BLOCK_K tiles, num_stages tiles
    +---------------+  v    | program |                    in flight
          ...       K tiles +---------+

Two inner products, picked per shape and M bucket by the autotuner:
- dot: acc[BLOCK_N, M_PAD] += w_tile @ x_tile.T on the tensor cores, x padded to M_PAD = 16, 32
  or 64 rows by masked (zero) loads. w is the MMA's wide operand, so the padding costs no extra
  weight traffic.
- gemv (M == 1 only): acc[BLOCK_N, BLOCK_K] += w_tile * x_chunk in fp32 FMAs, reduced once.
Either way each output is one program's fp32 sum in a fixed order: no split-K, no atomics, so
results are bitwise reproducible. Small BLOCK_N gives enough programs to fill the card instead
(N = 4096 rows / 16 = 256 programs for 132 SMs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_M = 64  # rows of x the kernel takes (decode batches); F.linear above


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x: [M, K]; w: [N, K] -> [M, N]
    return F.linear(x, w)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_jit(
    x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    M_BUCKET,  # next_power_of_2(M): unused here, a key of the autotuner
    M_PAD: tl.constexpr,  # rows x is padded to for the dot: max(16, M_BUCKET)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of w = columns of y
    ks = tl.arange(0, BLOCK_K)
    # rows past N re-read row N - 1, so no weight load needs a row mask; the store drops them
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    if USE_DOT:
        m = tl.arange(0, M_PAD)
        x_ptrs = x_ptr + m[:, None] * stride_xm + ks[None, :]  # [M_PAD, BLOCK_K]
        m_ok = m[:, None] < M  # padding rows load as zeros (no memory traffic)
        acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            else:
                k_ok = (k + ks < K)[None, :]
                w = tl.load(w_ptrs, mask=k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y_ptrs = y_ptr + m[None, :] * stride_ym + cols[:, None]  # y.T's tile: [BLOCK_N, M_PAD]
        y_ok = (m[None, :] < M) & (cols[:, None] < N)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
    else:
        # M == 1: per-lane fp32 partial sums, one reduction over K after the loop
        x_ptrs = x_ptr + ks
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_ok = k + ks < K
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        tl.store(y_ptr + cols, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=cols < N)


_linear_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_linear_jit)


@dataclass(frozen=True)
class LinearTuning:
    """One launch config: an autotuner candidate, or an explicit one (tests, capture fallback)."""

    block_n: int  # rows of w per program
    block_k: int  # columns of w per tile
    num_warps: int
    num_stages: int  # depth of the K loop's software pipeline (tiles in flight)
    dot: bool = True  # tensor-core dot, x padded to M_PAD rows; False: fp32 FMA gemv (M == 1)

    def meta(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_K=self.block_k, USE_DOT=self.dot)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# The H100 autotuner's candidates: 4-32 KiB of w a tile, 3-8 tiles in flight a program, from 8016
# programs (N = 128256 / 16) down to 128 (N = 4096 / 32). All compile for sm_90a without spills;
# the dot configs pipeline w through shared memory (cp.async, 64-160 KiB), the gemv ones keep one
# tile in registers a program (3-4 programs an SM). benchmarks/bench_kernels.py --linear-only
# prints every candidate's time on the Llama-3-8B shapes.
TUNING: list[LinearTuning] = [
    LinearTuning(16, 128, 2, 8),
    LinearTuning(16, 256, 2, 6),
    LinearTuning(16, 512, 4, 4),
    LinearTuning(32, 256, 4, 4),
    LinearTuning(32, 256, 4, 6),
    LinearTuning(32, 128, 4, 8),
    LinearTuning(32, 512, 8, 3),
    LinearTuning(64, 128, 4, 6),
    LinearTuning(64, 256, 4, 4),
    LinearTuning(128, 128, 8, 4),
    LinearTuning(8, 1024, 4, 3, dot=False),
    LinearTuning(16, 256, 2, 4, dot=False),
    LinearTuning(16, 512, 4, 3, dot=False),
    LinearTuning(32, 256, 4, 3, dot=False),
]
_CAPTURE_TUNING = LinearTuning(32, 256, 4, 4)  # an untuned shape met inside a graph capture
_CPU_TUNING = LinearTuning(16, 64, 4, 1)  # the interpreter (CPU tests)


def _gemv_only_at_m1(configs: list, named_args: dict, **kwargs: object) -> list:
    bucket = {**named_args, **kwargs}["M_BUCKET"]
    return [c for c in configs if c.kwargs["USE_DOT"] or bucket == 1]


_linear_tuned = triton.autotune(
    configs=[triton.Config(t.meta(), **t.options()) for t in TUNING],
    key=["N", "K", "M_BUCKET"],  # the tensors' dtypes join the key too
    prune_configs_by={"early_config_prune": _gemv_only_at_m1},
    do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=25),
)(_linear_kernel)
# (N, K, M bucket, dtype) the autotuner has settled: those launch inside a graph capture as tuned
_TUNED: set[tuple[int, int, int, torch.dtype]] = set()


def _kernel_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the untuned call runs the kernel: few rows of half-precision, rows contiguous."""
    return (
        x.dim() == 2
        and w.dim() == 2
        and 1 <= x.shape[0] <= MAX_M
        and x.shape[1] == w.shape[1]
        and x.dtype in (torch.float16, torch.bfloat16)
        and w.dtype == x.dtype
        and x.device == w.device
        and x.stride(1) == 1
        and w.stride(1) == 1
    )


def linear(x: torch.Tensor, w: torch.Tensor, tuning: LinearTuning | None = None) -> torch.Tensor:
    """Triton version of `linear_ref`: y [M, N] in x.dtype, fp32 accumulation.

    The kernel runs for 1..MAX_M rows of fp16/bf16 (autotuned on CUDA, once per (N, K, M bucket,
    dtype), in the first call: make it before any graph capture). F.linear takes everything else,
    fp32 included (the engine's fp32 runs stay exact). An explicit `tuning` forces the kernel with
    that config for any dtype (tests, benchmarks).
    """
    if tuning is None and not _kernel_takes(x, w):
        return F.linear(x, w)
    m, k = x.shape
    n = w.shape[0]
    assert w.shape == (n, k) and w.dtype == x.dtype and w.device == x.device
    assert x.stride(1) == 1 and w.stride(1) == 1, "rows of x and w contiguous"
    assert 1 <= m <= MAX_M and (tuning is None or tuning.dot or m == 1)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bucket = triton.next_power_of_2(m)
    args = (x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), bucket, max(16, bucket))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    on_cpu = x.device.type == "cpu"
    if tuning is None and not on_cpu:
        key = (n, k, bucket, x.dtype)
        if key in _TUNED or not torch.cuda.is_current_stream_capturing():
            _linear_tuned[grid](*args, DOT_PRECISION=precision)
            _TUNED.add(key)
            return y
        tuning = _CAPTURE_TUNING
    tuning = tuning or _CPU_TUNING
    options = {} if on_cpu else tuning.options()
    _linear_kernel[grid](*args, DOT_PRECISION=precision, **tuning.meta(), **options)
    return y
