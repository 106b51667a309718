"""Quantized weights in the linear op: `linear_ref`'s rule (weight-only for INT8 and for FP8 at
up to MAX_M rows, W8A8 for FP8 above) against an independent float64 computation, and the
skinny kernel's quantized forms (interpreter, fp32 and fp16 x) against `linear_ref`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import assert_close, poison_allocator

from kvmesh.kernels import quant
from kvmesh.kernels.act_quant import quantize_rows_fp8, quantize_rows_fp8_ref
from kvmesh.kernels.linear import MAX_M, LinearTuning, RowSquares, linear, linear_ref
from kvmesh.kernels.quant import FP8_MAX, QuantizedWeight
from kvmesh.kernels.rms_norm import rms_norm_ref


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = torch.seed() % (1 << 31)  # fresh inputs every run; a failure's output shows the seed
    print(f"seed {seed}")
    torch.manual_seed(seed)


def _quantized(n: int, k: int, scheme: str, device: str = "cpu") -> QuantizedWeight:
    """A random weight [n, k] with rows of different magnitudes, on `scheme`'s grid."""
    spread = torch.logspace(-1, 1, n, device=device).unsqueeze(1)
    w = torch.randn(n, k, device=device) / k**0.5 * spread
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


# ---- the skinny kernel's quantized forms (interpreter), against linear_ref --------------------

DOT = [LinearTuning(16, 64, 4, 2), LinearTuning(32, 32, 4, 3)]
SPLIT = LinearTuning(16, 64, 4, 2, split_k=2)
GEMV = LinearTuning(8, 128, 4, 2, dot=False)
SWIGLU_DOT = LinearTuning(32, 64, 4, 2)  # half of 32 rows of each: a 16-row tensor-core tile


