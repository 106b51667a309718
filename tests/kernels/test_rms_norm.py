import pytest
import torch
from kernel_inputs import assert_close, poison_allocator

from kvmesh.kernels.rms_norm import rms_norm, rms_norm_ref


def run_case(
    rows, hidden, dtype, with_residual, device="cpu", seed=0, kernel=rms_norm, gain=True
):  # fmt: skip
    """gain=False: no weight (a model that folded it into the next projection)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    weight = weight if gain else None
    res = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    residual = res if with_residual else None
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    r64 = None if residual is None else residual.double()
    w64 = None if weight is None else weight.double()
    out64, res64 = rms_norm_ref(x.double(), w64, 1e-5, r64)
    poison_allocator(device)
    out, new_res = kernel(x, weight, 1e-5, residual)
    assert out.dtype == dtype and new_res.dtype == dtype and out.shape == x.shape
    assert_close(out, out64, dtype, factor=2)
    assert_close(new_res, res64, dtype)
    # same rounding points as the eager reference: equal to within one ulp of the output
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm(dtype, with_residual, hidden):
    run_case(37, hidden, dtype, with_residual, seed=hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_without_a_weight_is_x_over_its_rms(dtype):
    run_case(9, 576, dtype, with_residual=True, seed=5, gain=False)
    x = torch.randn(3, 64, dtype=dtype)
    inv_rms = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert_close(rms_norm(x, None, 1e-5)[0], x.double() * inv_rms, dtype)


def test_reference_follows_hf_rounding_order():
    x = torch.randn(4, 64, dtype=torch.float16)
    w = torch.randn(64, dtype=torch.float16)
    var = x.float().pow(2).mean(-1, keepdim=True)
    want = w * (x.float() * torch.rsqrt(var + 1e-6)).to(torch.float16)
    out, res = rms_norm_ref(x, w, 1e-6)
    assert res is x
    torch.testing.assert_close(out, want, rtol=0, atol=0)
