"""Per-token FP8 activations for the W8A8 GEMM: rows of x (optionally RMSNorm'd first) to
float8_e4m3fn codes and one float32 scale a row, on kernels/quant.py's grid.

    x [M, K] --(rms_norm(x) * g, rounded to x's dtype: norm=(g, eps))--> v
    scale[m] = max(|v[m, :]|) / 448 (1 where that is 0); codes[m, k] = e4m3(clamp(v / scale))

One program a row (the row in registers, as the norm kernel holds it): read once, codes and
scale written once, so a prefill's normed input never makes a round trip in x's dtype. The
quotient is IEEE-rounded (div_rn) and then rounded to nearest even on the E4M3 grid, so
without a norm the codes and scales equal `quantize_rows_fp8_ref`'s bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.kernels.pdl import pdl_args, pdl_enter
from kvmesh.kernels.quant import FP8_DTYPE, FP8_MAX, quantize_activation_fp8
from kvmesh.kernels.rms_norm import rms_norm_ref

# an RMSNorm on the input: (weight [K] or None, eps)
Norm = tuple[torch.Tensor | None, float]


def quantize_rows_fp8_ref(
    x: torch.Tensor, norm: Norm | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # x: [M, K] -> codes [M, K] float8_e4m3fn, scales [M, 1] float32
    if norm is not None:
        x = rms_norm_ref(x, *norm)[0]
    return quantize_activation_fp8(x)


@triton.jit
def _e4m3_rne(q):
    """fp32 values in [-448, 448] rounded to the E4M3 grid (nearest, ties to even), still fp32,
    so the cast to float8 that follows is exact: integer rounding of the fp32 bits to 3
    mantissa bits (a carry moves the exponent up, as it should). Below 2^-6 (E4M3's subnormals,
    a fixed step of 2^-9) 2^-6 is added first, exactly, which gives the sum that step, and taken
    off after. Done by hand because the interpreter's fp32 -> fp8 cast drops a rounding's carry
    (126.5 became 64, not 128)."""
    a = tl.abs(q)
    small = a < 0.015625
    a = tl.where(small, a + 0.015625, a)
    bits = a.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 of 23 mantissa bits
    r = bits.to(tl.float32, bitcast=True)
    r = tl.where(small, r - 0.015625, r)
    sign = q.to(tl.int32, bitcast=True) & -0x80000000  # -0.0 stays -0.0, as the cast keeps it
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, g_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, eps,
    NORM: tl.constexpr, GAIN: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if NORM:  # as rms_norm: normed rounded to x's dtype, then times g rounded again
        x32 = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / K + eps)
        x = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
        if GAIN:
            g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty)
    v = x.to(tl.float32)
    scale = tl.div_rn(tl.max(tl.abs(v), axis=0), 448.0)
    scale = tl.where(scale > 0, scale, 1.0)
    q = _e4m3_rne(tl.clamp(tl.div_rn(v, scale), -448.0, 448.0))
    tl.store(codes_ptr + row * stride_c + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(
    x: torch.Tensor, norm: Norm | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quantize_rows_fp8_ref`: x [M, K] (rows contiguous) -> codes [M, K]
    float8_e4m3fn and scales [M, 1] float32."""
    assert x.dim() == 2 and x.stride(1) == 1, "x: [M, K], rows contiguous"
    m, k = x.shape
    g, eps = norm if norm is not None else (None, 0.0)
    assert g is None or (g.shape == (k,) and g.is_contiguous() and g.device == x.device)
    codes = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scale
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](
        x, g, codes, scale, k, x.stride(0), codes.stride(0), eps,
        NORM=norm is not None, GAIN=g is not None, BLOCK=block,
        num_warps=min(max(block // 512, 1), 16), **pdl_args(x.device),
    )  # fmt: skip
    return codes, scale


assert FP8_MAX == 448.0  # the kernel's literal
