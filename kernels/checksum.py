"""The KV handoff's layer checksum: one pass over the bytes, on a small grid, for a whole list of
layers in one launch.

    the layer's bytes as little-endian int64 words w_i, then the tail (< 8 bytes) as single
    bytes, each its own word:      checksum = sum_i w_i * (2i + 1)   mod 2^64

Odd weights are invertible mod 2^64, so changing one word, or swapping two different words,
changes the sum. Integer sums are exact and order-free: every device and every grid computes
the same value (int64 multiply and add wrap mod 2^64 on the GPU, in numpy under
TRITON_INTERPRET, and in torch).

The Triton version runs beside NCCL's copy kernels, so it keeps out of their way: one launch of
a persistent grid of PROGRAMS programs walks a table of layers (address, words, tail bytes,
alignment; any sizes, anywhere in memory). For each layer, program p strides over chunks of
BLOCK words (bytes, when the layer is not 8-aligned), reading every byte once, and writes one
int64 partial; program 0 also takes the last, partial chunk and the tail. A layer's partials
add up to its checksum: on the host (`fold`, Python integers), or on the device
(`layer_checksum`). Everything is enqueued on the current stream; nothing waits on the host.

    chunks of a layer:  | c0 | c1 | c2 | ... | cP | cP+1 | ...   program p: c_p, c_p+P, ...
    partials:           [num_layers, PROGRAMS] int64
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

PROGRAMS = 32  # a fraction of an H100's 132 SMs; 32 KiB in flight each reads at > 1 TB/s
BLOCK = 4096  # words (or bytes, when unaligned) per program per iteration
MASK64 = (1 << 64) - 1


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
def _share(src_ptr, n, pid, programs, BYTES: tl.constexpr, BLOCK: tl.constexpr):
    """Program pid's share of sum_j x_j * weight_j over the n elements of src: chunks pid,
    pid + programs, ... of the full ones (unmasked: their loads vectorize), and for program 0
    the last, partial one."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    num_full = (n // BLOCK).to(tl.int32)
    for chunk in range(pid, num_full, programs):
        j = tl.cast(chunk, tl.int64) * BLOCK + lanes  # int64: offsets may pass 2^31
        acc += _weighted(src_ptr, j, n, False, BYTES)
    if pid == 0:
        j = tl.cast(num_full, tl.int64) * BLOCK + lanes
        acc += _weighted(src_ptr, j, n, True, BYTES)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["num_layers"])
def _partials_kernel(table_ptr, partials_ptr, num_layers, BLOCK: tl.constexpr):
    # table: [num_layers, 4] int64 rows (address, n8 whole words, tail bytes, alignment);
    # partials: [num_layers, programs] int64
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    t = tl.arange(0, 8).to(tl.int64)
    for layer in range(num_layers):
        row = table_ptr + 4 * layer
        address = tl.load(row)
        n8 = tl.load(row + 1)
        num_tail = tl.load(row + 2)
        alignment = tl.load(row + 3)
        # each path casts the address itself: multiple_of marks the value it is given
        if alignment == 16:  # loads of 2 words at once
            words = tl.multiple_of(address.to(tl.pointer_type(tl.int64)), 16)
            total = _share(words, n8, pid, programs, False, BLOCK)
        elif alignment == 8:  # loads of a word
            total = _share(address.to(tl.pointer_type(tl.int64)), n8, pid, programs, False, BLOCK)
        else:  # the bytes of the words
            src = address.to(tl.pointer_type(tl.uint8))
            total = _share(src, 8 * n8, pid, programs, True, BLOCK)
        if pid == 0:  # the tail's bytes are words n8, n8 + 1, ...
            tail_ptr = (address + 8 * n8).to(tl.pointer_type(tl.uint8))
            tail = tl.load(tail_ptr + t, mask=t < num_tail, other=0).to(tl.int64)
            total += tl.sum(tail * (2 * (n8 + t) + 1), axis=0)
        tl.store(partials_ptr + layer * programs + pid, total)


def _rows(data: torch.Tensor, count: int) -> list[int]:
    """The table rows of `count` equal layers back to back in `data`."""
    assert data.is_contiguous(), "the checksum reads the tensor's bytes in memory order"
    size = data.numel() * data.element_size() // count
    start = data.data_ptr()
    rows: list[int] = []
    for i in range(count):
        address = start + i * size
        alignment = 16 if address % 16 == 0 else 8 if address % 8 == 0 else 1
        rows += (address, size // 8, size % 8, alignment)
    return rows


def layer_table(
    layers: Sequence[torch.Tensor], counts: Sequence[int] | None = None
) -> torch.Tensor:
    """The kernel's table of contiguous tensors (all on one device), tensor i holding counts[i]
    equal layers back to back (default 1): [layers * 4] int64 on that device, copied up on the
    current stream (it reads only their addresses and sizes, so it may go ahead of the work
    that writes them)."""
    assert layers, "no layers to checksum"
    device = layers[0].device
    assert all(x.device == device for x in layers), "the layers of one launch share a device"
    counts = counts or [1] * len(layers)
    rows = [v for x, n in zip(layers, counts, strict=True) for v in _rows(x, n)]
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return table.to(device, non_blocking=True)


def checksum_partials(
    layers: Sequence[torch.Tensor], programs: int = PROGRAMS, table: torch.Tensor | None = None,
    counts: Sequence[int] | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Partial sums of the checksum of each layer of the contiguous tensors (all on one device;
    tensor i holds counts[i] equal layers back to back, default 1), as [layers, programs] int64
    on that device, or in `out` (contiguous; on a GPU it may be pinned host memory, which the
    launch writes directly): row i adds up to layer i's checksum (`fold`). One launch (of
    `table`, else `layer_table(layers, counts)`), enqueued on the current stream without a host
    sync; the tensors (and `out`) must stay alive and unchanged until it ran."""
    num_layers = sum(counts) if counts else len(layers)
    table = layer_table(layers, counts) if table is None else table
    assert table.numel() == 4 * num_layers and table.device == layers[0].device
    if out is None:
        out = torch.empty((num_layers, programs), dtype=torch.int64, device=table.device)
    assert out.shape == (num_layers, programs) and out.dtype == torch.int64
    assert out.is_contiguous()
    _partials_kernel[(programs,)](table, out, num_layers, BLOCK=BLOCK, num_warps=8)
    return out


def fold(partials: torch.Tensor) -> list[int]:
    """The checksums (uint64 values) whose partial sums are the rows of `partials` ([k, P]
    int64, on the host)."""
    return [sum(row) & MASK64 for row in partials.tolist()]


def layer_checksum(data: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `layer_checksum_ref` (same contract), without a host sync."""
    result = _output(_bytes_of(data), out)
    total = checksum_partials([data]).sum()  # int64: wraps mod 2^64 like the partials
    result.copy_(total.reshape(result.shape))
    return result
