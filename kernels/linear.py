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

A dot config may take its w and x tiles by TMA (LinearTuning.tma, sm_90+, where the tiles tile w
exactly): one bulk copy a tile into shared memory, x's padding rows filled with zeros by the copy,
instead of a cp.async per 16 bytes a thread; the same tiles into the same dots, so the same bits.

Fused around the product, as a decoder layer asks (shared/model/llama.py):
- norm=(g, eps): the input is RMSNorm(x) * g. Each x tile is multiplied by g's as it is loaded,
  the rows' sums of squares accumulate on the way, and the accumulator's columns are scaled by
  1 / rms at the end (unsplit configs; a split one, or one the card's table marks norm_first,
  runs the norm kernel first). norm=(None, eps): g is folded into w's columns (the model's
  loader does that), so x is only summed, never scaled; and with squares=RowSquares filled by
  the launch that wrote x, not even summed: its partial sums load before the K loop and scale
  the accumulator after it (any config, split ones too).
- residual=r: y = x @ w.T + r, added in the epilogue before the one rounding (its tile loaded
  before the K loop); squares_out=RowSquares: y's rows' sums of squares too, one partial a
  column block, for the next projection's norm.
- swiglu=True (gate_up, w = [gate rows | up rows], 2I x K): y = silu(x @ gate.T) * (x @ up.T),
  [M, I]: a program walks block_n / 2 gate rows and the matching up rows (the tuned config's
  bytes a stage) into two accumulators and writes only the product: no SiLU-and-mul launch and
  no [M, 2I] round trip through memory.

Quantized weights (w a kernels.quant.QuantizedWeight: codes [N, K] float8_e4m3fn or int8, fp32
scales [N, 1], one per output channel), one rule for `linear_ref` and the kernels:
- INT8 at any M, FP8 at M <= MAX_M: weight-only, y = (rms_norm(x) * g) @ (codes * scale).T,
  fp32 accumulation, x not quantized. The kernel loads the codes (1 byte each), converts them to
  x's dtype in registers, multiplies a norm gain g (which a quantized weight keeps apart, never
  folded into codes) into the w tile's columns (w is the dot's register operand; scaling x would
  cost the shared-memory round trip norm_first avoids), and scales the fp32 accumulator by the
  row's scale in the epilogue (gate and up rows by their own), before 1 / rms, SiLU, residual.
