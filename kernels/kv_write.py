"""Write new tokens' K/V into the paged cache through a slot mapping (slot = block * B + offset).

A negative slot means "no cache slot" (padding): that token is skipped.

FP8 KV cache: a cache of torch.float8_e4m3fn holds codes under static per-head scales, kv_scale
([2, Hk] fp32: row 0 K's, row 1 V's). A value x of head h is written as
code = cast(clamp(x / kv_scale[., h], -448, 448)) in fp32, rounded to nearest even (exactly
kernels.quant.quantize_kv_fp8), and read back as code * kv_scale[., h] in fp32. kv_scale=None
with a half or fp32 cache: a plain cast. This module holds the Triton helpers the writing
kernels share (`kv_codes`) and the host check of the pairing (`kv_fp8`).
"""

import torch
import triton
import triton.language as tl

from kvmesh.kernels.quant import FP8_DTYPE, quantize_kv_fp8


def kv_fp8(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> bool:
    """Whether the caches hold FP8 codes (then kv_scale must be their contiguous [2, Hk] fp32
    scales on the caches' device); kv_scale=None needs a half or fp32 cache."""
    assert v_cache.dtype == k_cache.dtype, "K and V caches share a dtype"
    if kv_scale is None:
        assert k_cache.dtype != FP8_DTYPE, "an FP8 KV cache needs its kv_scale"
        return False
    assert k_cache.dtype == FP8_DTYPE, "kv_scale goes with a float8_e4m3fn cache"
    assert kv_scale.dtype == torch.float32 and kv_scale.shape == (2, k_cache.shape[2])
    assert kv_scale.is_contiguous() and kv_scale.device == k_cache.device
    return True


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    # k, v: [T, Hk, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; slot_mapping: [T] int64
    # kv_scale: [2, Hk] fp32 with an FP8 cache (codes written), else None (values cast)
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks, offsets = slots // block_size, slots % block_size
    if fp8:
        assert kv_scale is not None
        k_cache[blocks, offsets] = quantize_kv_fp8(k[keep], kv_scale[0])
        v_cache[blocks, offsets] = quantize_kv_fp8(v[keep], kv_scale[1])
    else:
        k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
        v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


@triton.jit
def _e4m3_grid(x):
    """x (fp32, |x| <= 448) rounded in fp32 to the nearest E4M3 value, ties to even: 3 mantissa
    bits, so the spacing is 2^(exponent - 3), and 2^-9 below 2^-6 (subnormals). Casting the
    result to fp8 is exact; the interpreter's own fp32 -> fp8 rounding is not RTNE."""
    bits = x.to(tl.int32, bitcast=True)
    step = tl.maximum((bits & 0x7F800000).to(tl.float32, bitcast=True) * 0.125, 0.001953125)
    n = tl.abs(x) / step  # exact (a power of two), < 16
    r = (n + 8388608.0) - 8388608.0  # + 2^23 rounds to an integer, ties to even
    return tl.where(bits < 0, -r, r) * step  # the sign bit: -0 stays -0


@triton.jit
def kv_codes(x, scale, ROUND_IN_FP32: tl.constexpr):
    """FP8 E4M3 codes of x (any float) under `scale` (fp32, broadcast against x): the module's
    rule. ROUND_IN_FP32 (the CPU interpreter): round on the grid first (_e4m3_grid); the GPU's
    cvt rounds to nearest even itself."""
    y = x.to(tl.float32)
    y = tl.math.div_rn(y, scale + tl.zeros_like(y))  # div_rn takes operands of one shape
    y = tl.clamp(y, -448.0, 448.0)  # E4M3's largest finite value
    if ROUND_IN_FP32:
        y = _e4m3_grid(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, kv_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h,
    num_heads, block_size,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, KV_FP8: tl.constexpr,
    ROUND_IN_FP32: tl.constexpr,
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
    if KV_FP8:
        k_scale = tl.load(kv_scale_ptr + heads, mask=mask, other=1.0)
        v_scale = tl.load(kv_scale_ptr + num_heads + heads, mask=mask, other=1.0)
        tl.store(kc, kv_codes(k, k_scale, ROUND_IN_FP32), mask=mask)
        tl.store(vc, kv_codes(v, v_scale, ROUND_IN_FP32), mask=mask)
    else:
        tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of `write_kv_ref` (same contract)."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape == (num_tokens,)
    assert slot_mapping.dtype == torch.int64
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim)
    assert v_cache.shape == k_cache.shape
    assert triton.next_power_of_2(head_dim) == head_dim
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    for t in (k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "head vectors must be contiguous"
    if num_tokens == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, kv_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, k_cache.shape[1],
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads), KV_FP8=fp8,
        ROUND_IN_FP32=k.device.type == "cpu", num_warps=4,
    )  # fmt: skip
