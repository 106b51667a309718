"""Quantized weights in the linear op: `linear_ref`'s rule (weight-only for INT8 and for FP8 at
up to MAX_M rows, W8A8 for FP8 above) against an independent float64 computation, and the
skinny kernel's quantized forms (interpreter, fp32 and fp16 x) against `linear_ref`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvmesh.kernels import quant
from kvmesh.kernels.linear import MAX_M, linear_ref
from kvmesh.kernels.quant import FP8_MAX, QuantizedWeight
from kvmesh.kernels.rms_norm import rms_norm_ref


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = torch.seed() % (1 << 31)  # fresh inputs every run; a failure's output shows the seed
    print(f"seed {seed}")
    torch.manual_seed(seed)


def _quantized(n: int, k: int, scheme: str) -> QuantizedWeight:
    """A random weight [n, k] with rows of different magnitudes, on `scheme`'s grid."""
    w = torch.randn(n, k) / k**0.5 * torch.logspace(-1, 1, n).unsqueeze(1)
    qw = quant.quantize_weight(w, scheme)
    assert isinstance(qw, QuantizedWeight)
    return qw


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to the E4M3 grid (nearest, ties to even; 3 mantissa bits,
    exponent >= -6), saturated at 448: from the format's definition, not via a cast."""
    a = v.abs()
    e = torch.floor(torch.log2(a.clamp(min=2.0**-30))).clamp(min=-6)
    step = torch.pow(2.0, e - 3)
    q = torch.minimum(torch.round(a / step) * step, torch.tensor(FP8_MAX, dtype=torch.float64))
    return torch.sign(v) * q


def _rule64(x: torch.Tensor, w: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized product of x [M, K] (already normed) in float64, and a bound on its
    accumulation error (the sum of |terms|): weight-only or W8A8 by the rule."""
    w64 = w.codes.double()
    sw = w.scale.double().t()
    if w.scheme == "fp8" and x.shape[0] > MAX_M:
        amax = x.double().abs().amax(1, keepdim=True)
        sx = torch.where(amax > 0, (amax / FP8_MAX).float().double(), 1.0)
        # the quotient as float32 computes it, then onto the grid
        cx = _e4m3((x.float() / sx.float()).double())
        return (cx @ w64.t()) * sx * sw, (cx.abs() @ w64.abs().t()) * sx * sw
    x64 = x.double()
    return (x64 @ w64.t()) * sw, (x64.abs() @ w64.abs().t()) * sw


def _assert_within(y: torch.Tensor, want: torch.Tensor, terms: torch.Tensor) -> None:
    """y (x's dtype) is want rounded once to y's dtype, up to fp32 accumulation error."""
    eps = torch.finfo(y.dtype).eps
    err = (y.double() - want).abs()
    bound = want.abs() * eps + terms * 2e-6 + 1e-30
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("m", [1, 5, MAX_M, MAX_M + 1, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_product_follows_the_rule(scheme, m, dtype):
    """INT8: weight-only at any M; FP8: weight-only up to MAX_M rows, W8A8 above."""
    k, n = 96, 40
    x = torch.randn(m, k).to(dtype) * torch.logspace(-2, 2, m).unsqueeze(1).to(dtype)
    w = _quantized(n, k, scheme)
    y = linear_ref(x, w)
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_within(y, *_rule64(x, w))


def test_fp8_rows_past_max_m_quantize_the_activation():
    """The two FP8 rules differ: a row gives other bits above MAX_M than at or below it."""
    k, n = 128, 48
    w = _quantized(n, k, "fp8")
    x = torch.randn(MAX_M + 1, k)
    big = linear_ref(x, w)
    small = linear_ref(x[:1], w)
    assert not torch.equal(big[:1], small)
    assert float((big[:1] - small).norm() / small.norm()) < 0.1  # FP8's 3 mantissa bits


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("m", [3, MAX_M + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gain_swiglu_residual_out(scheme, m, dtype):
    """norm=(g, eps) with the gain apart: the product of rms_norm(x) * g (in x's dtype); SwiGLU
    of the rounded gate and up products; the residual added in x's dtype; out written."""
    k, inter = 64, 24
    x = torch.randn(m, k).to(dtype) * 3
    g = (1 + torch.randn(k) / 4).to(dtype)
    r = torch.randn(m, inter).to(dtype)
    w = _quantized(2 * inter, k, scheme)
    into = r.clone()
    y = linear_ref(x, w, residual=into, norm=(g, 1e-5), swiglu=True, out=into)
    assert y.data_ptr() == into.data_ptr() and y.shape == (m, inter) and y.dtype == dtype
    normed = rms_norm_ref(x, g, 1e-5)[0]
    assert normed.dtype == dtype
    product = linear_ref(x, w, norm=(g, 1e-5))
    _assert_within(product, *_rule64(normed, w))
    # then SwiGLU and the residual as for any weight, in x's dtype
    want = F.silu(product[:, :inter]) * product[:, inter:] + r
    torch.testing.assert_close(y, want, rtol=0, atol=0)