- FP8 at M > MAX_M: W8A8, the normed input (rms_norm(x) * g in x's dtype) quantized per token
  to FP8 (quant.quantize_activation_fp8), y = (codes_x @ codes_w.T) * scale_x * scale_w.T
  (quant.linear_w8a8_fp8; torch._scaled_mm on CUDA).
Then SwiGLU, the residual and out as for any weight.

Narrow shapes (N = 4096 or 6144 at BLOCK_N = 64: 64-96 programs for 132 SMs) would leave SMs
idle; fewer rows a program is no cure (each program re-reads all of x from L2), so the dot configs
can split K instead (split_k > 1, grid (cdiv(N, BLOCK_N), SPLIT_K)):

    column block j, K tiles shared out        ws fp32 [SPLIT_K, M, N]      counters[j] (int32)
    +--------+--------+--------+--------+     +----------------------+
    | (j, 0) | (j, 1) | (j, 2) | (j, 3) | --> | ws[s][:, block j]    |     each program: store
    +--------+--------+--------+--------+     | = program (j, s)'s   |     its partial, CTA
     floor or ceil of cdiv(K, BLOCK_K) / 4    |   fp32 partial       |     barrier, atomic_add
     tiles each, in K order (maybe none)      +----------------------+     (acq_rel, gpu scope)

The program that reads counters[j] == SPLIT_K - 1 came last: it loads ws[0], ws[1], ...,
ws[SPLIT_K - 1] for block j, adds them in that order in fp32, writes y and puts counters[j] back to
0 for the next launch (or CUDA-graph replay). The workspace is fresh each call; the counters
persist per device.

Reproducibility: each output is a fixed-order fp32 sum (one program's, or with split-K the
partials' in split order) that depends only on the inputs and the launch config (block sizes,
split_k, warps, stages), never on scheduling or on which program of a column block finishes last:
no floating-point atomics, and the same call with the same config on the same card gives the same
bits every time. Configs differ in rounding (a split one sums its partials in another order than
the one-pass split_k = 1 kernel, itself unchanged); the autotuner fixes one per (N, K, M bucket,
dtype) the first time a process meets it, so results repeat within a process but another process
may tune differently. The counters assume launches on a device run one at a time (one stream, as
the engine's steps and graph replays do): two split launches racing on different streams would
share them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kvmesh.kernels.act_quant import quantize_rows_fp8
from kvmesh.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvmesh.kernels.device import capability
from kvmesh.kernels.pdl import pdl_args, pdl_enter
from kvmesh.kernels.quant import (
    FP8_DTYPE,
    QuantizedWeight,
    Weight,
    linear_w8a8_fp8,
    linear_weight_only,
)
from kvmesh.kernels.rms_norm import rms_norm, rms_norm_ref

# an RMSNorm on the input: (weight [K], eps); weight None: no gain (the model folded it into w)
Norm = tuple[torch.Tensor | None, float]


@dataclass
class RowSquares:
    """The sums of squares of a projection's output rows, which the next projection's RMSNorm
    needs, handed from the launch that writes the rows to the one that normalizes them. Pass
    an empty one as `squares_out`: a kernel launch of more than one row with a known config
    (the card's table or an explicit one) fills `parts`, its rows' squares summed over each
    column block ([blocks, M] fp32, one row a column block), and other paths leave it empty.
    Pass it as `squares` with norm=(None, eps): a kernel launch of more than one row takes the
    sums from it, if filled, instead of summing x's squares itself or running the norm kernel
    first."""

    parts: torch.Tensor | None = None


MAX_M = 64  # rows of x the kernel takes (decode batches); F.linear above


def _finish(
    y: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor | None
) -> torch.Tensor:
    """y plus the residual if any, written into out if given."""
    if residual is None:
        return y if out is None else out.copy_(y)
    return y + residual if out is None else torch.add(y, residual, out=out)


def product_ref(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [M, K] @ w.T [K, N] in x's dtype; a quantized w by the rule of this module's docstring:
    weight-only for INT8 and for FP8 at up to MAX_M rows, W8A8 (per-token FP8 x) above."""
    if not isinstance(w, QuantizedWeight):
        return F.linear(x, w)
    if w.scheme == "fp8" and x.shape[0] > MAX_M:
        return linear_w8a8_fp8(x, w)
    return linear_weight_only(x, w)


def linear_ref(
    x: torch.Tensor, w: Weight, residual: torch.Tensor | None = None,
    norm: Norm | None = None, swiglu: bool = False, out: torch.Tensor | None = None,
    squares: RowSquares | None = None, squares_out: RowSquares | None = None,
) -> torch.Tensor:  # fmt: skip
    # x: [M, K]; w: [N, K] -> [M, N]. norm: the input is rms_norm(x) (a layer's input norm).
    # swiglu: w is [gate | up] rows and y = silu_and_mul(x @ w.T), [M, N / 2]. residual: added
    # to the result (in x's dtype). out: the result written there (it may be residual itself).
    # squares, squares_out: the kernel's hand-over of the norm's sums (unused here).
    # w quantized: product_ref's rule, y rounded to x's dtype before SwiGLU and the residual
    if norm is not None:
        x = rms_norm_ref(x, *norm)[0]
    y = product_ref(x, w)
    if swiglu:
        y = silu_and_mul_ref(y)
    return _finish(y, residual, out)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask the L2 to fetch the 128-byte line at each address (int64 pointers): a hint,
    no registers loaded and no fault on any address."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
        dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _normed(x, g_ptr, k, K, ssq, AXIS: tl.constexpr, GAIN: tl.constexpr):
    """x's tile (columns k, along AXIS) times the norm weight's (fp32, rounded to x's dtype;
    unchanged without GAIN: the weight is folded into w), and ssq plus the sums of squares of
    x's rows."""
    x32 = x.to(tl.float32)
    ssq += tl.sum(x32 * x32, axis=AXIS)
    if GAIN:
        g = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        if AXIS == 1:
            g = g[None, :]
        x = (x32 * g).to(x.dtype)
    return x, ssq


@triton.jit
def _operand(w, x, g_k, CODES: tl.constexpr, GAIN_W: tl.constexpr):
    """The dot's w tile: codes (CODES) converted to x's dtype (exact for FP8 E4M3 and INT8 in
    fp16/bf16), times g_k, the norm gain's columns (GAIN_W: fp32 [1, BLOCK_K]), rounded once;
    w unchanged otherwise. w is the dot's register operand on Hopper, so this costs no trip
    through shared memory."""
    if GAIN_W:
        w = (w.to(tl.float32) * g_k).to(x.dtype)
    elif CODES:
        w = w.to(x.dtype)
    return w


@triton.jit
def _plus_residual(acc, r_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """acc (fp32) plus the residual's tile at `offsets`, if there is one."""
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _squares_in(sq_ptr, blocks, M, m, SQ_BLOCKS: tl.constexpr):
    """The partials of the sums of squares of x's rows m its producer wrote (sq [blocks, M]
    fp32, one row a column block of that launch: SQ_OUT), [SQ_BLOCKS, len(m)]: loaded before
    the K loop and summed (in one fixed order) after it, so their latency hides behind it."""
    b = tl.arange(0, SQ_BLOCKS)[:, None]
    return tl.load(sq_ptr + b * M + m[None, :], mask=(b < blocks) & (m[None, :] < M), other=0.0)


@triton.jit
def _write_y(
    acc, r_tile, y_ptrs, y_ok, sq_ptr, col_ok, pid_n, M, m,
    HAS_RESIDUAL: tl.constexpr, SQ_OUT: tl.constexpr,
):  # fmt: skip
    """Store the dot path's y tile (y.T's: [BLOCK_N, rows m]): acc (fp32) plus the residual's
    tile, rounded once; with SQ_OUT, also the sums of squares of its rows as y holds them over
    its columns, as row pid_n of sq [cdiv(N, BLOCK_N), M] (RowSquares.parts)."""
    if HAS_RESIDUAL:
        acc += r_tile.to(tl.float32)
    y = acc.to(y_ptrs.dtype.element_ty)
    tl.store(y_ptrs, y, mask=y_ok)
    if SQ_OUT:
        y32 = tl.where(col_ok, y.to(tl.float32), 0.0)
        tl.store(sq_ptr + pid_n * M + m, tl.sum(y32 * y32, axis=0), mask=m < M)


@triton.jit
def _silu_times(gate, up):
    """silu(gate) * up, fp32."""
    return gate * tl.sigmoid(gate) * up


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_jit(
    x_ptr, w_ptr, y_ptr,
    ws_ptr,  # fp32 [SPLIT_K, M, N] partial sums (SPLIT_K > 1; None otherwise)
    counters_ptr,  # int32 [>= cdiv(N, BLOCK_N)], zero between launches (SPLIT_K > 1; or None)
    r_ptr,  # [M, N] residual added to y (HAS_RESIDUAL; or None)
    g_ptr,  # [K] RMSNorm weight of x (NORM and GAIN; or None)
    s_ptr,  # fp32 [rows of w]: the codes' per-row scales (SCALED; or None)
    sq_in_ptr,  # fp32 [sq_blocks, M]: x's rows' sums of squares in partials (SQ_IN; or None)
    sq_out_ptr,  # fp32 [cdiv(N, BLOCK_N), M]: y's rows' sums of squares, written (SQ_OUT; or None)
    x_desc,  # TMA descriptor of x, [M_PAD, BLOCK_K] boxes (TMA; or None)
    w_desc,  # TMA descriptor of w, [BLOCK_N, BLOCK_K] boxes (TMA; or None)
    sq_blocks,  # rows of sq_in
    M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, eps,
    M_BUCKET,  # next_power_of_2(M): unused here, a key of the autotuner
    M_PAD: tl.constexpr,  # rows x is padded to for the dot: max(16, M_BUCKET)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs sharing a column block's K range (grid dimension 1)
    HAS_RESIDUAL: tl.constexpr,  # y = x @ w.T + residual
    NORM: tl.constexpr,  # the input is RMSNorm(x) * g: x * g in the loop, 1 / rms at the end
    GAIN: tl.constexpr,  # NORM's g is applied here (else folded into w's columns: g_ptr None)
    SQ_IN: tl.constexpr,  # NORM's sums of squares from sq_in (else from x's tiles in the loop)
    SQ_BLOCKS: tl.constexpr,  # next_power_of_2(sq_blocks) (SQ_IN; else 1)
    SQ_OUT: tl.constexpr,  # write y's rows' sums of squares by column block (the next norm's)
    SWIGLU: tl.constexpr,  # w is [2N, K], gate rows then up rows; y = silu(x @ gate.T) * (x @ up.T)
    SCALED: tl.constexpr,  # w holds FP8 or INT8 codes, row r standing for codes[r] * s[r]
    TMA: tl.constexpr,  # the dot path's tiles arrive by TMA (sm_90+; EVEN_K, N % BLOCK_N == 0)
    PDL: tl.constexpr,  # programmatic dependent launch (kernels/pdl.py)
    PREFETCH_LINES: tl.constexpr = 8,  # 128-byte lines of each w row prefetched (PDL only)
    LINE_COLS: tl.constexpr = 64,  # columns of w in a 128-byte line (64 fp16/bf16, 128 codes)
):  # fmt: skip
    tl.static_assert(USE_DOT or SPLIT_K == 1, "the gemv path (M == 1) takes no split-K")
    # the gemv path has x in registers: it sums x's squares itself, and hands none on
    tl.static_assert(USE_DOT or not (SQ_IN or SQ_OUT), "row squares are the dot path's")
    tl.static_assert(SPLIT_K == 1 or not SWIGLU, "SwiGLU needs all of K")
    # a split program sees part of K: the squares come in, and g (if any) goes on w's codes
    tl.static_assert(
        SPLIT_K == 1 or not NORM or (SQ_IN and (SCALED or not GAIN)), "the norm needs all of K"
    )
    tl.static_assert(not TMA or (USE_DOT and EVEN_K), "TMA tiles are the dot path's, whole ones")
    tl.static_assert(not (TMA and SCALED), "quantized tiles arrive by pointer loads")
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of w = columns of y
    ks = tl.arange(0, BLOCK_K)
    # rows past N re-read row N - 1, so no weight load needs a row mask; the store drops them
    w_rows = tl.minimum(cols, N - 1).to(tl.int64)
    up_rows = w_rows + N  # SWIGLU: the matching up rows
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = K
    else:
        # split k's share of the cdiv(K, BLOCK_K) tiles: floor or ceil of tiles / SPLIT_K,
        # possibly none; the partial last tile (not EVEN_K) falls to the last split with tiles
        pid_k = tl.program_id(1)
        tiles = tl.cdiv(K, BLOCK_K)
        k_lo = pid_k * tiles // SPLIT_K * BLOCK_K
        k_hi = (pid_k + 1) * tiles // SPLIT_K * BLOCK_K
    if PDL:
        # no earlier kernel writes w: while they finish, start the first PREFETCH_LINES lines of
        # each of this program's rows towards L2
        lines = tl.minimum(k_lo + tl.arange(0, PREFETCH_LINES) * LINE_COLS, K - 1)
        _prefetch_l2((w_ptr + w_rows[:, None] * stride_wn + lines[None, :]).to(tl.int64))
        if SWIGLU:
            _prefetch_l2((w_ptr + up_rows[:, None] * stride_wn + lines[None, :]).to(tl.int64))
    pdl_enter(PDL)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + ks[None, :] + k_lo  # [BLOCK_N, BLOCK_K]
    u_ptrs = w_ptr + up_rows[:, None] * stride_wn + ks[None, :] + k_lo
    if SCALED:  # loaded before the K loop and applied after it: their latency hides
        w_scale = tl.load(s_ptr + w_rows)
        up_scale = tl.load(s_ptr + up_rows) if SWIGLU else w_scale
    else:
        w_scale = 1.0
        up_scale = 1.0
    if USE_DOT:
        m = tl.arange(0, M_PAD)
        x_ptrs = x_ptr + m[:, None] * stride_xm + ks[None, :] + k_lo  # [M_PAD, BLOCK_K]
        m_ok = m[:, None] < M  # padding rows load as zeros (no memory traffic)
        acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)  # SWIGLU
        ssq = tl.zeros([M_PAD], dtype=tl.float32)  # NORM: sums of squares of x's rows
        if NORM and SQ_IN:
            sq_parts = _squares_in(sq_in_ptr, sq_blocks, M, m, SQ_BLOCKS)
        y_ptrs = y_ptr + m[None, :] * stride_ym + cols[:, None]  # y.T's tile: [BLOCK_N, M_PAD]
        y_ok = (m[None, :] < M) & (cols[:, None] < N)
        if HAS_RESIDUAL:  # loaded before the K loop and added after it: its latency hides
            r_tile = tl.load(r_ptr + m[None, :] * stride_rm + cols[:, None], mask=y_ok, other=0.0)
        else:
            r_tile = 0.0
        for k in range(k_lo, k_hi, BLOCK_K):
            if TMA:  # x's rows past M arrive as zeros
                w = w_desc.load([pid_n * BLOCK_N, k])
                x = x_desc.load([0, k])
            elif EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            else:
                k_ok = (k + ks < K)[None, :]
                w = tl.load(w_ptrs, mask=k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=m_ok & k_ok, other=0.0)
            if NORM and not SQ_IN:  # the loop sums x's squares (and applies g, unless to w)
                x, ssq = _normed(x, g_ptr, k + ks, K, ssq, 1, GAIN and not SCALED)
            if SCALED and GAIN:  # g's columns, for the codes'
                g_k = tl.load(g_ptr + k + ks, mask=k + ks < K, other=0.0).to(tl.float32)[None, :]
            else:
                g_k = 1.0
            w = _operand(w, x, g_k, SCALED, SCALED and GAIN)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            if SWIGLU:
                if TMA:
                    wu = w_desc.load([N + pid_n * BLOCK_N, k])
                elif EVEN_K:
                    wu = tl.load(u_ptrs)
                else:
                    wu = tl.load(u_ptrs, mask=(k + ks < K)[None, :], other=0.0)
                wu = _operand(wu, x, g_k, SCALED, SCALED and GAIN)
                acc_up = tl.dot(wu, tl.trans(x), acc_up, input_precision=DOT_PRECISION)
                u_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if SCALED:  # rows of w are rows of acc
            acc = acc * w_scale[:, None]
            acc_up = acc_up * up_scale[:, None]
        if NORM:  # rows of x are columns of acc
            if SQ_IN:
                ssq = tl.sum(sq_parts, axis=0)
            inv_rms = tl.rsqrt(ssq / K + eps)[None, :]
            acc = acc * inv_rms
            acc_up = acc_up * inv_rms
        if SWIGLU:
            acc = _silu_times(acc, acc_up)
        if SPLIT_K == 1:
            _write_y(acc, r_tile, y_ptrs, y_ok, sq_out_ptr, cols[:, None] < N, pid_n, M, m,
                     HAS_RESIDUAL, SQ_OUT)  # fmt: skip
        else:
            # ws[pid_k] gets this split's partial; the column block's last program to arrive sums
            # ws[0] + ws[1] + ... in that order (whichever program it is) and writes y
            ws_ptrs = ws_ptr + m[None, :] * N + cols[:, None]  # [BLOCK_N, M_PAD] of ws[0]
            tl.store(ws_ptrs + pid_k * M * N, acc, mask=y_ok)
            # every thread's partial is stored before the counter moves: the CTA barrier, then
            # one thread's acq_rel (gpu scope) atomic releases them (and acquires the others')
            tl.debug_barrier()
            arrived = tl.atomic_add(counters_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                # the atomic's result reaches every thread through shared memory and a barrier,
                # so these loads follow the acquire; .cg reads L2, never a stale L1 line
                acc = tl.load(ws_ptrs, mask=y_ok, other=0.0, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    acc += tl.load(ws_ptrs + s * M * N, mask=y_ok, other=0.0, cache_modifier=".cg")
                _write_y(acc, r_tile, y_ptrs, y_ok, sq_out_ptr, cols[:, None] < N, pid_n, M, m,
                         HAS_RESIDUAL, SQ_OUT)  # fmt: skip
                tl.atomic_xchg(counters_ptr + pid_n, 0)  # zero again for the next launch / replay
    else:
        # M == 1: per-lane fp32 partial sums, one reduction over K after the loop
        x_ptrs = x_ptr + ks
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # SWIGLU
        ssq = 0.0  # NORM: x's sum of squares
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_ok = k + ks < K
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            if NORM and not SQ_IN:
                x, ssq = _normed(x, g_ptr, k + ks, K, ssq, 0, GAIN)
            x32 = x.to(tl.float32)[None, :]
            acc += w.to(tl.float32) * x32
            if SWIGLU:
                if EVEN_K:
                    wu = tl.load(u_ptrs)
                else:
                    wu = tl.load(u_ptrs, mask=(k + ks < K)[None, :], other=0.0)
                acc_up += wu.to(tl.float32) * x32
                u_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1) * w_scale
        if NORM:
            inv_rms = tl.rsqrt(ssq / K + eps)
            y = y * inv_rms
        if SWIGLU:
            y_up = tl.sum(acc_up, axis=1) * up_scale
            if NORM:
                y_up = y_up * inv_rms
            y = _silu_times(y, y_up)
        y = _plus_residual(y, r_ptr, cols, cols < N, HAS_RESIDUAL)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


_linear_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_linear_jit)


@dataclass(frozen=True)
class LinearTuning:
    """One launch config: an autotuner candidate, or an explicit one (tests, capture fallback)."""

    block_n: int  # rows of w per program
    block_k: int  # columns of w per tile
    num_warps: int
    num_stages: int  # depth of the K loop's software pipeline (tiles in flight)
    dot: bool = True  # tensor-core dot, x padded to M_PAD rows; False: fp32 FMA gemv (M == 1)
    split_k: int = 1  # programs per column block, each on a contiguous share of K (dot only)
    # with a norm: the norm kernel first, then the plain product, although K is not split. The
    # in-kernel norm scales x's tiles in registers, and a dot config must then write them back
    # to shared memory for the tensor cores: at M = 64 on the H100 that doubled qkv's time for
    # most configs (21.2 -> 46.4 us), more than the norm launch costs (2 us). The tuner decides.
    norm_first: bool = False
    # the dot path's w and x tiles by TMA (one bulk copy a tile, sm_90+) instead of cp.async (16
    # bytes a thread), where the tiles fit (tma_fits); pointer loads elsewhere. The tuner decides
    # per shape and bucket: TMA everywhere helps some steps and hurts others
    # (benchmarks/RESULTS.md, "Constants the code cites")
    tma: bool = False

    def __post_init__(self) -> None:
        assert self.split_k >= 1 and (self.dot or self.split_k == 1), "split-K is dot only"

    def meta(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_K=self.block_k, USE_DOT=self.dot,
                    SPLIT_K=self.split_k)  # fmt: skip

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


# The H100 autotuner's candidates: 4-32 KiB of w a tile, 3-8 tiles in flight a program, from 8016
# programs (N = 128256 / 16) down to 128 (N = 4096 / 32). All compile for sm_90a without spills;
# the dot configs pipeline w through shared memory (cp.async, 64-160 KiB), the gemv ones keep one
# tile in registers a program (3-4 programs an SM). The split-K ones multiply the programs of the
# narrow shapes (N = 4096 / 64 x 2 = 128) where K is long enough to share (see _split_pays);
# with 128-row tiles they also halve the re-reads of x from L2 (every column block reads all of
# x: at M = 64 and 64-row tiles, as many bytes as the weight).
# benchmarks/bench_kernels.py --linear-only prints every candidate's time on the Llama-3-8B shapes.
TUNING: list[LinearTuning] = [
    LinearTuning(16, 128, 2, 8),
    LinearTuning(16, 256, 2, 6),
    LinearTuning(16, 512, 4, 4),
    LinearTuning(32, 256, 4, 4),
    LinearTuning(32, 256, 4, 6),
    LinearTuning(32, 128, 4, 8),
    LinearTuning(32, 512, 8, 3),
    LinearTuning(64, 128, 4, 4),
    LinearTuning(64, 128, 4, 6),
    LinearTuning(64, 256, 4, 4),
    LinearTuning(128, 128, 4, 3),
    LinearTuning(128, 128, 8, 4),
    LinearTuning(64, 128, 4, 6, split_k=2),
    LinearTuning(64, 256, 4, 4, split_k=2),
    LinearTuning(64, 128, 4, 6, split_k=4),
    LinearTuning(32, 256, 4, 4, split_k=2),
    LinearTuning(128, 128, 8, 4, split_k=2),
    LinearTuning(128, 128, 8, 4, split_k=4),
    LinearTuning(128, 64, 8, 6, split_k=4),
    LinearTuning(8, 1024, 4, 3, dot=False),
    LinearTuning(16, 256, 2, 4, dot=False),
    LinearTuning(16, 512, 4, 3, dot=False),
    LinearTuning(32, 256, 4, 3, dot=False),
]
# More candidates for 1-byte codes (FP8, INT8), timed by benchmarks/tune_linear.py only (the
# autotuner keeps TUNING): the same bytes of w a tile as TUNING's wider ones, in twice the columns
CODE_TUNING: list[LinearTuning] = [
    LinearTuning(16, 1024, 4, 4),
    LinearTuning(32, 512, 4, 4),
    LinearTuning(32, 512, 4, 6),
    LinearTuning(64, 512, 4, 4),
    LinearTuning(128, 256, 8, 4),
    LinearTuning(64, 512, 4, 4, split_k=2),
    LinearTuning(32, 512, 4, 4, split_k=2),
    LinearTuning(128, 256, 8, 4, split_k=2),
    LinearTuning(8, 2048, 4, 3, dot=False),
    LinearTuning(16, 1024, 4, 3, dot=False),
    LinearTuning(16, 1024, 8, 3, dot=False),
    LinearTuning(32, 512, 4, 3, dot=False),
]
_CAPTURE_TUNING = LinearTuning(32, 256, 4, 4)  # an untuned shape met inside a graph capture
_CPU_TUNING = LinearTuning(32, 64, 4, 1)  # the interpreter (CPU tests; SwiGLU takes 16 + 16)
# Columns of w a split-K program walks at least (autotuner candidates). Measured in the model on
# an H100 (Llama-3-8B, batch 64, benchmarks/RESULTS.md): with 1024 the autotuner split qkv's
# K = 4096 four ways and the projection got slower (28.9 vs 22.0 us a layer), while down_proj's
# K = 14336 in two halves got faster (46.6 vs 47.8 us); so only long K is shared out.
SPLIT_MIN_K = 4096
SPLIT_MAX_PROGRAMS = 264  # column blocks (2 per H100 SM) from which split-K candidates drop out


def _split_pays(n: int, k: int, block_n: int, split_k: int) -> bool:
    """Whether an autotuner candidate is worth timing: unsplit, or split where it adds programs
    the card lacks (fewer than SPLIT_MAX_PROGRAMS column blocks) and each split keeps a long K
    run (at least SPLIT_MIN_K columns)."""
    if split_k == 1:
        return True
    return k >= SPLIT_MIN_K * split_k and triton.cdiv(n, block_n) < SPLIT_MAX_PROGRAMS


# Shared memory a program may take on sm_90 (227 KiB); configs whose pipeline needs more fail to
# launch (the autotuner skips them, an explicit launch raises), so they are never candidates.
SMEM_LIMIT = 232448


def pipeline_smem(tuning: LinearTuning, bucket: int, w_bytes: int = 2) -> int:
    """An upper bound on the shared memory a dot config's K loop takes (fp16/bf16): num_stages
    buffers of a w tile and an x tile padded to max(16, bucket) rows. Triton 3.6 on an H100
    asked, at M = 64: 262,144 B for block_n 64, block_k 256, 4 stages (this bound) and 245,760 B
    for block_n 16, block_k 512, 4 stages (bound 327,680). A SwiGLU launch of a config walks
    block_n / 2 gate and block_n / 2 up rows: the same bytes. A tma config adds the stages'
    mbarriers (Triton 3.9 asked 8-16 bytes a stage for the table's configs). w_bytes: of w's
    elements as they stream (1 for FP8/INT8 codes)."""
    if not tuning.dot:
        return 0
    x_tile = max(16, bucket) * tuning.block_k * 2
    w_tile = tuning.block_n * tuning.block_k * w_bytes
    barriers = 64 if tuning.tma else 0
    return tuning.num_stages * (w_tile + x_tile + barriers)


def candidate(
    tuning: LinearTuning, n: int, k: int, bucket: int, any_split: bool = False,
    w_bytes: int = 2,
) -> bool:  # fmt: skip
    """Whether a config is a candidate for a shape: the gemv configs only at M == 1, none whose
    pipeline overflows shared memory, and split-K configs only where they pay (_split_pays:
    the autotuner's isolated timing misjudges them) unless any_split (benchmarks/tune_linear.py,
    whose in-graph timing is the model's)."""
    return (
        (tuning.dot or bucket == 1)
        and (any_split or _split_pays(n, k, tuning.block_n, tuning.split_k))
        and pipeline_smem(tuning, bucket, w_bytes) <= SMEM_LIMIT
    )


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """The autotuner's candidates for a call (`candidate`)."""
    args = {**named_args, **kwargs}
    shape = args["N"], args["K"], args["M_BUCKET"]
    return [c for c in configs if candidate(_tuning_of(c), *shape)]


def _tuning_of(config: triton.Config) -> LinearTuning:
    kw = config.kwargs
    return LinearTuning(kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages,
                        kw["USE_DOT"], kw["SPLIT_K"])  # fmt: skip


def _bench_streamed(
    fn: Callable[[], object], quantiles: Sequence[float] = (0.5,), reps: int = 25
) -> list[float]:
    """The autotuner's timing of one candidate (ms at `quantiles`), as a projection runs in a
    decode step: its weight streamed from HBM, after other work left L2 full of clean lines.
    Before each timed launch the L2 is flushed by reading 128 MiB, not (as triton's do_bench
    does) by writing 256 MiB, whose dirty lines would be written back during the timed launch and
    bill the candidate for up to 50 MB of writes: the narrow shapes (32-50 MB of weight) would be
    tuned for the wrong regime. The flush also hides the launch's host cost from the timing."""
    flush = torch.empty(32 << 20, dtype=torch.float32, device="cuda")  # 128 MiB > the L2
    flush.fill_(1.0)
    fn()
    torch.cuda.synchronize()
    marks = []
    for _ in range(reps):
        flush.sum()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        marks.append((start, end))
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in marks)
    return [times[min(int(q * len(times)), len(times) - 1)] for q in quantiles]


_linear_tuned = triton.autotune(
    configs=[triton.Config(t.meta(), **t.options()) for t in TUNING],
    key=["N", "K", "M_BUCKET"],  # the tensors' dtypes join the key too
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_bench_streamed,
)(_linear_kernel)
# (N, K, M bucket, dtype, w's dtype) the autotuner has settled: those launch inside a graph
# capture as tuned
_TUNED: set[tuple[int, int, int, torch.dtype, torch.dtype]] = set()
# split-K arrival counters, one per column block, per device; zero between launches (the last
# program of a column block resets its own). A grown buffer's predecessor is kept in _OUTGROWN:
# a CUDA graph captured with it still replays on it.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _counters(device: torch.device, blocks: int) -> torch.Tensor | None:
    """The device's counters, at least `blocks` of them; None if that takes an allocation inside
    a graph capture (which must not make one that outlives the graph's pool)."""
    have = _COUNTERS.get(device)
    if have is not None and have.numel() >= blocks:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    size = max(blocks, 256)
    if have is not None:
        _OUTGROWN.append(have)
        size = max(size, 2 * have.numel())
    _COUNTERS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _split_scratch(
    device: torch.device, m: int, n: int, tunings: list[LinearTuning]
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(workspace, counters) that fit every config of `tunings` (Nones if none splits K), or None
    if the counters would need allocating inside a graph capture."""
    splits = [t for t in tunings if t.split_k > 1]
    if not splits:
        return None, None
    counters = _counters(device, max(triton.cdiv(n, t.block_n) for t in splits))
    if counters is None:
        return None
    # fp32 [SPLIT_K, M, N], fresh each call (graph-capture safe: it comes from the graph's pool)
    size = max(t.split_k for t in splits) * m * n
    assert size < 2**31, "workspace offsets are int32"
    return torch.empty(size, dtype=torch.float32, device=device), counters


# Configs measured in the model's regime by benchmarks/tune_linear.py (each candidate timed in a
# CUDA graph streaming a row of distinct weights, as a decode step does), per card; they take
# precedence over the autotuner, whose isolated timing picked configs that are slower in the
# model (RESULTS.md, split-K). {device name: {shape key: LinearTuning fields}}.
TUNED_FILE = Path(__file__).with_name("linear_tuned.json")
_tables: dict[Path, dict[str, dict[str, dict]]] = {}


def shape_key(
    n: int, k: int, bucket: int, dtype: torch.dtype, w_dtype: torch.dtype | None = None
) -> str:  # fmt: skip
    """The key of a tuned config: 'N x K, M bucket, dtype' (of w: a SwiGLU's N is 2I), and
    w's code dtype after it where w is quantized ('4096x4096 m1 bfloat16 float8_e4m3fn')."""
    key = f"{n}x{k} m{bucket} {_name(dtype)}"
    return key if w_dtype is None or w_dtype == dtype else f"{key} {_name(w_dtype)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_tuned(path: Path = TUNED_FILE) -> dict[str, dict[str, dict]]:
    """The tuned configs of every card in `path` ({} if there is no such file)."""
    if path not in _tables:
        _tables[path] = json.loads(path.read_text()) if path.exists() else {}
    return _tables[path]


def write_tuned(
    device_name: str, configs: dict[str, LinearTuning], path: Path = TUNED_FILE
) -> None:
    """Merge one card's tuned configs into `path` (other cards' entries are kept)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault(device_name, {})
    entries.update({key: dataclasses.asdict(t) for key, t in configs.items()})
    table[device_name] = dict(sorted(entries.items()))
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _tables.pop(path, None)
    _tuned_on.cache_clear()


def tuned_for(device_name: str, key: str, path: Path = TUNED_FILE) -> LinearTuning | None:
    """The measured config of a shape on a card, if there is one."""
    fields = read_tuned(path).get(device_name, {}).get(key)
    return LinearTuning(**fields) if fields is not None else None


@functools.cache
def _tuned_on(
    device: torch.device, n: int, k: int, bucket: int, dtype: torch.dtype, w_dtype: torch.dtype
) -> LinearTuning | None:  # fmt: skip
    """tuned_for this device's card, looked up once per shape (calls run per layer per step)."""
    key = shape_key(n, k, bucket, dtype, w_dtype)
    return tuned_for(torch.cuda.get_device_name(device), key)


CODE_DTYPES = (FP8_DTYPE, torch.int8)  # a QuantizedWeight's codes the kernel loads


def _codes(w: Weight) -> torch.Tensor:
    """The tensor the kernel streams: w itself, or a quantized w's codes."""
    return w.codes if isinstance(w, QuantizedWeight) else w


def _kernel_takes(x: torch.Tensor, w: Weight) -> bool:
    """Whether the untuned call runs the kernel: few rows of half-precision, rows contiguous,
    w of x's dtype or quantized (FP8 or INT8 codes)."""
    codes = _codes(w)
    return (
        x.dim() == 2
        and codes.dim() == 2
        and 1 <= x.shape[0] <= MAX_M
        and x.shape[1] == codes.shape[1]
        and x.dtype in (torch.float16, torch.bfloat16)
        and (codes.dtype in CODE_DTYPES if isinstance(w, QuantizedWeight) else w.dtype == x.dtype)
        and x.device == codes.device
        and x.stride(1) == 1
        and codes.stride(1) == 1
    )


def tma_fits(tuning: LinearTuning, n: int, k: int) -> bool:
    """Whether a config's tiles can arrive by TMA for n columns of y and K = k: dot tiles of at
    most 256 columns (a TMA box's limit) that tile w exactly."""
    return (
        tuning.dot and tuning.block_k <= 256 and k % tuning.block_k == 0 and n % tuning.block_n == 0
    )


def _tma_descriptors(
    x: torch.Tensor, w: torch.Tensor, tuning: LinearTuning | None, n: int, bucket: int
) -> tuple[TensorDescriptor, TensorDescriptor] | tuple[None, None]:
    """TMA descriptors of x and w for a tma config's tiles (x's padded to max(16, bucket) rows),
    where the card has TMA (sm_90+) and the tiles tile w exactly (n: the launch's columns, half
    w's rows with SwiGLU, whose up tiles start n rows further); else Nones (pointer loads)."""
    if (
        tuning is None
        or not tuning.tma
        or x.device.type != "cuda"
        or capability(x.device) < (9, 0)
        or not tma_fits(tuning, n, w.shape[1])
        or x.data_ptr() % 16
        or w.data_ptr() % 16
        or x.stride(0) * x.element_size() % 16
        or w.stride(0) * w.element_size() % 16
    ):
        return None, None
    return (
        TensorDescriptor.from_tensor(x, [max(16, bucket), tuning.block_k]),
        TensorDescriptor.from_tensor(w, [tuning.block_n, tuning.block_k]),
    )


def _scaled_mm_takes(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether torch._scaled_mm's row-wise FP8 GEMM runs x's shape: CUDA sm_89+, bf16 output
    (its only row-wise one), K and N multiples of 16 (cuBLASLt's FP8 alignment)."""
    return (
        x.device.type == "cuda"
        and capability(x.device) >= (8, 9)
        and x.dtype == torch.bfloat16
        and codes.shape[0] % 16 == 0
        and codes.shape[1] % 16 == 0
    )


def product_w8a8(
    x: torch.Tensor, w: QuantizedWeight, norm: Norm | None = None
) -> torch.Tensor:  # fmt: skip
    """y [M, N] in x's dtype = (rms_norm(x) * g) @ w.T, W8A8: the input quantized per token to
    FP8 by one kernel (act_quant, the norm fused), then torch._scaled_mm (row-wise scales, fp32
    accumulation, one rounding to bf16) where it runs, else the same grid in fp32 torch."""
    codes_x, scale_x = quantize_rows_fp8(x, norm)  # [M, K] fp8, [M, 1] fp32
    if _scaled_mm_takes(x, w.codes):
        return torch._scaled_mm(codes_x, w.codes.t(), scale_a=scale_x,
                                scale_b=w.scale.reshape(1, -1), out_dtype=x.dtype)  # fmt: skip
    y = (codes_x.float() @ w.codes.float().t()) * scale_x * w.scale.t()
    return y.to(x.dtype)


def product_weight_only(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """y [M, N] in x's dtype = x @ (codes * scale).T by cuBLAS on the codes converted to x's
    dtype, the scale applied to the product: codes are exact in fp16/bf16 (E4M3 and INT8 both),
    so the only roundings are the output's (two: the GEMM's, the scaled one), where a weight
    dequantized to x's dtype first would round every weight. The conversion costs a
    temporary of the weight in x's dtype per call (prefill only: decode runs the kernel)."""
    y = F.linear(x, w.codes.to(x.dtype))
    return (y * w.scale.t()).to(x.dtype)


def linear_torch(
    x: torch.Tensor, w: Weight, residual: torch.Tensor | None = None,
    norm: Norm | None = None, swiglu: bool = False, out: torch.Tensor | None = None,
    squares: RowSquares | None = None, squares_out: RowSquares | None = None,
) -> torch.Tensor:  # fmt: skip
    """`linear` where the skinny kernel does not run: the norm kernel, cuBLAS, the SiLU-and-mul
    kernel (the residual added by cuBLAS's epilogue in half precision, straight into out when
    out is the residual: no copy of it first; in fp32 exactly as linear_ref adds it, so the
    engine's fp32 runs stay exact). squares and squares_out are not used: the norm kernel sums
    its rows itself. A quantized w by the module's rule: FP8 above MAX_M rows `product_w8a8`
    (the norm fused into the activations' quantization), else `product_weight_only`."""
    if isinstance(w, QuantizedWeight):
        if w.scheme == "fp8" and x.shape[0] > MAX_M:
            y = product_w8a8(x, w, norm)
        else:
            y = product_weight_only(x if norm is None else rms_norm(x, *norm)[0], w)
        return _finish(silu_and_mul(y) if swiglu else y, residual, out)
    if norm is not None:
        x = rms_norm(x, *norm)[0]
    if swiglu:
        y = silu_and_mul(F.linear(x, w))
    elif residual is not None and x.dtype != torch.float32:
        return torch.addmm(residual, x, w.t(), out=out)  # type: ignore[arg-type]
    else:
        y = F.linear(x, w)
    return _finish(y, residual, out)


def linear(
    x: torch.Tensor, w: Weight, tuning: LinearTuning | None = None,
    residual: torch.Tensor | None = None, norm: Norm | None = None, swiglu: bool = False,
    out: torch.Tensor | None = None, squares: RowSquares | None = None,
    squares_out: RowSquares | None = None,
) -> torch.Tensor:  # fmt: skip
    """Triton version of `linear_ref`: y [M, N] (swiglu: [M, N / 2]) in x.dtype, fp32
    accumulation.

    The kernel runs for 1..MAX_M rows of fp16/bf16 with the card's measured config for the shape
    (TUNED_FILE) or else autotuned on CUDA, once per (N, K, M bucket, dtype), in the first call:
    make it before any graph capture. `linear_torch` takes everything else, fp32 included. An
    explicit `tuning` forces the kernel with that config for any dtype (tests, benchmarks); one
    with split_k > 1 met inside a graph capture before its counters exist runs unsplit.
    residual: added in the epilogue (one rounding of the fp32 sum). norm: with a config that does
    not split K, x tiles are scaled by the norm's weight as they load, x's squares summed on the
    way, and the rows scaled by 1 / rms at the end (rounded once, where rms_norm then linear
    round twice); a split or norm_first config runs the norm kernel first. swiglu: with a
    config that does not split K and whose half of block_n still makes a tensor-core tile (or
    gemv), a program takes block_n / 2 gate rows and their up rows and writes silu(gate) * up;
    else the plain launch, then the SiLU-and-mul kernel (as with an autotuned shape). out: where
    y goes (it may be residual: every element of the residual is read by the program that then
    writes it; a split-K config's programs read it before the last of them writes y).
    squares: with norm=(None, eps), x's rows' sums of squares as the launch that wrote
    x left them (RowSquares): if filled, every dot config takes the norm from them (split ones
    too, no norm kernel). squares_out: filled with y's rows' sums of squares when the launch
    has a known config (not while the autotuner is still choosing). Neither at one row.
    w quantized (QuantizedWeight, FP8 codes at up to MAX_M rows, INT8 codes): the kernel streams
    the codes and scales each row in the epilogue; a norm's gain g (kept apart from the codes)
    multiplies w's tiles (the gemv path: x's), and handed-in squares serve with a gain too.
    Above MAX_M rows `linear_torch` (W8A8 for FP8). The module docstring states the rule.
    """
    n_out = w.shape[0] // 2 if swiglu else w.shape[0]
    if residual is not None:
        assert residual.shape == (x.shape[0], n_out) and residual.dtype == x.dtype
        assert residual.stride(1) == 1 and residual.device == x.device
    assert not swiglu or w.shape[0] % 2 == 0, "SwiGLU: gate and up rows, as many of each"
    if out is not None:
        assert out.shape == (x.shape[0], n_out) and out.dtype == x.dtype
        assert out.stride(1) == 1 and out.device == x.device
    if tuning is None and not _kernel_takes(x, w):
        return linear_torch(x, w, residual, norm, swiglu, out)
    quantized = isinstance(w, QuantizedWeight)
    codes = _codes(w)  # [N, K]: w, or its FP8/INT8 codes
    scale = w.scale.view(-1) if isinstance(w, QuantizedWeight) else None  # fp32 [N]
    # row squares pass between launches of several rows; at one row the kernel sums x's squares
    # itself, whatever its config (the gemv configs cannot take them). A gain on quantized codes
    # leaves x unscaled, so x's squares serve then too
    handing = x.shape[0] > 1
    takes_sq = norm is not None and (norm[0] is None or quantized)
    sq_in = squares.parts if squares is not None and takes_sq else None
    sq_in = sq_in if handing else None
    if sq_in is not None:
        assert sq_in.dtype == torch.float32 and sq_in.dim() == 2 and sq_in.is_contiguous()
        assert sq_in.shape[1] == x.shape[0] and sq_in.device == x.device
    m, k = x.shape
    n = codes.shape[0]
    assert codes.shape[1] == k and codes.device == x.device
    assert codes.dtype in CODE_DTYPES if quantized else codes.dtype == x.dtype
    assert x.stride(1) == 1 and codes.stride(1) == 1, "rows of x and w contiguous"
    if scale is not None:
        assert scale.dtype == torch.float32 and scale.shape == (n,) and scale.stride(0) == 1
    assert 1 <= m <= MAX_M and (tuning is None or tuning.dot or m == 1)
    bucket = triton.next_power_of_2(m)
    on_cpu = x.device.type == "cpu"
    tuned_key = (n, k, bucket, x.dtype, codes.dtype)
    if tuning is None:
        tuning = _CPU_TUNING if on_cpu else _tuned_on(x.device, *tuned_key)
    if swiglu and (tuning is None or tuning.split_k > 1 or (tuning.dot and tuning.block_n < 32)):
        # no fused launch for this config: the plain product, then SiLU-and-mul
        product = linear(x, w, tuning, norm=norm, squares=squares)
        return _finish(silu_and_mul(product), residual, out)
    if swiglu:
        assert tuning is not None
        tuning = dataclasses.replace(tuning, block_n=tuning.block_n // 2)
        n = n_out
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    scratch = None
    if tuning is None and not on_cpu:
        if tuned_key in _TUNED or not torch.cuda.is_current_stream_capturing():
            pays = [t for t in TUNING if _split_pays(n, k, t.block_n, t.split_k)]
            scratch = _split_scratch(x.device, m, n, pays)
        if scratch is None:  # None: counters missing inside a capture (tuned elsewhere)
            tuning = _CAPTURE_TUNING
    if tuning is not None:
        scratch = _split_scratch(x.device, m, n, [tuning])
        if scratch is None:
            tuning = dataclasses.replace(tuning, split_k=1)
            scratch = None, None
    assert scratch is not None
    if (
        sq_in is None
        and norm is not None
        and (tuning is None or tuning.split_k > 1 or tuning.norm_first)
    ):  # a split program sees part of K, and summing x's squares needs all of it
        x, norm = rms_norm(x, *norm)[0], None
    g, eps = norm if norm is not None else (None, 0.0)
    if g is not None:
        assert g.shape == (k,) and g.stride(0) == 1 and g.device == x.device
    stride_r = residual.stride(0) if residual is not None else 0
    sq_out = None
    if squares_out is not None and tuning is not None and handing:
        sq_out = torch.empty((triton.cdiv(n, tuning.block_n), m), dtype=torch.float32,
                             device=x.device)  # fmt: skip
        squares_out.parts = sq_out
    sq_blocks = sq_in.shape[0] if sq_in is not None else 1
    # quantized tiles arrive by pointer loads (their TMA path is untested)
    descs = (None, None) if quantized else _tma_descriptors(x, codes, tuning, n, bucket)
    args = (x, codes, y, *scratch, residual, g, scale, sq_in, sq_out, *descs, sq_blocks, m, n, k,
            x.stride(0), codes.stride(0), y.stride(0), stride_r, eps, bucket,
            max(16, bucket))  # fmt: skip
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    flags = dict(DOT_PRECISION=precision, HAS_RESIDUAL=residual is not None, NORM=norm is not None,
                 GAIN=g is not None, SQ_IN=sq_in is not None,
                 SQ_BLOCKS=triton.next_power_of_2(sq_blocks), SQ_OUT=sq_out is not None,
                 SWIGLU=swiglu, SCALED=quantized, TMA=descs[0] is not None,
                 LINE_COLS=128 // codes.element_size(), **pdl_args(x.device))  # fmt: skip

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    if tuning is None:
        _linear_tuned[grid](*args, **flags)
        _TUNED.add(tuned_key)
        return y
    options = {} if on_cpu else tuning.options()
    _linear_kernel[grid](*args, **flags, **tuning.meta(), **options)
    return y
