"""The reference quantization grids: scales, round-trip bounds, saturation, zero rows, exactness
on the grid, and the W8A8 linear against an independent float64 computation of the same grid."""

from __future__ import annotations

import pytest
import torch

from kvmesh.kernels import quant
from kvmesh.kernels.quant import FP8_MAX, INT8_MAX


def _weight(out: int = 96, inp: int = 160) -> torch.Tensor:
    # Rows of very different magnitudes, as real layers have, plus heavy-tailed entries.
    w = torch.randn(out, inp) * torch.logspace(-3, 1, out).unsqueeze(1)
    return w * (1 + 4 * (torch.rand(out, inp) > 0.98))


def _dyadic_scales(n: int) -> torch.Tensor:
    """float32 scales m * 2^e with an 8-bit m: products with 4- or 7-bit codes are exact."""
    m = torch.randint(128, 256, (n, 1)).double()
    e = torch.randint(-20, 0, (n, 1)).double()
    return (m * torch.pow(2.0, e - 7)).float()


def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to the E4M3 grid (nearest, ties to even), saturated at 448:
    written from the format's definition (3 mantissa bits, exponent >= -6) not via a cast."""
    a = v.abs()
    e = torch.floor(torch.log2(a)).clamp(min=-6)
    step = torch.pow(2.0, e - 3)
    q = torch.minimum(torch.round(a / step) * step, torch.tensor(FP8_MAX, dtype=torch.float64))
    return torch.sign(v) * q


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = torch.seed() % (1 << 31)  # fresh inputs every run; a failure's output shows the seed
    print(f"seed {seed}")
    torch.manual_seed(seed)


def test_scales_are_row_amax_over_qmax_float32() -> None:
    w = _weight()
    for qw, qmax in ((quant.quantize_weight_fp8(w), FP8_MAX), (quant.quantize_weight_int8(w), 127)):
        assert qw.scale.shape == (w.shape[0], 1) and qw.scale.dtype == torch.float32
        assert torch.equal(qw.scale, w.abs().amax(1, keepdim=True) / qmax)
    assert quant.quantize_weight_fp8(w).codes.dtype == torch.float8_e4m3fn
    assert quant.quantize_weight_int8(w).codes.dtype == torch.int8
    x = torch.randn(3, 5, 160, dtype=torch.bfloat16)
    codes, scale = quant.quantize_activation_fp8(x)
    assert codes.shape == x.shape and scale.shape == (3, 5, 1) and scale.dtype == torch.float32


def test_fp8_round_trip_within_half_an_e4m3_step() -> None:
    w = _weight()
    qw = quant.quantize_weight_fp8(w)
    err = (qw.dequantize() - w).abs()
    # Normal codes: half a step is 2^-4 of the value; subnormal codes: a step is 2^-9 * scale.
    bound = torch.maximum(w.abs() * 2**-4, qw.scale * 2**-10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float((err / w.abs().clamp(min=1e-30)).median()) < 2**-5


def test_int8_round_trip_within_half_a_step() -> None:
    w = _weight()
    qw = quant.quantize_weight_int8(w)
    err = (qw.dequantize() - w).abs()
    assert bool((err <= qw.scale * (0.5 + 1e-5)).all())
    assert int(qw.codes.abs().max()) == INT8_MAX and int(qw.codes.min()) >= -INT8_MAX


def test_row_amax_maps_to_the_largest_code_and_beyond_saturates() -> None:
    w = _weight()
    idx = w.abs().argmax(1, keepdim=True)
    sign = torch.sign(w.gather(1, idx)).squeeze(1)
    fp8 = quant.quantize_weight_fp8(w).codes.float().gather(1, idx).squeeze(1)
    int8 = quant.quantize_weight_int8(w).codes.float().gather(1, idx).squeeze(1)
    assert torch.equal(fp8, sign * FP8_MAX) and torch.equal(int8, sign * INT8_MAX)
    # A scale too small for the values (a KV head written after its scale was set) clamps
    # to +-448 / +-127: never NaN, never wrapped.
    scale = torch.full((w.shape[0], 1), 1e-6)
    big = quant.quantize_fp8(w * 1e3, scale).float()
    over = (w * 1e3 / scale).abs() > 464  # rounds to 448 or beyond
    assert not bool(big.isnan().any()) and bool(over.any())
    assert torch.equal(big[over], torch.sign(w)[over] * FP8_MAX)
    assert int(quant.quantize_int8(w * 1e3, scale).abs().max()) == INT8_MAX


def test_zero_rows_get_scale_one_and_zero_codes() -> None:
    w = _weight()
    w[::7] = 0
    for qw in (quant.quantize_weight_fp8(w), quant.quantize_weight_int8(w)):
        assert torch.equal(qw.scale[::7], torch.ones_like(qw.scale[::7]))
        assert not bool(qw.codes.float()[::7].any())
        assert torch.equal(qw.dequantize()[::7], w[::7])
        assert bool(qw.dequantize().isfinite().all())
    x = torch.zeros(4, 160)
    y = quant.linear_w8a8_fp8(x, quant.quantize_weight_fp8(w))
    assert torch.equal(y, torch.zeros(4, w.shape[0]))


def test_values_on_the_grid_survive_exactly() -> None:
    out, inp = 64, 96
    scale = _dyadic_scales(out)
    # FP8: every finite E4M3 value is a code; each row holds +-448 so its scale is recovered.
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    every = every[every.isfinite()]
    codes = every[torch.randint(len(every), (out, inp))]
    codes[:, 0] = FP8_MAX * (torch.randint(2, (out,)) * 2 - 1)
    w = codes * scale
    qw = quant.quantize_weight_fp8(w)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.codes.float(), codes)
    assert torch.equal(qw.dequantize(), w)
    # INT8 likewise, with a +-127 in each row.
    icodes = torch.randint(-INT8_MAX, INT8_MAX + 1, (out, inp)).float()
    icodes[:, 0] = INT8_MAX * (torch.randint(2, (out,)) * 2 - 1)
    w = icodes * scale
    qw = quant.quantize_weight_int8(w)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.codes.float(), icodes)
    assert torch.equal(qw.dequantize(), w)


