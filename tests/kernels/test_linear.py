import pytest
import torch
import torch.nn.functional as F
from kernel_inputs import assert_close, poison_allocator

from kernels.linear import MAX_M, LinearTuning, linear, linear_ref

DOT = [LinearTuning(16, 64, 4, 2), LinearTuning(32, 32, 4, 3)]
GEMV = LinearTuning(8, 128, 4, 2, dot=False)


def run_case(m, n, k, dtype, tuning=None, device="cpu", seed=0, row_pad=0):
    """x [m, k] with rows row_pad elements apart beyond k (a strided view), w [n, k]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k + row_pad, generator=gen, device=device).to(dtype)[:, :k]
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    want = linear_ref(x.double(), w.double())
    poison_allocator(device)
    y = linear(x, w, tuning)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, dtype)
    torch.testing.assert_close(linear(x, w, tuning), y, rtol=0, atol=0)  # reproducible
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tuning", DOT, ids=["n16k64", "n32k32"])
@pytest.mark.parametrize(
    "m,n,k", [(1, 45, 200), (3, 100, 333), (16, 64, 256), (7, 1, 5), (24, 40, 96), (64, 33, 70)]
)
def test_dot_path(m, n, k, dtype, tuning):
    run_case(m, n, k, dtype, tuning, seed=m * n + k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(45, 200), (64, 256), (3, 1000)])
def test_gemv_path(n, k, dtype):
    run_case(1, n, k, dtype, GEMV, seed=n + k)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_row_strides(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, k, pad = (int(torch.randint(lo, hi, (1,), generator=gen))
                    for lo, hi in ((1, MAX_M + 1), (1, 150), (1, 300), (0, 40)))  # fmt: skip
    tuning = GEMV if m == 1 and seed % 2 else DOT[seed % 2]
    for dtype in (torch.float32, torch.float16):
        run_case(m, n, k, dtype, tuning, seed=seed, row_pad=pad)


def test_default_call_runs_the_kernel_for_half_precision(monkeypatch):
    def no_torch_linear(*args, **kwargs):
        raise AssertionError("F.linear called")

    monkeypatch.setattr(F, "linear", no_torch_linear)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen).to(torch.float16)
    w = torch.randn(70, 96, generator=gen).to(torch.float16)
    assert_close(linear(x, w), x.double() @ w.double().T, torch.float16)


@pytest.mark.parametrize("m,dtype", [(4, torch.float32), (MAX_M + 1, torch.float16),
                                     (0, torch.float16)])  # fmt: skip
def test_fallback_is_torch_linear(m, dtype):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 64, generator=gen).to(dtype)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=0, atol=0)
