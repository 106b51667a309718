"""The layer checksum both ends of the NCCL transport compute on the GPU.

The bytes viewed as little-endian int64 words w_i (a tail of fewer than 8 bytes as single
bytes), sum_i w_i * (2i + 1) mod 2^64. Odd weights are invertible mod 2^64, so any change to one
word, and any swap of two different words, changes it. Integer sums are exact and order-free,
so every device computes the same value.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def _weighted_sum(words: torch.Tensor, start: int) -> torch.Tensor:
    """sum_i words[i] * (2 (start + i) + 1) mod 2^64; words: [m] int64, any device."""
    m = words.numel()
    rows = m // 64
    dev = words.device
    # i = 64 r + c  ->  2i + 1 = 128 r + (2c + 1): no weight tensor as large as the data
    grid = words[: rows * 64].view(rows, 64)
    cols = torch.arange(1, 128, 2, dtype=torch.int64, device=dev)  # [64] 2c + 1
    row_ids = torch.arange(rows, dtype=torch.int64, device=dev)  # [rows]
    total = (grid * cols).sum() + 128 * (grid.sum(dim=1) * row_ids).sum()
    tail = words[rows * 64 :]
    tail_w = torch.arange(2 * rows * 64 + 1, 2 * m + 1, 2, dtype=torch.int64, device=dev)
    total = total + (tail * tail_w).sum()
    return total + 2 * start * words.sum()


def layer_checksum(data: torch.Tensor) -> torch.Tensor:
    """The layer checksum (module docstring) of a contiguous tensor: a 0-d int64 tensor on its
    device, computed on the current stream without a host sync."""
    raw = data.reshape(-1).view(torch.uint8)
    n8 = raw.numel() // 8 * 8
    total = _weighted_sum(raw[:n8].view(torch.int64), 0)
    if n8 < raw.numel():
        total = total + _weighted_sum(raw[n8:].to(torch.int64), n8 // 8)
    return total


class Checksummer:
    """layer_checksum in two kernels: the weights 2i + 1 are kept on the device. Use it on one
    stream only (the weights are allocated and read there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._weights = torch.empty(0, dtype=torch.int64)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        raw = data.reshape(-1).view(torch.uint8)
        if raw.numel() % 8:
            return layer_checksum(data)
        words = raw.view(torch.int64)  # [m]
        m = words.numel()
        if self._weights.numel() < m:  # the old weights are freed in this stream's order
            size = 1 << max(m - 1, 1).bit_length()
            self._weights = torch.arange(1, 2 * size, 2, dtype=torch.int64, device=self.device)
        return (words * self._weights[:m]).sum()


def checksum_value(data: torch.Tensor) -> int:
    """layer_checksum as a Python uint64 (syncs)."""
    return int(layer_checksum(data).item()) & MASK64
