"""Write new tokens' K/V into the paged cache through a slot mapping (slot = block * B + offset).

A negative slot means "no cache slot" (padding): that token is skipped.
"""

import torch
import triton
import triton.language as tl


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    # k, v: [T, Hk, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; slot_mapping: [T] int64
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h,
    num_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)  # int64: block * stride never wraps
    if slot < 0:
        return
    block, offset = slot // block_size, slot % block_size
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < num_heads
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    kc = k_cache_ptr + block * stride_kc_blk + offset * stride_kc_off + heads * stride_kc_h + dims
    vc = v_cache_ptr + block * stride_vc_blk + offset * stride_vc_off + heads * stride_vc_h + dims
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `write_kv_ref` (same contract)."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert slot_mapping.dtype == torch.int64
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim)
    assert v_cache.shape == k_cache.shape
    assert triton.next_power_of_2(head_dim) == head_dim
    for t in (k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "head vectors must be contiguous"
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads), num_warps=4,
    )  # fmt: skip
