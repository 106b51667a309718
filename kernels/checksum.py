"""The KV handoff's layer checksum: one pass over the bytes, on a small grid.

    the layer's bytes as little-endian int64 words w_i, then the tail (< 8 bytes) as single
    bytes, each its own word:      checksum = sum_i w_i * (2i + 1)   mod 2^64

Odd weights are invertible mod 2^64, so changing one word, or swapping two different words,
changes the sum. Integer sums are exact and order-free: every device and every grid computes
the same value (int64 multiply and add wrap mod 2^64 on the GPU, in numpy under
TRITON_INTERPRET, and in torch).

The Triton version runs beside NCCL's copy kernels, so it keeps out of their way: a persistent
grid of PROGRAMS programs, each striding over chunks of BLOCK words and reading every byte once
(no temporaries), writes one int64 partial; a one-program kernel adds the partials and the tail.
Both are enqueued on the current stream; nothing waits on the host.

    chunks:  | c0 | c1 | c2 | ... | cP | cP+1 | ...      program p takes c_p, c_p+P, c_p+2P, ...
"""

import torch
import triton
import triton.language as tl

PROGRAMS = 32  # a fraction of an H100's 132 SMs; 32 KiB in flight each reads at > 1 TB/s
BLOCK = 4096  # words (or bytes, when unaligned) per program per iteration


def _bytes_of(data: torch.Tensor) -> torch.Tensor:
    assert data.is_contiguous(), "the checksum reads the tensor's bytes in memory order"
    return data.reshape(-1).view(torch.uint8)


def _output(data: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty((), dtype=torch.int64, device=data.device)
    assert out.dtype == torch.int64 and out.numel() == 1 and out.device == data.device
    return out


def layer_checksum_ref(data: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The checksum (module docstring) of a contiguous tensor's bytes, as an int64 (the uint64
    value's bit pattern) written into `out` (a 1-element int64 tensor on data's device) or a
    new 0-d tensor, which is returned."""
    raw = _bytes_of(data)
    n8 = raw.numel() // 8
    shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=raw.device)  # [8]
    # bytes -> words by shifting and adding disjoint bit fields: exact, at any alignment
    words = (raw[: 8 * n8].view(n8, 8).to(torch.int64) << shifts).sum(dim=1)  # [n8]
    words = torch.cat([words, raw[8 * n8 :].to(torch.int64)])  # [n8 + tail]
    weights = torch.arange(1, 2 * words.numel() + 1, 2, dtype=torch.int64, device=raw.device)
    result = _output(raw, out)
    result.copy_((words * weights).sum().reshape(result.shape))
    return result


@triton.jit
def _weighted(src_ptr, j, n, MASKED: tl.constexpr, BYTES: tl.constexpr):
    """x_j * weight_j for the elements j ([BLOCK] int64) of src (0 where j >= n if MASKED)."""
    x = tl.load(src_ptr + j, mask=j < n, other=0) if MASKED else tl.load(src_ptr + j)
    # byte j is byte j % 8 of word j // 8: its weight is (2 (j // 8) + 1) 2^(8 (j % 8))
    weight = (2 * (j >> 3) + 1) << ((j & 7) * 8) if BYTES else 2 * j + 1
    return x.to(tl.int64) * weight  # uint8 zero-extends; wraps mod 2^64, as every sum below


@triton.jit
def _partials_kernel(src_ptr, partials_ptr, n, num_full, BYTES: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    # src: n int64 words, or (BYTES) the 8 * n8 bytes of the words when they are not 8-aligned;
    # num_full = n // BLOCK chunks need no mask (their loads vectorize whatever n is)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for chunk in range(pid, num_full, tl.num_programs(0)):
        j = tl.cast(chunk, tl.int64) * BLOCK + lanes  # int64: offsets may pass 2^31
        acc += _weighted(src_ptr, j, n, False, BYTES)
    if pid == 0:  # the last, partial chunk
        j = tl.cast(num_full, tl.int64) * BLOCK + lanes
        acc += _weighted(src_ptr, j, n, True, BYTES)
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _finish_kernel(partials_ptr, num_partials, tail_ptr, num_tail, num_words, out_ptr,
                   P: tl.constexpr):  # fmt: skip
    p = tl.arange(0, P)
    total = tl.sum(tl.load(partials_ptr + p, mask=p < num_partials, other=0), axis=0)
    t = tl.arange(0, 8).to(tl.int64)
    tail = tl.load(tail_ptr + t, mask=t < num_tail, other=0).to(tl.int64)  # words n8, n8 + 1, ..
    total += tl.sum(tail * (2 * (num_words + t) + 1), axis=0)
    tl.store(out_ptr, total)


def layer_checksum(data: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `layer_checksum_ref` (same contract), without a host sync."""
    raw = _bytes_of(data)
    result = _output(raw, out)
    n8 = raw.numel() // 8
    aligned = raw.storage_offset() % 8 == 0 and raw.data_ptr() % 8 == 0
    src = raw[: 8 * n8].view(torch.int64) if aligned else raw  # int64 loads need 8-alignment
    n = n8 if aligned else 8 * n8
    programs = min(triton.cdiv(n, BLOCK), PROGRAMS)
    partials = torch.empty(max(programs, 1), dtype=torch.int64, device=raw.device)
    if programs:
        _partials_kernel[(programs,)](
            src, partials, n, n // BLOCK, BYTES=not aligned, BLOCK=BLOCK, num_warps=8
        )
    tail = raw[8 * n8 :]
    # an empty tensor may have no address to pass: point at the partials, read nothing
    tail_src = tail if tail.numel() else partials.view(torch.uint8)
    _finish_kernel[(1,)](
        partials, programs, tail_src, tail.numel(), n8, result,
        P=triton.next_power_of_2(max(programs, 1)), num_warps=1,
    )  # fmt: skip
    return result
