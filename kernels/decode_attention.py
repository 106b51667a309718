"""Paged decode attention: one query token per sequence, at position seq_lens[b] - 1.

GPU: flash-decoding. The context is cut into splits; program (b, kv head, split) loads each
K/V tile once for the whole GQA query group and writes an unnormalised partial output with its
running max and sum; a second kernel merges the splits.

With `new_token` the step's own token is not in the cache yet: every program rotates its q heads
(RoPE) as it loads them, and the split that ends the context takes the token's key and value from
the fused qkv (rotating k), attends to it from registers and writes both to the cache slot (the
others never read that slot), which is what rope_write_kv then attention would do, in one launch.

FP8 cache (kv_scale [2, Hk] fp32; the rule in kernels/kv_write): K and V codes are converted to
q's dtype (exact: every E4M3 value is a bf16, fp16 and fp32 value) and the per-head scales are
folded out of the products, scores = (q . K codes) * K scale and out = (P @ V codes) * V scale /
l, in fp32: the attention of the dequantized cache, up to fp32 rounding. The new token is
quantized as the cache stores it and attended as its codes, as a later step reads it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvmesh.kernels.device import num_sms
from kvmesh.kernels.kv_write import kv_codes, kv_fp8
from kvmesh.kernels.pdl import pdl_args, pdl_enter
from kvmesh.kernels.quant import dequantize_kv_fp8
from kvmesh.kernels.rope import cos_sin_row, rotated_heads
from kvmesh.kernels.rope_kv import rope_write_kv_ref


@dataclass(frozen=True)
class NewToken:
    """Each sequence's token of this step, not yet in the cache: k and v before RoPE ([B, Hk, D],
    views of the fused qkv), its position ([B] int64), the RoPE table ([P, D] fp32, cos then
    sin) and its cache slot ([B] int64; < 0: none)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor
    slot_mapping: torch.Tensor


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    new_token: NewToken | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    # q: [B, H, D]; caches: [num_blocks, block_size, Hk, D]; block_table: [B, max_blocks].
    # new_token: RoPE on q and its k, and its k and v into the cache first (q and k rotated in
    # place here, k and v quantized in place with an FP8 cache; the kernel leaves them as they
    # are). kv_scale: [2, Hk] fp32 with an FP8 cache (read as code * scale, in fp32)
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    if new_token is not None:
        t = new_token
        rope_write_kv_ref(q, t.k, t.v, t.positions, t.cos_sin, k_cache, v_cache, t.slot_mapping,
                          kv_scale=kv_scale)  # fmt: skip
    page = k_cache.shape[1]
    lens = seq_lens.to(q.device).long()
    # one batched gather, padded to the longest context; padding rows re-read position 0 (never
    # a stale slot, which may hold NaNs) and are masked out
    positions = torch.arange(int(lens.max()), device=q.device)
    valid = positions[None, :] < lens[:, None]  # [B, S]
    pos = torch.where(valid, positions[None, :], 0)
    blocks = block_table.long().gather(1, pos // page)
    k = k_cache[blocks, pos % page]  # [B, S, Hk, D]
    v = v_cache[blocks, pos % page]
    if fp8:
        assert kv_scale is not None
        k, v = dequantize_kv_fp8(k, kv_scale[0]), dequantize_kv_fp8(v, kv_scale[1])
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hk, S, D]
    mask = valid[:, None, None, :]  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


