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
"""

import torch
import triton
import triton.language as tl

from kvmesh.kernels.kv_write import write_kv_ref
from kvmesh.kernels.pdl import pdl_args, pdl_enter
from kvmesh.kernels.rope import apply_rope_ref, cos_sin_row, rotate_heads


def rope_write_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    # q: [T, Hq, D], k, v: [T, Hk, D] (strided views of a fused qkv); positions, slot_mapping: [T]
    apply_rope_ref(q, k, positions, cos_sin)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h,
    num_q_heads, num_kv_heads, block_size,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_row(pos_ptr, cos_sin_ptr, token, stride_cs, HALF)
    rotate_heads(q_ptr, stride_qt, stride_qh, num_q_heads, cos, sin, token, HALF, BLOCK_HQ)
    out1, out2 = rotate_heads(k_ptr, stride_kt, stride_kh, num_kv_heads, cos, sin, token, HALF,
                              BLOCK_HK)  # fmt: skip
    slot = tl.load(slot_ptr + token)  # int64: block * stride never wraps
    if slot >= 0:
        block, offset = slot // block_size, slot % block_size
        heads = tl.arange(0, BLOCK_HK)[:, None]
        mask = heads < num_kv_heads
        half = tl.arange(0, HALF)[None, :]
        kc = k_cache_ptr + block * stride_kc_blk + offset * stride_kc_off + heads * stride_kc_h
        tl.store(kc + half, out1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + HALF + half, out2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        dims = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        vc = v_cache_ptr + block * stride_vc_blk + offset * stride_vc_off + heads * stride_vc_h
        tl.store(vc + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `rope_write_kv_ref` (same contract: q and k rotated in place, k and v
    written to the cache at their slots)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert q.dim() == 3 and q.shape[0] == num_tokens and q.shape[2] == head_dim
    assert v.shape == k.shape and positions.shape == slot_mapping.shape == (num_tokens,)
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim // 2) == head_dim // 2
    assert q.dtype == k.dtype == v.dtype
    assert positions.dtype == torch.int64 and slot_mapping.dtype == torch.int64
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == head_dim
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert v_cache.shape == k_cache.shape
    for t in (q, k, v, k_cache, v_cache, cos_sin):
        assert t.stride(-1) == 1, "head vectors (and cos/sin rows) must be contiguous"
    if num_tokens == 0:
        return
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    _rope_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        q.shape[1], num_kv_heads, k_cache.shape[1],
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4, **pdl_args(q.device),
    )  # fmt: skip
