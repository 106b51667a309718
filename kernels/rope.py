"""Rotary position embedding (HF Llama "rotate_half" convention), with Llama-3 frequency scaling.

cos_sin table row p = [cos(p * f_0) .. cos(p * f_{D/2-1}) | sin(p * f_0) .. sin(p * f_{D/2-1})].
For each head vector x = [x1 | x2] (halves of D/2):

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin

applied in place to q and k, computed in fp32 and rounded once.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


def _inv_freq(head_dim: int, theta: float, device: torch.device | str | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3_scaled(inv_freq: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # between them interpolated smoothly (transformers' _compute_llama3_parameters).
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: Llama3RopeScaling | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of each frequency, then sin of each frequency."""
    assert head_dim % 2 == 0
    inv_freq = _inv_freq(head_dim, theta, device)
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # [P, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # x: [T, H, D]; cos, sin: [T, 1, D/2] float32
    half = x.shape[-1] // 2
    # both halves are computed before either is written: for fp32, .float() returns a view
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    x[..., :half] = out1.to(x.dtype)
    x[..., half:] = out2.to(x.dtype)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    # q: [T, Hq, D], k: [T, Hk, D] (possibly strided views); positions: [T] int64
    half = q.shape[-1] // 2
    rows = cos_sin[positions].unsqueeze(1)  # [T, 1, D]
    cos, sin = rows[..., :half], rows[..., half:]
    _rotate_in_place(q, cos, sin)
    _rotate_in_place(k, cos, sin)


@triton.jit
def cos_sin_row(pos_ptr, cos_sin_ptr, token, stride_cs, HALF: tl.constexpr):
    """The cos and sin halves ([HALF] fp32) of token's position."""
    pos = tl.load(pos_ptr + token)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims)
    return cos, sin


@triton.jit
def _head_rows(x_ptr, stride_t, stride_h, num_heads, token, HALF: tl.constexpr,
               BLOCK_H: tl.constexpr):  # fmt: skip
    """Pointers to the first halves of token's heads of x ([BLOCK_H, HALF]) and their mask."""
    heads = tl.arange(0, BLOCK_H)
    ptr = x_ptr + token * stride_t + heads[:, None] * stride_h + tl.arange(0, HALF)[None, :]
    return ptr, (heads < num_heads)[:, None]


@triton.jit
def _rotated(ptr, mask, cos, sin, HALF: tl.constexpr):
    """The rows at ptr (first halves; second halves HALF further), rotated, in their dtype."""
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(ptr.dtype.element_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(ptr.dtype.element_ty)
    return out1, out2


@triton.jit
def rotated_heads(
    x_ptr, stride_t, stride_h, num_heads, cos, sin, token,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """token's heads of x, rotated: the halves ([BLOCK_H, HALF] each, in x's dtype; rows past
    num_heads are padding), x untouched."""
    ptr, mask = _head_rows(x_ptr, stride_t, stride_h, num_heads, token, HALF, BLOCK_H)
    return _rotated(ptr, mask, cos, sin, HALF)


@triton.jit
def rotate_heads(x_ptr, stride_t, stride_h, num_heads, cos, sin, token, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr):  # fmt: skip
    """Rotate token's heads of x in place; returns the rotated halves (rotated_heads)."""
    ptr, mask = _head_rows(x_ptr, stride_t, stride_h, num_heads, token, HALF, BLOCK_H)
    out1, out2 = _rotated(ptr, mask, cos, sin, HALF)
    tl.store(ptr, out1, mask=mask)
    tl.store(ptr + HALF, out2, mask=mask)
    return out1, out2


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    # one program per token: its cos/sin row is loaded once for all q and k heads
    token = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_row(pos_ptr, cos_sin_ptr, token, stride_cs, HALF)
    rotate_heads(q_ptr, stride_qt, stride_qh, num_q_heads, cos, sin, token, HALF, BLOCK_HQ)
    rotate_heads(k_ptr, stride_kt, stride_kh, num_k_heads, cos, sin, token, HALF, BLOCK_HK)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Triton version of `apply_rope_ref` (in place; q/k may be strided views of a fused qkv)."""
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] == positions.shape[0]
    head_dim = q.shape[2]
    assert k.shape[2] == head_dim and head_dim % 2 == 0
    assert triton.next_power_of_2(head_dim // 2) == head_dim // 2, "head_dim/2 must be a power of 2"
    assert q.stride(2) == 1 and k.stride(2) == 1, "head vectors must be contiguous"
    assert q.dtype == k.dtype and positions.dtype == torch.int64
    assert cos_sin.dtype == torch.float32 and cos_sin.shape[1] == head_dim
    assert cos_sin.stride(1) == 1
    positions = positions.contiguous()
    if q.shape[0] == 0:
        return
    _rope_kernel[(q.shape[0],)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        q.shape[1], k.shape[1],
        HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )  # fmt: skip
