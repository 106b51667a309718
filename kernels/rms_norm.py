"""Fused residual add + RMSNorm (HF LlamaRMSNorm numerics).

    new_residual = x + residual                      (in x.dtype; x itself when residual is None)
    normed       = weight * (r32 * rsqrt(mean(r32^2) + eps)).to(x.dtype),  r32 = new_residual fp32
                   (weight None: no gain, as when a model folds it into the next matmul)

One program per row: the row is read once, summed with the residual, reduced and written twice.
"""

import torch
import triton
import triton.language as tl

from kvmesh.kernels.pdl import pdl_args, pdl_enter


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    # x, residual: [T, hidden]; weight: [hidden] or None
    new_residual = x if residual is None else x + residual
    r32 = new_residual.float()
    inv_rms = torch.rsqrt(r32.pow(2).mean(dim=-1, keepdim=True) + eps)
    normed = (r32 * inv_rms).to(x.dtype)
    return (normed if weight is None else weight * normed).to(x.dtype), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    hidden, stride_x, stride_res, stride_out, stride_new_res, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # one rounding to x.dtype, exactly as the eager `x + residual`
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    y = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        y = tl.load(w_ptr + cols, mask=mask, other=0.0) * y
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton version of `rms_norm_ref` (same contract)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x: [T, hidden], rows contiguous"
    num_rows, hidden = x.shape
    assert weight is None or (weight.shape == (hidden,) and weight.is_contiguous())
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_res = x if residual is None else torch.empty_like(out)
    res = x if residual is None else residual
    if num_rows == 0:
        return out, new_res
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 16)
    _rms_norm_kernel[(num_rows,)](
        x, res, weight, out, new_res,
        hidden, x.stride(0), res.stride(0), out.stride(0), new_res.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, BLOCK=block,
        num_warps=num_warps, **pdl_args(x.device),
    )  # fmt: skip
    return out, new_res
