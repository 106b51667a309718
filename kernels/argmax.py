"""Row argmax of logits: greedy decoding's token ids, [S, V] -> [S] int64.

torch's argmax over [64, 128256] bf16 took 38 us of the H100's batch-64 decode step (a generic
reduction kernel). Here each row is cut into chunks, enough programs in all to fill the card
(one program a row streamed a 256 KiB row alone: 32 us at batch 64), each chunk reports its
answer, and a second launch picks each row's among its chunks'. Same answer as torch.argmax:
the first index of the largest value, and a row holding NaN answers its first NaN (NaN
compares above everything there).
"""

import torch
import triton
import triton.language as tl

from kvmesh.kernels.device import num_sms
from kvmesh.kernels.pdl import pdl_args, pdl_enter

BLOCK = 2048  # columns a program reads at a time
PROGRAMS_PER_SM = 4  # chunk programs a launch aims for
MAX_CHUNKS = 64  # chunks a row at most: one compile of the merge for any number of rows


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [S, V] -> [S] int64
    return x.argmax(dim=-1)


# the chunk count follows the row count: not a specialization (one compile for all batches)
@triton.jit(do_not_specialize=["num_chunks"])
def _argmax_chunk_kernel(
    x_ptr, val_ptr, idx_ptr, n, chunk, num_chunks, stride_x,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # chunk c of a row: columns [c * chunk, (c + 1) * chunk); its answer is its first NaN (value
    # NaN) or else its largest value and that value's first index
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, n)
    lanes = tl.arange(0, BLOCK)
    # per lane: the largest value so far and its first index (columns go up, so a strictly
    # larger value is the only one that moves it); the first NaN index apart
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = lo + lanes
    nan_idx = tl.full([BLOCK], n, tl.int32)
    for start in range(lo, hi, BLOCK):
        cols = start + lanes
        v = tl.load(x_ptr + row * stride_x + cols, mask=cols < hi, other=float("-inf"))
        v = v.to(tl.float32)
        nan_idx = tl.minimum(nan_idx, tl.where(v != v, cols, n))
        better = v > best
        best = tl.where(better, v, best)
        best_idx = tl.where(better, cols, best_idx)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, n), axis=0)
    first_nan = tl.min(nan_idx, axis=0)
    out = row * num_chunks + part
    tl.store(val_ptr + out, tl.where(first_nan < n, float("nan"), top))
    tl.store(idx_ptr + out, tl.where(first_nan < n, first_nan, first))


@triton.jit(do_not_specialize=["num_chunks"])
def _argmax_merge_kernel(
    val_ptr, idx_ptr, out_ptr, n, num_chunks, CHUNKS: tl.constexpr, PDL: tl.constexpr
):
    # chunks go up in index: the first chunk with a NaN, else the first with the largest value
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS)
    ok = c < num_chunks
    v = tl.load(val_ptr + row * num_chunks + c, mask=ok, other=float("-inf"))
    i = tl.load(idx_ptr + row * num_chunks + c, mask=ok, other=n)
    is_nan = v != v
    first_nan = tl.min(tl.where(is_nan, i, n), axis=0)
    top = tl.max(tl.where(is_nan, float("-inf"), v), axis=0)
    first = tl.min(tl.where(ok & (v == top), i, n), axis=0)
    tl.store(out_ptr + row, tl.where(first_nan < n, first_nan, first).to(tl.int64))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `argmax_ref`: x [S, V] (rows contiguous, V < 2^31) -> [S] int64."""
    assert x.dim() == 2 and x.stride(1) == 1 and 0 < x.shape[1] < 2**31
    rows, n = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    wanted = min(triton.cdiv(PROGRAMS_PER_SM * num_sms(x.device), rows), MAX_CHUNKS)
    chunk = triton.cdiv(triton.cdiv(n, min(wanted, triton.cdiv(n, BLOCK))), BLOCK) * BLOCK
    chunks = triton.cdiv(n, chunk)  # none empty
    val = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, chunks), dtype=torch.int32, device=x.device)
    pdl = pdl_args(x.device)
    _argmax_chunk_kernel[(rows, chunks)](x, val, idx, n, chunk, chunks, x.stride(0), BLOCK=BLOCK,
                                         num_warps=4, **pdl)  # fmt: skip
    _argmax_merge_kernel[(rows,)](val, idx, out, n, chunks, CHUNKS=MAX_CHUNKS, num_warps=1, **pdl)
    return out