def _grid64(x: torch.Tensor, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 codes and scales of x's rows, from the rules in quant's docstring."""
    x64 = x.double()
    scale = (x64.abs().amax(-1, keepdim=True) / qmax).float().double()  # scales are float32
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # The quotient is float32 by rule; a float64 quotient rounded to float32 is that quotient.
    v = (x64 / scale).float().double()
    return _e4m3_round(v), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_equals_float64_of_the_same_grid(dtype: torch.dtype) -> None:
    w = _weight(96, 160)
    bias = torch.randn(96)
    x = (torch.randn(2, 7, 160) * torch.logspace(-2, 2, 7).view(1, 7, 1)).to(dtype)
    qw = quant.quantize_weight_fp8(w)
    wc64, ws64 = _grid64(w, FP8_MAX)
    xc64, xs64 = _grid64(x, FP8_MAX)
    assert torch.equal(qw.codes.double(), wc64)
    assert torch.equal(quant.quantize_activation_fp8(x)[0].double(), xc64)
    y = quant.linear_w8a8_fp8(x, qw, bias)
    assert y.dtype == dtype and y.shape == (2, 7, 96)
    y64 = (xc64 @ wc64.t()) * xs64 * ws64.t() + bias.double()
    magnitude = (xc64.abs() @ wc64.abs().t()) * xs64 * ws64.t() + bias.double().abs()
    tol = magnitude * (1e-5 if dtype == torch.float32 else 2**-8)
    assert bool(((y.double() - y64).abs() <= tol).all())


def test_int8_weight_only_equals_float64() -> None:
    w = _weight(96, 160)
    x = torch.randn(5, 160, dtype=torch.bfloat16)
    qw = quant.quantize_weight_int8(w)
    scale = (w.double().abs().amax(1, keepdim=True) / 127).float().double()
    codes = torch.round((w.double() / scale).float().double()).clamp(-127, 127)
    assert torch.equal(qw.codes.double(), codes)
    y = quant.linear_w8a16_int8(x, qw)
    y64 = (x.double() @ codes.t()) * scale.t()
    magnitude = (x.double().abs() @ codes.abs().t()) * scale.t()
    assert y.dtype == torch.bfloat16
    assert bool(((y.double() - y64).abs() <= magnitude * 2**-8).all())


def test_kv_per_head_scales_and_round_trip() -> None:
    kv = torch.randn(33, 4, 16) * torch.tensor([0.01, 1.0, 30.0, 0.0]).view(1, 4, 1)
    scale = quant.kv_head_scales(kv)
    assert scale.shape == (4,) and scale.dtype == torch.float32
    assert torch.equal(scale[:3], kv[:, :3].abs().amax(dim=(0, 2)) / FP8_MAX)
    assert float(scale[3]) == 1.0
    codes = quant.quantize_kv_fp8(kv, scale)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == kv.shape
    back = quant.dequantize_kv_fp8(codes, scale)
    bound = torch.maximum(kv.abs() * 2**-4, scale.view(1, 4, 1) * 2**-10) * (1 + 1e-6)
    assert bool(((back - kv).abs() <= bound).all())
    assert not bool(back[:, 3].any())
