"""Reference quantization: the grids that kvmesh's FP8 and INT8 kernels must compute, in torch.

Every function here is the specification a GPU kernel is tested against and the CPU path that
accuracy is measured with, so the rules are exact:

- A scale is a float32 amplitude per row (per output channel of a weight, per token of an
  activation, per head of a KV cache): scale = amax / QMAX, where amax is the row's largest
  |value| and QMAX is 448 for FP8 E4M3 (its largest finite value) and 127 for INT8 (symmetric,
  -128 unused). A row whose amax is 0 gets scale 1, so its codes are 0 and never 0/0.
- Quantize: code = cast(clamp(x / scale, -QMAX, QMAX)), computed in float32. FP8 casts to
  torch.float8_e4m3fn (round to nearest even; the clamp keeps out-of-range values from
  becoming NaN, which that format uses instead of inf); INT8 rounds to nearest (ties to even,
  torch.round) before the cast.
- Dequantize: x ~ code * scale, in float32.
- Linears accumulate the products of codes in float32 and apply the scales in the epilogue,
  y = (codes_x @ codes_w^T) * scale_x * scale_w^T, as the scaled GEMMs do; the output takes
  the activation's dtype. Weight-only (activations unquantized) is the same with x for
  codes_x and no scale_x: y = (x @ codes_w^T) * scale_w^T.
- Which of the two a quantized linear computes (kernels/linear.py, `linear_ref` and the
  kernels alike): INT8 weights always weight-only; FP8 weights weight-only for at most
  linear.MAX_M rows of x (decode: the skinny kernel streams the codes), W8A8 with per-token
  FP8 activations above that (prefill and big batches: the tensor cores' FP8 GEMM). A norm's
  gain that a quantized weight keeps apart multiplies the normed activation (rounded to its
  dtype) before either.

Inputs with inf or NaN are outside the contract. Shapes: weights are [out, in] as nn.Linear
holds them; activations are [..., in]; scales keep the reduced dimension with size 1 so they
broadcast ([out, 1], [..., 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
INT8_MAX = 127  # symmetric range [-127, 127]


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [out, in] as codes (float8_e4m3fn or int8) and float32 scales [out, 1]."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def scheme(self) -> str:
        """'fp8' or 'int8', from the codes' dtype."""
        return "fp8" if self.codes.dtype == FP8_DTYPE else "int8"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the codes stand for."""
        return self.codes.float() * self.scale


# A linear's weight: half precision (or fp32) as loaded, or quantized
Weight = torch.Tensor | QuantizedWeight


def quantize_weight(w: torch.Tensor, scheme: str) -> Weight:
    """w on `scheme`'s grid ('fp8' or 'int8'; 'none': w itself)."""
    if scheme == "none":
        return w
    if scheme == "fp8":
        return quantize_weight_fp8(w)
    if scheme == "int8":
        return quantize_weight_int8(w)
    raise ValueError(f"unknown quantization {scheme!r}: none, fp8 or int8")


def row_scales(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """float32 scales [..., 1]: amax of each row (last dimension) / qmax; 1 where amax is 0."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = amax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x (any float dtype) for a scale that broadcasts against it."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-127, 127] of x for a scale that broadcasts against it."""
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_weight_fp8(w: torch.Tensor) -> QuantizedWeight:
    """FP8 E4M3 codes of a weight [out, in] with per-output-channel scales amax / 448."""
    scale = row_scales(w, FP8_MAX)
    return QuantizedWeight(quantize_fp8(w, scale), scale)


def quantize_weight_int8(w: torch.Tensor) -> QuantizedWeight:
    """INT8 codes of a weight [out, in] with per-output-channel symmetric scales amax / 127."""
    scale = row_scales(w, INT8_MAX)
    return QuantizedWeight(quantize_int8(w, scale), scale)


def quantize_activation_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8: codes [..., in] and float32 scales [..., 1] (amax / 448 a token)."""
    scale = row_scales(x, FP8_MAX)
    return quantize_fp8(x, scale), scale


def linear_w8a8_fp8(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y [..., out] = x [..., in] @ w^T with x quantized per token and w per channel to FP8.

    Products of codes accumulate in float32; scales and bias apply after; y has x's dtype.
    """
    codes, x_scale = quantize_activation_fp8(x)
    y = (codes.float() @ weight.codes.float().t()) * x_scale * weight.scale.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_weight_only(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y [..., out] = x [..., in] @ w^T with w's codes (FP8 or INT8) per channel and x
    unquantized (weight-only: W8A16, as the skinny decode kernel computes it).

    x (upcast to float32; float64 stays float64, for exact test references) times the codes
    accumulates in that precision, the per-channel scale applies after; y has x's dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    y = (x.to(acc) @ weight.codes.to(acc).t()) * weight.scale.t().to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def linear_w8a16_int8(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y [..., out] = x [..., in] @ w^T with w INT8 per channel and x unquantized (weight-only):
    `linear_weight_only` for INT8 codes."""
    assert weight.scheme == "int8"
    return linear_weight_only(x, weight, bias)


# FP8 KV cache. A layer's k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim] may be
# float8_e4m3fn; then every kernel that writes or reads it (rope_write_kv, write_kv,
# decode_attention, prefill_attention and their _ref) takes kv_scale: float32 [2, kv_heads], row 0
# K's per-head scales and row 1 V's, static for the model (calibrated; the engine supplies them).
# Write: code = quantize_kv_fp8(value, kv_scale[i]) (fp32 math, ties to even, saturating at 448).
# Read: value = dequantize_kv_fp8(code, kv_scale[i]) in fp32, then the attention as for a half
# cache (the kernels fold the scale out of their products: the same up to fp32 rounding). A
# step's new tokens are attended as their codes, first chunks included (rope_write_kv leaves k
# and v holding the codes' values). kv_scale=None: a half or fp32 cache, the plain cast.
# quantize_kv_fp8 and dequantize_kv_fp8 take [..., heads, head_dim] (tokens, or blocks and
# offsets: any leading dimensions).


def kv_head_scales(kv: torch.Tensor) -> torch.Tensor:
    """float32 FP8 scales [heads] of a K or V tensor [tokens, heads, head_dim]: per head, the
    amax over its tokens and dimensions / 448 (1 for an all-zero head)."""
    per_head = kv.detach().transpose(0, 1).reshape(kv.shape[1], -1)
    return row_scales(per_head, FP8_MAX).squeeze(-1)


def quantize_kv_fp8(kv: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of K or V [tokens, heads, head_dim] under per-head scales [heads].

    Values beyond a head's scale * 448 (tokens written after the scale was set) saturate.
    """
    return quantize_fp8(kv, scale.view(1, -1, 1))


def dequantize_kv_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 K or V [tokens, heads, head_dim] from FP8 codes and per-head scales [heads]."""
    return codes.float() * scale.view(1, -1, 1)
