"""The quantized linear (tests/kernels/test_linear_quant.py) in bf16 on CUDA: the skinny
kernel's FP8 and INT8 weight forms on Llama-3-8B's shapes at 1, 16 and 64 rows, and the W8A8
prefill path (per-token FP8 activations, torch._scaled_mm) at 256 rows.

Run on a GPU machine, without TRITON_INTERPRET:
`python -m pytest tests/gpu/test_linear_quant_gpu.py`.
"""

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

import test_linear_quant as quant_cases  # noqa: E402
from kernel_inputs import assert_close, rel_err  # noqa: E402

import kvmesh.kernels.linear as linear_module  # noqa: E402
from kvmesh.kernels.act_quant import quantize_rows_fp8, quantize_rows_fp8_ref  # noqa: E402
from kvmesh.kernels.linear import LinearTuning, RowSquares, linear, linear_ref  # noqa: E402

BF16 = torch.bfloat16

# Llama-3-8B's projections as the model calls them: (N, K, residual, norm, swiglu)
LLAMA3_8B_QUANT = {
    "qkv": (6144, 4096, False, "gain", False),
    "o": (4096, 4096, True, None, False),
    "gate_up": (28672, 4096, False, "gain", True),
    "down": (4096, 14336, True, None, False),
}


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    seed = torch.seed() % (1 << 31)
    print(f"seed {seed}")
    torch.manual_seed(seed)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("proj", list(LLAMA3_8B_QUANT))
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_linear_tuned_or_autotuned(scheme, proj, m):
    """The default path (the card's table, or the autotuner on the first call) against the
    weight-only product of the codes in float64."""
    n, k, residual, norm, swiglu = LLAMA3_8B_QUANT[proj]
    quant_cases.run_quant_case(m, n, k, BF16, scheme, None, residual=residual, norm=norm,
                               swiglu=swiglu, device="cuda")  # fmt: skip


QUANT_TUNINGS = [
    LinearTuning(64, 128, 4, 6),
    LinearTuning(128, 128, 8, 4),
    LinearTuning(64, 128, 4, 6, split_k=2),
    LinearTuning(16, 512, 4, 3, dot=False),
]
QUANT_IDS = ["n64k128", "n128k128", "split2", "gemv"]  # fmt: skip


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("tuning", QUANT_TUNINGS, ids=QUANT_IDS)
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_linear_configs(scheme, tuning, m):
    """Explicit configs on qkv (gain on the codes; a split one runs the norm kernel first) and
    gate_up (fused SwiGLU where the config allows it)."""
    if not tuning.dot and m > 1:
        return
    quant_cases.run_quant_case(m, 6144, 4096, BF16, scheme, tuning, norm="gain", device="cuda")
    quant_cases.run_quant_case(m, 28672, 4096, BF16, scheme, tuning, norm="gain", swiglu=True,
                               device="cuda")  # fmt: skip


@pytest.mark.parametrize("consumer", [LinearTuning(64, 128, 4, 6),
                                      LinearTuning(64, 128, 4, 6, split_k=2)],
                         ids=["n64k128", "split2"])  # fmt: skip
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_quantized_linear_takes_handed_squares(scheme, consumer):
    """o hands its rows' squares to a quantized qkv whose gain is kept apart (the model's
    decode step at 16 rows): the same result as the reference's norm."""
    m, k = 16, 4096
    a = torch.randn(m, k, device="cuda", dtype=BF16)
    wa = (torch.randn(k, k, device="cuda") / k**0.5).to(BF16)
    h = torch.randn(m, k, device="cuda", dtype=BF16) * 3
    squares = RowSquares()
    linear(a, wa, LinearTuning(64, 128, 4, 6), residual=h, out=h, squares_out=squares)
    assert squares.parts is not None
    w = quant_cases._quantized(6144, k, scheme, "cuda")
    g = (1 + torch.randn(k, device="cuda") / 4).to(BF16)
    y = linear(h, w, consumer, norm=(g, 1e-5), squares=squares)
    assert_close(y, linear_ref(h.double(), w, norm=(g.double(), 1e-5)), BF16, factor=2)


def test_activation_quantization_bit_exact_on_gpu():
    """The per-token FP8 kernel gives the reference's codes and scales bit for bit (IEEE
    quotient, round to nearest even on the E4M3 grid, saturation, signed zeros)."""
    x = torch.randn(300, 4096, device="cuda") * torch.logspace(-6, 4, 300, device="cuda")[:, None]
    x = x.to(BF16)
    x[7] = 0
    x[9, ::5] = -0.0
    codes, scale = quantize_rows_fp8(x)
    want_codes, want_scale = quantize_rows_fp8_ref(x)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(scale, want_scale)


@pytest.mark.parametrize("proj", list(LLAMA3_8B_QUANT))
def test_fp8_prefill_rows_take_scaled_mm(proj):
    """At 256 rows (past MAX_M) FP8 is W8A8: the activation kernel (norm fused) then
    torch._scaled_mm with row-wise scales, against linear_ref's W8A8 grid in fp32 torch, and
    against the same codes multiplied in fp32 (the fallback): the GEMM's accumulation and its
    one bf16 rounding are all that differ."""
    n, k, residual, norm, swiglu = LLAMA3_8B_QUANT[proj]
    m = 256
    assert linear_module._scaled_mm_takes(torch.empty(m, k, device="cuda", dtype=BF16),
                                          torch.empty(n, k, device="cuda"))  # fmt: skip
    x = torch.randn(m, k, device="cuda", dtype=BF16) * 2
    w = quant_cases._quantized(n, k, "fp8", "cuda")
    g = (1 + torch.randn(k, device="cuda") / 4).to(BF16)
    nrm = (g, 1e-5) if norm else None
    r = torch.randn(m, n // 2 if swiglu else n, device="cuda", dtype=BF16) if residual else None
    y = linear(x, w, residual=r, norm=nrm, swiglu=swiglu)
    want = linear_ref(x, w, residual=r, norm=nrm, swiglu=swiglu)
    assert y.shape == want.shape and y.dtype == BF16
    assert_close(y, want.double(), BF16)
    # the GEMM alone on the same codes
    codes_x, scale_x = quantize_rows_fp8(x)
    product = linear_module.product_w8a8(x, w)
    fp32 = (codes_x.float() @ w.codes.float().t()) * scale_x * w.scale.t()
    assert rel_err(product, fp32) < 4e-3


@pytest.mark.parametrize("m", [65, 256])
def test_int8_prefill_rows_are_weight_only(m):
    """INT8 past MAX_M: cuBLAS on the codes converted to bf16, scaled after (weight-only)."""
    n, k = 6144, 4096
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    w = quant_cases._quantized(n, k, "int8", "cuda")
    g = (1 + torch.randn(k, device="cuda") / 4).to(BF16)
    y = linear(x, w, norm=(g, 1e-5))
    assert_close(y, linear_ref(x.double(), w, norm=(g.double(), 1e-5)), BF16)
