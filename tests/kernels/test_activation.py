import pytest
import torch
from kernel_inputs import assert_close, poison_allocator

from kvmesh.kernels.activation import silu_and_mul, silu_and_mul_ref


def run_case(rows, inter, dtype, device="cpu", seed=0, kernel=silu_and_mul):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(device=device, dtype=dtype)
    ref64 = silu_and_mul_ref(x.double())
    poison_allocator(device)
    out = kernel(x)
    assert out.shape == (rows, inter) and out.dtype == dtype
    assert_close(out, ref64, dtype)
    assert_close(silu_and_mul_ref(x), ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 64), (19, 1536), (5, 2500)])
def test_silu_and_mul(dtype, rows, inter):
    run_case(rows, inter, dtype, seed=inter)


def test_reference_is_silu_gate_times_up():
    x = torch.tensor([[0.0, 1.0, -2.0, 2.0, 3.0, 0.5]])
    want = torch.tensor([[0.0, 1 / (1 + torch.e**-1) * 3.0, -2 / (1 + torch.e**2) * 0.5]])
    torch.testing.assert_close(silu_and_mul_ref(x), want)
