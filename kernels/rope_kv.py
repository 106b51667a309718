"""RoPE fused with the KV write: one launch per layer rotates q and k and writes k and v into the
paged cache through the slot mapping (kernels/rope then kernels/kv_write, in one pass).

    token t (one program): cos/sin row of positions[t], loaded once
      q[t]  rotated in place (all query heads)
      k[t]  rotated in registers -> k[t] (in place) and k_cache[slot[t]]
      v[t]                       -> v_cache[slot[t]]                     (slot < 0: padding,
                                                                          no cache write)

k is read once instead of three times (rotate, then read back by the write), and a prefill chunk
launches one kernel a layer instead of two (decode steps do this inside decode attention, with
kernels/decode_attention.NewToken). The results are the two kernels' bit for bit: the
same fp32 rotation, rounded to k's dtype, then cast to the cache's.

FP8 cache (kv_scale [2, Hk] fp32, kernels/kv_write): k's and v's codes go to the cache, and k and
v are left holding the values the cache stands for (code * scale, rounded to k's dtype), every
token's, padding included. A first chunk's attention, which reads its keys and values from k and
v instead of the cache (FreshChunks), so attends over the same quantized values as every later
read of those tokens does (the reference reads the cache), for the cost of one store of v.
"""

import torch
import triton
import triton.language as tl

from kvmesh.kernels.kv_write import kv_codes, kv_fp8, write_kv_ref
from kvmesh.kernels.pdl import pdl_args, pdl_enter
from kvmesh.kernels.quant import dequantize_kv_fp8, quantize_kv_fp8
from kvmesh.kernels.rope import apply_rope_ref, cos_sin_row, rotate_heads, rotated_heads


def rope_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    # q: [T, Hq, D], k, v: [T, Hk, D] (strided views of a fused qkv); positions, slot_mapping: [T]
    # kv_scale: [2, Hk] fp32 with an FP8 cache (then k and v end as the cache's values)
    apply_rope_ref(q, k, positions, cos_sin)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_scale)
    if kv_scale is not None:
        for x, scale in ((k, kv_scale[0]), (v, kv_scale[1])):
            x.copy_(dequantize_kv_fp8(quantize_kv_fp8(x, scale), scale))


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, kv_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h,
    num_q_heads, num_kv_heads, block_size,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PDL: tl.constexpr,
    KV_FP8: tl.constexpr, ROUND_IN_FP32: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_row(pos_ptr, cos_sin_ptr, token, stride_cs, HALF)
    rotate_heads(q_ptr, stride_qt, stride_qh, num_q_heads, cos, sin, token, HALF, BLOCK_HQ)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    mask = heads < num_kv_heads
    half = tl.arange(0, HALF)[None, :]
    dims = tl.arange(0, 2 * HALF)[None, :]
    v_row = v_ptr + token * stride_vt + heads * stride_vh + dims
    v = tl.load(v_row, mask=mask)
    if KV_FP8:  # codes for the cache; k and v in place become the codes' values
        out1, out2 = rotated_heads(k_ptr, stride_kt, stride_kh, num_kv_heads, cos, sin, token,
                                   HALF, BLOCK_HK)  # fmt: skip
        k_scale = tl.load(kv_scale_ptr + heads, mask=mask, other=1.0)
        v_scale = tl.load(kv_scale_ptr + num_kv_heads + heads, mask=mask, other=1.0)
        c1 = kv_codes(out1, k_scale, ROUND_IN_FP32)
        c2 = kv_codes(out2, k_scale, ROUND_IN_FP32)
        cv = kv_codes(v, v_scale, ROUND_IN_FP32)
        k_row = k_ptr + token * stride_kt + heads * stride_kh + half
        tl.store(k_row, (c1.to(tl.float32) * k_scale).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_row + HALF, (c2.to(tl.float32) * k_scale).to(k_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        tl.store(v_row, (cv.to(tl.float32) * v_scale).to(v_ptr.dtype.element_ty), mask=mask)
    else:
        out1, out2 = rotate_heads(k_ptr, stride_kt, stride_kh, num_kv_heads, cos, sin, token,
                                  HALF, BLOCK_HK)  # fmt: skip
        c1 = out1.to(k_cache_ptr.dtype.element_ty)
        c2 = out2.to(k_cache_ptr.dtype.element_ty)
        cv = v.to(v_cache_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + token)  # int64: block * stride never wraps
    if slot >= 0:
        block, offset = slot // block_size, slot % block_size
        kc = k_cache_ptr + block * stride_kc_blk + offset * stride_kc_off + heads * stride_kc_h
        tl.store(kc + half, c1, mask=mask)
        tl.store(kc + HALF + half, c2, mask=mask)
        vc = v_cache_ptr + block * stride_vc_blk + offset * stride_vc_off + heads * stride_vc_h
        tl.store(vc + dims, cv, mask=mask)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of `rope_write_kv_ref` (same contract: q and k rotated in place, k and v
    written to the cache at their slots; with an FP8 cache and its kv_scale [2, Hk] fp32, codes
    written and k and v left holding the codes' values)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert q.dim() == 3 and q.shape[0] == num_tokens and q.shape[2] == head_dim
    assert v.shape == k.shape and positions.shape == slot_mapping.shape == (num_tokens,)
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim // 2) == head_dim // 2
    assert q.dtype == k.dtype == v.dtype
    assert positions.dtype == torch.int64 and slot_mapping.dtype == torch.int64
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == head_dim
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert v_cache.shape == k_cache.shape
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    for t in (q, k, v, k_cache, v_cache, cos_sin):
        assert t.stride(-1) == 1, "head vectors (and cos/sin rows) must be contiguous"
    if num_tokens == 0:
        return
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, kv_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.shape[1], num_kv_heads, k_cache.shape[1],
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        KV_FP8=fp8, ROUND_IN_FP32=q.device.type == "cpu",
        num_warps=4, **pdl_args(q.device),
    )  # fmt: skip
