"""GPU benchmark of kernels/ against the card's ceilings and torch's own implementations.

    python benchmarks/bench_kernels.py [--sweep] [--prefill-sweep] [--prefill-only]
        [--linear-only] [--results benchmarks/RESULTS.md]

The linear rows include FP8 and INT8 weights (bench_linear_quant) against the copy floor and the
library peers (torch._scaled_mm, torch._weight_int8pack_mm).

Ceilings are measured in the same run: device copy bandwidth (read + write bytes / time) and bf16
matmul TFLOP/s. Times are triton.testing.do_bench medians. The table is printed and written to
the "Kernels" section of the results file (card, date, commit).
"""

import argparse
import datetime
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from common import commit, write_section
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvmesh.kernels.act_quant import quantize_rows_fp8
from kvmesh.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvmesh.kernels.decode_attention import DecodeTuning, decode_attention, decode_attention_ref
from kvmesh.kernels.first_chunk_attention import first_chunk_attention, supported
from kvmesh.kernels.kv_write import write_kv
from kvmesh.kernels.linear import _linear_tuned, linear, linear_ref, shape_key, tuned_for
from kvmesh.kernels.prefill_attention import (
    TUNING,
    PrefillTuning,
    _prefill,
    _prefill_tuned,
    prefill_attention,
    prefill_attention_ref,
)
from kvmesh.kernels.quant import QuantizedWeight, quantize_weight
from kvmesh.kernels.rms_norm import rms_norm, rms_norm_ref
from kvmesh.kernels.rope import Llama3RopeScaling, apply_rope, apply_rope_ref, rope_cos_sin
from kvmesh.kernels.rope_kv import rope_write_kv

BF16 = torch.bfloat16
DEV = "cuda"


def ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


@dataclass
class Row:
    op: str
    impl: str
    time_ms: float
    rate: float  # TFLOP/s or GB/s
    unit: str
    of_ceiling: float  # fraction of the matching ceiling
    target: str = ""

    def line(self) -> str:
        return (
            f"| {self.op} | {self.impl} | {self.time_ms:.4f} | {self.rate:,.1f} {self.unit} "
            f"| {100 * self.of_ceiling:.0f}% | {self.target} |"
        )


def copy_ceiling() -> float:
    """Device copy bandwidth, GB/s of bytes read + written."""
    x = torch.empty(1 << 29, dtype=torch.uint8, device=DEV).random_()  # 512 MiB
    y = torch.empty_like(x)
    return 2 * x.numel() / ms(lambda: y.copy_(x)) / 1e6


def ceilings() -> tuple[float, float]:
    copy_gbs = copy_ceiling()
    a = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    b = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    mm_tflops = 2 * 8192**3 / ms(lambda: a @ b) / 1e9
    return copy_gbs, mm_tflops