def run_quant_case(m, n, k, dtype, scheme, tuning, residual=False, norm=None, swiglu=False,
                   device="cpu"):  # fmt: skip
    """linear(x, w quantized, tuning, ...) against linear_ref with x in float64: the weight-only
    product of the codes, exact. norm: None, 'gain' (g kept apart, applied by the kernel) or
    'plain' (no gain). Reproducible, and out= the residual gives the same bits."""
    n_out = n // 2 if swiglu else n
    x = torch.randn(m, k, device=device).to(dtype)
    x = x * (1 + torch.arange(m, device=device)[:, None] % 4).to(dtype)  # rows of 4 scales
    w = _quantized(n, k, scheme, device)
    r = torch.randn(m, n_out, device=device).to(dtype) if residual else None
    g = (1 + torch.randn(k, device=device) / 4).to(dtype) if norm == "gain" else None
    nrm = (g, 1e-5) if norm is not None else None
    nrm64 = (g.double() if g is not None else None, 1e-5) if norm is not None else None
    want = linear_ref(x.double(), w, r.double() if r is not None else None, nrm64, swiglu)
    poison_allocator(device)
    y = linear(x, w, tuning, residual=r, norm=nrm, swiglu=swiglu)
    assert y.shape == (m, n_out) and y.dtype == dtype
    assert_close(y, want, dtype, factor=2 if g is not None else 1)
    torch.testing.assert_close(linear(x, w, tuning, residual=r, norm=nrm, swiglu=swiglu), y,
                               rtol=0, atol=0)  # fmt: skip
    if r is not None:
        into = r.clone()
        got = linear(x, w, tuning, residual=into, norm=nrm, swiglu=swiglu, out=into)
        assert got.data_ptr() == into.data_ptr()
        torch.testing.assert_close(into, y, rtol=0, atol=0)
    return y


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "tuning,m",
    [(DOT[0], 5), (DOT[1], 16), (SPLIT, 3), (GEMV, 1), (DOT[0], 1)],
    ids=["n16k64", "n32k32", "split2", "gemv", "dot-m1"],
)
def test_kernel_codes_scaled_in_the_epilogue(scheme, dtype, tuning, m):
    """The plain product and with a residual, K not a multiple of the tile (masked loads)."""
    run_quant_case(m, 40, 200, dtype, scheme, tuning)
    run_quant_case(m, 33, 128, dtype, scheme, tuning, residual=True)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "tuning,m", [(DOT[0], 7), (SPLIT, 4), (GEMV, 1)], ids=["n16k64", "split2", "gemv"]
)
def test_kernel_norm_gain_on_the_codes(scheme, dtype, tuning, m):
    """norm=(g, eps) with g kept apart: the dot path scales w's tiles by g, the gemv path x's;
    a split config runs the norm kernel first; and a norm with no gain."""
    run_quant_case(m, 48, 192, dtype, scheme, tuning, residual=True, norm="gain")
    run_quant_case(m, 24, 100, dtype, scheme, tuning, norm="plain")


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "tuning,m", [(SWIGLU_DOT, 6), (GEMV, 1), (SPLIT, 3)], ids=["fused", "gemv", "split2"]
)
def test_kernel_swiglu_scales_gate_and_up_apart(scheme, dtype, tuning, m):
    """gate_up quantized: gate and up rows have their own scales (rows of one scale vector);
    the fused launch scales each accumulator, the split one runs the plain launch first."""
    run_quant_case(m, 64, 160, dtype, scheme, tuning, norm="gain", swiglu=True)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize(
    "consumer", [DOT[1], SPLIT, SWIGLU_DOT], ids=["n32k32", "split2", "swiglu"]
)
def test_kernel_takes_handed_squares_with_a_gain(scheme, consumer):
    """o/down hand their rows' squares on; a quantized qkv/gate_up with its gain apart takes
    them (x's squares do not depend on g), split configs too: no norm kernel first."""
    m, k, n, dtype = 6, 128, 64, torch.float16
    swiglu = consumer is SWIGLU_DOT
    a = torch.randn(m, 96).to(dtype)
    wa = (torch.randn(k, 96) / 96**0.5).to(dtype)
    h = torch.randn(m, k).to(dtype) * 3
    squares = RowSquares()
    linear(a, wa, DOT[0], residual=h, out=h, squares_out=squares)
    assert squares.parts is not None
    w = _quantized(n, k, scheme)
    g = (1 + torch.randn(k) / 4).to(dtype)
    y = linear(h, w, consumer, norm=(g, 1e-5), swiglu=swiglu, squares=squares)
    want = linear_ref(h.double(), w, norm=(g.double(), 1e-5), swiglu=swiglu)
    assert_close(y, want, dtype, factor=2)
    if consumer.split_k == 1:  # the same sums, summed in the loop from x's tiles
        itself = linear(h, w, consumer, norm=(g, 1e-5), swiglu=swiglu)
        assert_close(y, itself.double(), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", [None, "plain", "gain"])
def test_activation_quantization_kernel(dtype, norm):
    """Rows to FP8 codes and per-row scales: bit for bit the reference's without a norm (zero
    rows and tiny values included); with the norm fused, the reference's up to the norm's
    summation order (a code one E4M3 step off, rarely)."""
    m, k = 9, 300
    x = (torch.randn(m, k) * torch.logspace(-4, 3, m)[:, None]).to(dtype)
    x[2] = 0
    x[5, ::7] = 1e-6 if norm is None else x[5, ::7]  # E4M3's subnormal codes
    x[5, 3] = -0.0  # keeps its sign
    g = (1 + torch.randn(k) / 4).to(dtype)
    nrm = {None: None, "plain": (None, 1e-5), "gain": (g, 1e-5)}[norm]
    codes, scale = quantize_rows_fp8(x, nrm)
    want_codes, want_scale = quantize_rows_fp8_ref(x, nrm)
    assert codes.dtype == quant.FP8_DTYPE and scale.shape == (m, 1)
    if nrm is None:
        assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
        assert torch.equal(scale, want_scale)
    else:
        torch.testing.assert_close(scale, want_scale, rtol=2 * torch.finfo(dtype).eps, atol=0)
        off = codes.float() != want_codes.float()
        # bf16's normed values (8 bits) differ from the reference's by an ulp now and then,
        # and then 1 in 16 of a row's codes: fp16 and fp32 leave rare flips only
        assert float(off.float().mean()) < (0.15 if dtype == torch.bfloat16 else 0.01)
        # an off code is the neighbour on the grid: within one step (2^-3 relative)
        torch.testing.assert_close(codes.float(), want_codes.float(), rtol=0.13, atol=2.0**-9)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [MAX_M + 6, 3])
def test_untuned_calls_follow_the_rule(scheme, dtype, m):
    """tuning=None: fp32 x and more than MAX_M rows go to linear_torch (FP8 above MAX_M: the
    activation kernel then the W8A8 product; else weight-only on the converted codes), fp16 at
    up to MAX_M rows to the kernel; each agrees with linear_ref on the same rule."""
    k, inter = 96, 40
    x = torch.randn(m, k).to(dtype) * 2
    g = (1 + torch.randn(k) / 4).to(dtype)
    r = torch.randn(m, inter).to(dtype)
    w = _quantized(2 * inter, k, scheme)
    y = linear(x, w, residual=r, norm=(g, 1e-5), swiglu=True)
    want = linear_ref(x, w, residual=r, norm=(g, 1e-5), swiglu=True)
    assert y.shape == want.shape and y.dtype == dtype
    w8a8 = scheme == "fp8" and m > MAX_M
    # W8A8: the fused norm may move a code one step, as in the activation test
    assert_close(y, want.double(), dtype, factor=50 if w8a8 else 4)
