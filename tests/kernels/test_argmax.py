import pytest
import torch

from kvmesh.kernels.argmax import argmax, argmax_ref


def run_case(rows, vocab, dtype, device="cpu", seed=0):
    """Random rows with planted ties, -inf rows and NaN: the kernel gives torch.argmax's ids."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=gen).to(dtype)
    if vocab > 2 and rows > 3:
        top = x.max() + 1
        late = torch.randint(vocab // 2, vocab, (1,), generator=gen).item()
        x[0, late] = top  # a tie: the earlier index wins, whatever chunk either lies in
        x[0, late // 3] = top
        x[1] = float("-inf")  # nothing above -inf: index 0
        x[2, vocab - 1] = float("nan")  # NaN beats every number (torch.argmax)
        x[3, 1:] = x[3, 0]  # all equal
    if vocab > 2 and rows > 4:
        x[4, late] = float("nan")  # two NaN: the first, whatever chunk either lies in
        x[4, late // 3] = float("nan")
    x = x.to(device)
    got = argmax(x)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, argmax_ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "rows,vocab", [(1, 1), (5, 7), (6, 4096), (4, 4097), (9, 10000), (5, 30000), (1, 9000)]
)
def test_argmax_is_torch_argmax(rows, vocab, dtype):
    run_case(rows, vocab, dtype, seed=rows * vocab)


def test_argmax_of_strided_rows_and_no_rows():
    x = torch.randn(3, 300)[:, :257]  # rows contiguous, row stride 300
    assert torch.equal(argmax(x), x.argmax(-1))
    assert argmax(torch.empty(0, 5)).shape == (0,)