def paged(ctx: int, batch: int, page: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """A shuffled paged cache holding `batch` contexts of `ctx` tokens: (kv_layer, table)."""
    nblk = batch * ctx // page
    kv = torch.randn(2, nblk + 16, page, kv_heads, dim, dtype=BF16, device=DEV)
    table = torch.randperm(nblk, device=DEV).view(batch, ctx // page).int()
    return kv, table


# prefill launch configs timed by --prefill-sweep. What the kernel's SASS (triton 3.6, sm_90a,
# offline) shows for each, on the benchmark shape (GQA 4, page 16, d128):
# - M128 N64 8 warps, maxnreg 128 (the default): two programs an SM, but ptxas serializes every
#   wgmma (too few registers: C7512) and spills ~100 bytes; 441 instructions a 64-key tile.
#   lean: 402; lazy+lean: 348 when no row max moves (the usual case after the first tiles).
# - M128 N32 8 warps, maxnreg 128: two programs an SM with no spills and unserialized wgmma;
#   291 instructions a 32-key tile, 223 with lazy+lean.
# - M64 4 warps (one warpgroup a program, so no barrier ties two warpgroups): N32 maxnreg 168 or
#   128 fits three or four programs an SM, N64 (200 registers) two; twice the K/V traffic per
#   FLOP of M128. ptxas serializes their wgmma with lazy (C7515), so these are lean only.
# - M256 16 warps maxnreg 128: one program an SM, half the K/V traffic of two M128 programs.
# - M128 N128 8 warps, no cap: one program an SM (the best such config measured 338 TFLOP/s).
PREFILL_SWEEP: list[PrefillTuning] = [
    *TUNING,
    PrefillTuning(128, 128, 8, 2),
    PrefillTuning(128, 128, 8, 2, pack_group=False),
    PrefillTuning(128, 128, 8, 3),
    PrefillTuning(128, 64, 8, 3),
    PrefillTuning(64, 64, 4, 2),
    PrefillTuning(64, 64, 4, 3, pack_group=False),
    PrefillTuning(128, 64, 8, 2, pack_group=False, maxnreg=128),
    PrefillTuning(128, 64, 8, 3, maxnreg=128),
    PrefillTuning(128, 32, 8, 3, maxnreg=128),
    PrefillTuning(64, 32, 4, 3, maxnreg=128),
    # new: lazy rescaling and lean indexing
    PrefillTuning(128, 64, 8, 2, maxnreg=128, lean_index=True),
    PrefillTuning(128, 64, 8, 2, maxnreg=128, lazy_rescale=True),
    PrefillTuning(128, 64, 8, 2, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 64, 8, 3, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 64, 8, 3, pack_group=False, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 32, 8, 3, maxnreg=128, lean_index=True),
    PrefillTuning(128, 32, 8, 3, maxnreg=128, lazy_rescale=True),
    PrefillTuning(128, 32, 8, 3, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 32, 8, 2, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 32, 8, 3, pack_group=False, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(64, 32, 4, 3, maxnreg=168, lean_index=True),
    PrefillTuning(64, 32, 4, 2, maxnreg=168, lean_index=True),
    PrefillTuning(64, 32, 4, 2, maxnreg=128, lean_index=True),
    PrefillTuning(64, 64, 4, 2, lean_index=True),
    PrefillTuning(256, 32, 16, 3, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(256, 64, 16, 2, maxnreg=128, lazy_rescale=True, lean_index=True),
    PrefillTuning(128, 128, 8, 2, lazy_rescale=True, lean_index=True),
]


def prefill_variant_error(tuning: PrefillTuning) -> float:
    """Relative error of one launch config on a mixed bf16 batch (GQA 4, page 16, d128)."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    seqs = [(300, 300), (160, 2000), (1, 1500), (37, 101)]
    page, heads, kv_heads, dim = 16, 8, 2, 128
    need = [(c + page - 1) // page for _, c in seqs]
    kv = torch.randn(2, sum(need) + 4, page, kv_heads, dim, generator=gen, device=DEV).to(BF16)
    ids = torch.randperm(sum(need), generator=gen, device=DEV).int()
    table = torch.full((len(seqs), max(need)), -1, dtype=torch.int32, device=DEV)
    for b, blk in enumerate(torch.split(ids, need)):
        table[b, : blk.numel()] = blk
    q = torch.randn(sum(n for n, _ in seqs), heads, dim, generator=gen, device=DEV).to(BF16)
    cu = torch.tensor([0, *torch.tensor([n for n, _ in seqs]).cumsum(0).tolist()],
                      dtype=torch.int32, device=DEV)  # fmt: skip
    lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEV)
    want = prefill_attention_ref(q.float(), kv[0].float(), kv[1].float(), table, cu, lens, 0.09)
    got = _prefill(q, kv[0], kv[1], table, cu, lens, 0.09, tuning=tuning).float()
    return float((got - want).norm() / want.norm())


# q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale
PrefillArgs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                    torch.Tensor, float]  # fmt: skip


def prefill_sweep(args: PrefillArgs, want: torch.Tensor, flops: float, sdpa_ms: float) -> None:
    """Time and check every PREFILL_SWEEP config; a summary, fastest first, at the end."""
    print("prefill sweep: config | rel. error mixed batch vs fp32 ref | 4k vs SDPA: rel. error, "
          "max abs error | ms | TFLOP/s | x SDPA default", flush=True)  # fmt: skip
    done: list[tuple[float, str]] = []
    for tuning in PREFILL_SWEEP:
        try:
            err = prefill_variant_error(tuning)
            out = _prefill(*args, tuning=tuning).float()
            err4k = float((out - want).norm() / want.norm())
            max_abs = float((out - want).abs().max())
            t = ms(functools.partial(_prefill, *args, tuning=tuning))
            line = (f"{tuning.label()} | {err:.2e} | {err4k:.2e}, {max_abs:.2e} | {t:.4f} | "
                    f"{flops / t / 1e9:.0f} | {sdpa_ms / t:.2f}")  # fmt: skip
            done.append((t, line))
        except Exception as exc:  # noqa: BLE001 (a config that fails to build or run)
            line = f"{tuning.label()} | failed ({type(exc).__name__}: {str(exc)[:200]})"
        print("  " + line, flush=True)
    print("prefill sweep, fastest first:")
    for _, line in sorted(done)[:10]:
        print("  " + line)


def bench_prefill(rows: list[Row], mm: float, sweep: bool) -> None:
    seq, heads, kv_heads, dim = 4096, 32, 8, 128
    flops = 2 * seq * seq * dim * heads  # 4 * S^2 * D * H / 2 (causal)
    kv, table = paged(seq, 1, 16, kv_heads, dim)
    q = torch.randn(seq, heads, dim, dtype=BF16, device=DEV)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
    lens = torch.tensor([seq], dtype=torch.int32, device=DEV)
    scale = dim**-0.5

    def add(impl: str, t: float, target: str = "") -> None:
        rows.append(Row("prefill attn causal 4k, 32q/8kv, d128", impl, t, flops / t / 1e9,
                        "TFLOP/s", flops / t / 1e9 / mm, target))  # fmt: skip

    # torch: contiguous [1, H, S, D] K/V (no paging), GQA expanded up front
    qt = q.transpose(0, 1).unsqueeze(0)
    k = kv[0][table[0].long()].flatten(0, 1).transpose(0, 1).repeat_interleave(4, 0).unsqueeze(0)
    v = kv[1][table[0].long()].flatten(0, 1).transpose(0, 1).repeat_interleave(4, 0).unsqueeze(0)
    sdpa_ms = ms(lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True))
    add("torch SDPA, default backend", sdpa_ms)
    for name, backend in [("torch SDPA flash", SDPBackend.FLASH_ATTENTION),
                          ("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)]:  # fmt: skip
        try:
            with sdpa_kernel(backend):
                t = ms(lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True))
            add(name, t)
        except RuntimeError as exc:
            print(f"{name}: unavailable ({str(exc).splitlines()[0]})")
    print("SDPA backend order:", sdpa_order())
    args: PrefillArgs = (q, kv[0], kv[1], table, cu, lens, scale)
    want = F.scaled_dot_product_attention(qt, k, v, is_causal=True)[0].transpose(0, 1).float()
    if sweep:
        prefill_sweep(args, want, flops, sdpa_ms)
    out = prefill_attention(*args).float()
    print(f"prefill rel. error at 4k vs SDPA: {float((out - want).norm() / want.norm()):.2e}")
    add("kvmesh Triton (paged: later chunks, reused prefixes)",
        ms(lambda: prefill_attention(*args)))  # fmt: skip
    # first chunks (the engine's path for fresh prompts on sm_90): q, k, v from the fused qkv
    qkv = torch.cat([q.flatten(1), kv[0][table[0].long()].flatten(0, 1).flatten(1),
                     kv[1][table[0].long()].flatten(0, 1).flatten(1)], dim=1)  # fmt: skip
    fq = qkv[:, : heads * dim].view(seq, heads, dim)
    fk = qkv[:, heads * dim : (heads + kv_heads) * dim].view(seq, kv_heads, dim)
    fv = qkv[:, (heads + kv_heads) * dim :].view(seq, kv_heads, dim)
    if supported(fq, fk, fv):
        first = first_chunk_attention(fq, fk, fv, cu, seq, scale).float()
        print(f"first-chunk rel. error at 4k vs SDPA: "
              f"{float((first - want).norm() / want.norm()):.2e}")  # fmt: skip
        add("kvmesh Gluon first chunk (sm_90)",
            ms(lambda: first_chunk_attention(fq, fk, fv, cu, seq, scale)),
            ">= 350 TFLOP/s, > SDPA default")  # fmt: skip
    else:
        print("first-chunk attention: not supported here (needs sm_90 and Gluon)")
    print("prefill autotune pick:", _prefill_tuned.best_config)
    timings = getattr(_prefill_tuned, "configs_timings", None) or {}
    for cfg, t in sorted(timings.items(), key=lambda kv_: kv_[1][0]):
        print(f"  {cfg}: {t[0]:.4f} ms = {flops / t[0] / 1e9:.0f} TFLOP/s")


def bench_decode(rows: list[Row], copy_gbs: float, sweep: bool) -> None:
    batch, ctx, heads, kv_heads, dim, page = 64, 4096, 32, 8, 128, 16
    kv, table = paged(ctx, batch, page, kv_heads, dim)
    q = torch.randn(batch, heads, dim, dtype=BF16, device=DEV)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    nbytes = 2 * batch * ctx * kv_heads * dim * 2  # K and V read once

    def add(impl: str, t: float, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row("paged decode attn b64 ctx4k blk16", impl, t, gbs, "GB/s",
                        gbs / copy_gbs, target))  # fmt: skip

    kc = kv[0][table.long()].flatten(1, 2).transpose(1, 2).contiguous()  # [B, Hk, S, D]
    vc = kv[1][table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qs = q.unsqueeze(2)
    add("torch SDPA, contiguous cache",
        ms(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)))  # fmt: skip
    scale = dim**-0.5
    args = (q, kv[0], kv[1], table, lens, scale)
    add("torch gather + SDPA (ref)", ms(lambda: decode_attention_ref(*args)))
    add("kvmesh Triton (paged)", ms(lambda: decode_attention(*args)), ">= 75% of copy")
    if sweep:
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    for min_split in (256, 512):
                        tn = DecodeTuning(block_n=bn, num_warps=warps, num_stages=stages,
                                          min_split=min_split)  # fmt: skip
                        t = ms(functools.partial(decode_attention, *args, tuning=tn))
                        print(f"  decode {tn}: {t:.4f} ms = {nbytes / t / 1e6:,.0f} GB/s")


def bench_fused(rows: list[Row], copy_gbs: float) -> None:
    tokens, hidden = 8192, 4096

    def add(op: str, impl: str, t: float, nbytes: int, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row(op, impl, t, gbs, "GB/s", gbs / copy_gbs, target))

    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=BF16, device=DEV)
    nbytes = 4 * x.numel() * 2  # read x, residual; write normed, new residual
    op = "rms-norm + residual 8192x4096"
    add(op, "torch eager", ms(lambda: rms_norm_ref(x, w, 1e-5, res)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: rms_norm(x, w, 1e-5, res)), nbytes, ">= 80% of copy")

    heads, kv_heads, dim = 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=BF16, device=DEV)
    qv = qkv[:, : heads * dim].view(tokens, heads, dim)
    kv = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    cos_sin = rope_cos_sin(dim, 8192, 500000.0, scaling, DEV)
    pos = torch.randperm(8192, device=DEV)[:tokens]
    nbytes = 2 * (qv.numel() + kv.numel()) * 2 + tokens * dim * 4  # q, k in + out; cos/sin rows
    op = "rope q+k in place 8192x(32+8)x128"
    add(op, "torch eager", ms(lambda: apply_rope_ref(qv, kv, pos, cos_sin)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: apply_rope(qv, kv, pos, cos_sin)), nbytes,
        ">= 80% of copy")  # fmt: skip

    # the fused RoPE + KV write (the model's op): q, k in place; k, v into shuffled cache slots
    vv = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    cache = torch.empty(2, tokens // 16 + 1, 16, kv_heads, dim, dtype=BF16, device=DEV)
    slots = torch.randperm(cache.shape[1] * 16, device=DEV)[:tokens]
    nbytes += 2 * vv.numel() * 2 + kv.numel() * 2  # v in; k and v out to the cache

    def unfused() -> None:
        apply_rope(qv, kv, pos, cos_sin)
        write_kv(kv, vv, cache[0], cache[1], slots)

    def fused() -> None:
        rope_write_kv(qv, kv, vv, pos, cos_sin, cache[0], cache[1], slots)

    op = "rope + KV write 8192x(32+8+8)x128"
    add(op, "kvmesh rope, then write_kv", ms(unfused), nbytes)
    add(op, "kvmesh fused", ms(fused), nbytes, ">= 80% of copy")

    gu = torch.randn(tokens, 2 * hidden, dtype=BF16, device=DEV)
    nbytes = 3 * tokens * hidden * 2
    op = "silu-and-mul 8192x(2x4096)"
    add(op, "torch eager", ms(lambda: silu_and_mul_ref(gu)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: silu_and_mul(gu)), nbytes, ">= 80% of copy")


# Llama-3-8B's projections (N, K): at decode batch sizes each is a stream of its bf16 weight
LINEAR_SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                 ("down", 4096, 14336), ("lm_head", 128256, 4096)]  # fmt: skip


def bench_linear(rows: list[Row], copy_gbs: float) -> None:
    """Skinny linear vs cuBLAS at M = 1 and 16; rate = weight bytes / time (x and y are tiny)."""

    def add(op: str, impl: str, t: float, nbytes: int, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row(op, impl, t, gbs, "GB/s", gbs / copy_gbs, target))

    for name, n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, dtype=BF16, device=DEV)
        nbytes = n * k * 2
        for m in (1, 16, 64):
            x = torch.randn(m, k, dtype=BF16, device=DEV)
            op = f"linear {name} M{m} [{n}, {k}], weight bytes"
            add(op, "torch F.linear (cuBLAS)", ms(functools.partial(F.linear, x, w)), nbytes)
            want = F.linear(x, w).float()
            err = float((linear(x, w).float() - want).norm() / want.norm())  # tunes the shape
            # the card's table entry if it has one (no autotuning then), else the autotuner's pick
            table = tuned_for(torch.cuda.get_device_name(), shape_key(n, k, m, BF16))
            pick = table or getattr(_linear_tuned, "best_config", None)
            print(f"linear {name} M{m}: rel. error vs cuBLAS {err:.2e}; "
                  f"{'tuned table' if table else 'autotune pick'} {pick}")  # fmt: skip
            timings = {} if table else getattr(_linear_tuned, "configs_timings", None) or {}
            for cfg, t in sorted(timings.items(), key=lambda kv_: kv_[1][0]):
                print(f"  {cfg}: {t[0] * 1e3:.1f} us = {nbytes / t[0] / 1e6:,.0f} GB/s")
            target = ">= 90% of copy" if n * k <= 6144 * 4096 else ">= cuBLAS"
            add(op, "kvmesh Triton skinny", ms(functools.partial(linear, x, w)), nbytes, target)


def bench_linear_quant(rows: list[Row], copy_gbs: float) -> None:
    """FP8 and INT8 weights in the skinny kernel (weight-only, codes streamed) at M = 1, 16, 64
    on the quantized projections (lm_head stays bf16); rate = the bytes actually moved (codes,
    scales, x read; y written) / time. Peers: torch._scaled_mm (FP8 row-wise, x's codes made
    beforehand: the GEMM alone) and torch._weight_int8pack_mm (INT8 weight-only), where the
    build runs them."""

    def add(op: str, impl: str, t: float, nbytes: int, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row(op, impl, t, gbs, "GB/s", gbs / copy_gbs, target))

    for name, n, k in LINEAR_SHAPES[:4]:
        w = torch.randn(n, k, dtype=BF16, device=DEV) / k**0.5
        for scheme in ("fp8", "int8"):
            qw = quantize_weight(w, scheme)
            assert isinstance(qw, QuantizedWeight)
            for m in (1, 16, 64):
                x = torch.randn(m, k, dtype=BF16, device=DEV)
                nbytes = n * k + n * 4 + m * k * 2 + m * n * 2
                op = f"linear {scheme} {name} M{m} [{n}, {k}], bytes moved"
                want = linear_ref(x, qw).float()
                err = float((linear(x, qw).float() - want).norm() / want.norm())  # tunes
                key = shape_key(n, k, m, BF16, qw.codes.dtype)
                table = tuned_for(torch.cuda.get_device_name(), key)
                pick = table or getattr(_linear_tuned, "best_config", None)
                print(f"{op}: rel. error vs linear_ref {err:.2e}; "
                      f"{'tuned table' if table else 'autotune pick'} {pick}")  # fmt: skip
                target = ">= 90% of copy" if m == 1 else ""
                add(op, "kvmesh Triton skinny", ms(functools.partial(linear, x, qw)), nbytes,
                    target)  # fmt: skip
                for impl, peer in _quant_peers(x, qw):
                    try:
                        t = ms(peer)
                    except RuntimeError as exc:  # not in this build or for this shape
                        print(f"{op}: {impl} does not run: {str(exc).splitlines()[0]}")
                        continue
                    add(op, impl, t, nbytes)


def _quant_peers(x: torch.Tensor, qw: QuantizedWeight) -> list[tuple[str, Callable[[], object]]]:
    """The library ops that compute the same product: (label, call)."""
    if qw.scheme == "fp8":
        codes_x, scale_x = quantize_rows_fp8(x)
        scale_w = qw.scale.reshape(1, -1)

        def scaled_mm() -> torch.Tensor:
            return torch._scaled_mm(codes_x, qw.codes.t(), scale_a=scale_x, scale_b=scale_w,
                                    out_dtype=BF16)  # fmt: skip

        def act_and_scaled_mm() -> torch.Tensor:
            codes, scale = quantize_rows_fp8(x)
            return torch._scaled_mm(codes, qw.codes.t(), scale_a=scale, scale_b=scale_w,
                                    out_dtype=BF16)  # fmt: skip

        return [("torch._scaled_mm (FP8 W8A8, GEMM only)", scaled_mm),
                ("kvmesh act quant + torch._scaled_mm", act_and_scaled_mm)]  # fmt: skip
    scales = qw.scale.reshape(-1).to(BF16)
    return [("torch._weight_int8pack_mm (INT8 W8A16)",
             functools.partial(torch._weight_int8pack_mm, x, qw.codes, scales))]  # fmt: skip


def sdpa_order() -> str:
    """The order in which SDPA tries its backends (the first that accepts the inputs runs)."""
    names = {0: "math", 1: "flash", 2: "mem-efficient", 3: "cuDNN", 4: "overrideable"}
    try:
        return ", ".join(names.get(int(i), str(i)) for i in torch._C._get_sdp_priority_order())
    except AttributeError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time every decode tuning variant")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="time and check each prefill config in PREFILL_SWEEP")  # fmt: skip
    parser.add_argument("--prefill-only", action="store_true",
                        help="the prefill rows only (with --prefill-sweep: the sweep), printed; "
                        "the results file is left alone")  # fmt: skip
    parser.add_argument("--linear-only", action="store_true",
                        help="the skinny linear rows (with autotune timings) and the copy "
                        "ceiling only, printed; the results file is left alone")  # fmt: skip
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    if args.linear_only:
        copy_gbs = copy_ceiling()
        rows = [Row("ceiling: device copy (read+write)", "torch copy_ 512 MiB", 0, copy_gbs,
                    "GB/s", 1)]  # fmt: skip
        bench_linear(rows, copy_gbs)
        bench_linear_quant(rows, copy_gbs)
        print(f"{card}; {versions}")
        print("\n".join(r.line() for r in rows))
        return
    copy_gbs, mm = ceilings()
    rows = [
        Row("ceiling: device copy (read+write)", "torch copy_ 512 MiB", 0, copy_gbs, "GB/s", 1),
        Row("ceiling: bf16 matmul 8192^3", "torch matmul (cuBLAS)", 0, mm, "TFLOP/s", 1),
    ]
    bench_prefill(rows, mm, args.prefill_sweep)
    if args.prefill_only:
        print("\n".join(r.line() for r in rows))
        return
    bench_decode(rows, copy_gbs, args.sweep)
    bench_fused(rows, copy_gbs)
    bench_linear(rows, copy_gbs)
    bench_linear_quant(rows, copy_gbs)
    header = [
        "## Kernels",
        "",
        f"Card: {card}; date: {date}; commit: {commit()}; {versions}.",
        "Command: `python benchmarks/bench_kernels.py`. Times: do_bench medians (ms).",
        "% = of the ceiling measured in the same run (bf16 matmul for attention prefill, "
        "device copy bandwidth for the rest).",
        f"SDPA's default backend is the first of ({sdpa_order()}) that takes the inputs.",
        "",
        "| op | implementation | ms | rate | % of ceiling | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    section = "\n".join(header + [r.line() for r in rows]) + "\n"
    print(section)
    write_section(args.results, section)


if __name__ == "__main__":
    main()