@triton.jit
def _halves_joined(a, b):
    """[R, H] and [R, H] -> [R, 2H]: a's columns, then b's."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, o_part_ptr, ml_part_ptr, out_ptr, qk_scale,
    min_split, stride_qb, stride_qh, stride_table, stride_ob, stride_oh,
    stride_k_blk, stride_k_off, stride_k_h, stride_v_blk, stride_v_off, stride_v_h,
    kn_ptr, vn_ptr, pos_ptr, cs_ptr, slot_ptr,  # NEW_TOKEN: the step's k, v, positions, ...
    stride_kn_b, stride_kn_h, stride_vn_b, stride_vn_h, stride_cs, kv_scale_ptr, num_kv_heads,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, NEW_TOKEN: tl.constexpr,
    PDL: tl.constexpr, KV_FP8: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # program (b, kv head, split): the GQA group's GROUP query heads share every K/V tile load
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(lens_ptr + seq)
    # the context is cut on the device, from its real length: NUM_SPLITS pieces of at least
    # min_split keys (whole tiles), so short contexts use fewer splits and the rest stay empty
    split_len = tl.cdiv(tl.maximum(tl.cdiv(ctx, NUM_SPLITS), min_split), BLOCK_N) * BLOCK_N
    key_lo = split * split_len
    key_hi = tl.minimum(key_lo + split_len, ctx)
    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    HALF: tl.constexpr = HEAD_DIM // 2
    if NEW_TOKEN:  # q rotated as it loads (rounded to q's dtype, as rope_write_kv stores it)
        cos, sin = cos_sin_row(pos_ptr, cs_ptr, seq, stride_cs, HALF)
        q1, q2 = rotated_heads(q_ptr + kv_head * GROUP * stride_qh, stride_qb, stride_qh, GROUP,
                               cos, sin, seq.to(tl.int64), HALF, GROUP_PAD)  # fmt: skip
        q = _halves_joined(q1, q2)  # [GROUP_PAD, HEAD_DIM]
        # the token's key: this program's split ends the context, the others never reach it
        owns = (key_lo < ctx) & (key_hi == ctx)
        cache_hi = tl.where(owns, ctx - 1, key_hi)
    else:
        q_off = seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_off, mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
        cache_hi = key_hi
    k_base = k_ptr + kv_head * stride_k_h
    v_base = v_ptr + kv_head * stride_v_h
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    if KV_FP8:  # the head's scales, folded out of the products (module docstring)
        k_scale = tl.load(kv_scale_ptr + kv_head)
        v_scale = tl.load(kv_scale_ptr + num_kv_heads + kv_head)
        qk_scale = qk_scale * k_scale

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(key_lo, cache_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        live = keys < cache_hi
        page = tl.load(table_row + keys // PAGE, mask=live, other=0).to(tl.int64)
        k_rows = page * stride_k_blk + (keys % PAGE) * stride_k_off
        v_rows = page * stride_v_blk + (keys % PAGE) * stride_v_off
        k = tl.load(k_base + k_rows[None, :] + dims[:, None], mask=live[None, :], other=0.0)
        k = k.to(q.dtype)  # FP8 codes: exact; else no-op
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=live[:, None], other=0.0)
        v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    if NEW_TOKEN:  # noqa: SIM102 (a compile-time branch around a runtime one)
        if owns:
            seq64 = seq.to(tl.int64)
            k1, k2 = rotated_heads(kn_ptr + kv_head * stride_kn_h, stride_kn_b, 0, 1, cos, sin,
                                   seq64, HALF, 1)  # [1, HALF] each, rotated  # fmt: skip
            v_new = tl.load(vn_ptr + seq64 * stride_vn_b + kv_head * stride_vn_h + dims)
            if KV_FP8:  # the codes the cache gets, attended as codes (scales folded out)
                k1 = kv_codes(k1, k_scale, ROUND_IN_FP32)
                k2 = kv_codes(k2, k_scale, ROUND_IN_FP32)
                v_new = kv_codes(v_new, v_scale, ROUND_IN_FP32)
            k_new = _halves_joined(k1, k2).to(tl.float32)  # [1, HEAD_DIM]
            s_new = tl.sum(q.to(tl.float32) * k_new, axis=1) * qk_scale  # [GROUP_PAD]
            m_new = tl.maximum(m_i, s_new)
            p_new = tl.math.exp2(s_new - m_new)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
            slot = tl.load(slot_ptr + seq)
            if slot >= 0:  # the key and value into the cache, for the steps to come
                block, offset = slot // PAGE, slot % PAGE
                half = tl.arange(0, HALF)[None, :]
                kc = k_base + block * stride_k_blk + offset * stride_k_off + half
                tl.store(kc, k1.to(k_ptr.dtype.element_ty))
                tl.store(kc + HALF, k2.to(k_ptr.dtype.element_ty))
                vc = v_base + block * stride_v_blk + offset * stride_v_off + dims
                tl.store(vc, v_new.to(v_ptr.dtype.element_ty))

    if KV_FP8:
        acc = acc * v_scale
    ok = g < GROUP
    if NUM_SPLITS == 1:  # the whole context: the output itself (what the merge would compute)
        o_off = seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        out = acc / l_i[:, None]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=ok[:, None])
    else:  # partials; an else, not code after a return: with one split their pointers are
        # None, and Triton 3.6 on sm_90 compiled code after a constexpr-branch return
        # o_part [B, H, NUM_SPLITS, HEAD_DIM] (unnormalised), ml_part [B, H, NUM_SPLITS, 2]
        part = (seq.to(tl.int64) * NUM_HEADS + heads) * NUM_SPLITS + split  # [GROUP_PAD]
        tl.store(o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=ok[:, None])
        tl.store(ml_part_ptr + part * 2, m_i, mask=ok)
        tl.store(ml_part_ptr + part * 2 + 1, l_i, mask=ok)


@triton.jit
def _decode_merge_kernel(
    o_part_ptr, ml_part_ptr, out_ptr, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    # out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; empty splits have m = -inf, l = 0
    seq, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + splits
    ok = splits < NUM_SPLITS
    m = tl.load(ml_part_ptr + part * 2, mask=ok, other=float("-inf"))
    l_s = tl.load(ml_part_ptr + part * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)  # split 0 is never empty (ctx >= 1), so this is finite
    w = tl.where(ok & (l_s > 0), tl.math.exp2(m - m_max), 0.0)
    acc_ptr = o_part_ptr + part[:, None] * HEAD_DIM + dims[None, :]
    acc = tl.load(acc_ptr, mask=ok[:, None], other=0.0)  # [SPLITS_PAD, HEAD_DIM]
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)
    o_off = seq.to(tl.int64) * stride_ob + head * stride_oh + dims
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))


@dataclass(frozen=True)
class DecodeTuning:
    # Tuned for the batch-64 decode step inside CUDA graphs (H100 sweeps, bf16, d128, GQA 4):
    # short tiles, one split a sequence at batch 64 (no merge work), 4 warps
    # (benchmarks/RESULTS.md, "Constants the code cites")
    block_n: int = 32  # keys per tile
    min_split: int = 64  # fewest keys per split on GPU (short contexts at small batches)
    waves: int = 2  # aim for this many programs per multiprocessor
    num_warps: int = 4
    num_stages: int = 3


def _num_splits(
    batch: int, num_kv_heads: int, max_ctx: int, device: torch.device, t: DecodeTuning
) -> tuple[int, int]:
    """(splits per sequence, fewest keys per split). Enough programs to fill the card several
    times over, but splits of at least min_split keys (a split's fixed cost is its q load and a
    partial write). No host sync: max_ctx is the block table's capacity and the kernel cuts each
    context by its length, so a CUDA graph replays correctly for any context that fits."""
    min_split = t.min_split if device.type == "cuda" else t.block_n
    wanted = max(1, triton.cdiv(t.waves * num_sms(device), batch * num_kv_heads))
    return min(wanted, triton.cdiv(max_ctx, min_split)), min_split


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    new_token: NewToken | None = None,
    tuning: DecodeTuning = DecodeTuning(),
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `decode_attention_ref` (same contract, except that q and new_token's k
    and v are left as they are). Flash-decoding + merge."""
    batch, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0 and head_dim in (64, 128)
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    assert fp8 or q.dtype == k_cache.dtype
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert block_table.shape[0] == batch and block_table.dtype == torch.int32
    assert block_table.stride(1) == 1
    assert seq_lens.shape == (batch,) and seq_lens.dtype == torch.int32
    seq_lens = seq_lens.contiguous()
    out = torch.empty_like(q)
    if batch == 0:
        return out
    new_args: tuple = (None,) * 5 + (0,) * 5
    if new_token is not None:
        t = new_token
        assert t.k.shape == t.v.shape == (batch, num_kv_heads, head_dim)
        assert t.k.dtype == t.v.dtype == q.dtype and t.k.stride(2) == 1 and t.v.stride(2) == 1
        assert t.positions.shape == t.slot_mapping.shape == (batch,)
        assert t.positions.dtype == t.slot_mapping.dtype == torch.int64
        assert t.cos_sin.dtype == torch.float32 and t.cos_sin.shape[1] == head_dim
        assert t.cos_sin.stride(1) == 1
        new_args = (t.k, t.v, t.positions.contiguous(), t.cos_sin, t.slot_mapping.contiguous(),
                    t.k.stride(0), t.k.stride(1), t.v.stride(0), t.v.stride(1),
                    t.cos_sin.stride(0))  # fmt: skip
    group = num_heads // num_kv_heads
    max_ctx = block_table.shape[1] * page
    num_splits, min_split = _num_splits(batch, num_kv_heads, max_ctx, q.device, tuning)
    # one split a sequence (batch enough to fill the card): the split kernel writes the output
    o_part = ml_part = None
    if num_splits > 1:
        o_part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                             device=q.device)  # fmt: skip
        ml_part = torch.empty((batch, num_heads, num_splits, 2), dtype=torch.float32,
                              device=q.device)  # fmt: skip
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, o_part, ml_part, out,
        scale * 1.4426950408889634, min_split,  # log2(e): the kernel works in base 2
        q.stride(0), q.stride(1), block_table.stride(0), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *new_args,
        kv_scale, num_kv_heads,
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), PAGE=page, HEAD_DIM=head_dim,
        BLOCK_N=tuning.block_n, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NEW_TOKEN=new_token is not None, KV_FP8=fp8, ROUND_IN_FP32=q.device.type == "cpu",
        num_warps=tuning.num_warps, num_stages=tuning.num_stages, **pdl_args(q.device),
    )  # fmt: skip
    if num_splits == 1:
        return out
    _decode_merge_kernel[(batch, num_heads)](
        o_part, ml_part, out, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, num_warps=4,
        **pdl_args(q.device),
    )  # fmt: skip
    return out
