"""Paged KV cache: one preallocated tensor and a pool of fixed-size blocks with reference counts.

kv: [num_layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]
slot of token t of a sequence = block_table[t // block_size] * block_size + t % block_size
"""

from __future__ import annotations

import os
from collections import deque

import torch

from kvmesh.shared.engine.shared_memory import shared_zeros
from kvmesh.shared.model.config import ModelConfig


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    """Free list plus reference counts. Invariant: free + limbo + used == total, no block listed
    twice.

    Limbo: while device steps run ahead of the host, a block freed now may still be written by a
    step already launched. Such a block waits in limbo, tagged with `epoch` (the latest launched
    step) until `release(done)` says that step completed; only then can it be allocated (and
    written by another stream, e.g. a KV handoff's scatter).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._limbo: deque[tuple[int, int]] = deque()  # (epoch, block), epochs ascending
        self._refs = [0] * num_blocks
        self.epoch = 0  # the latest step launched
        self.completed = 0  # the latest step known complete

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._limbo)

    def release(self, done_epoch: int) -> None:
        """Steps up to done_epoch completed: blocks freed while they ran become allocatable."""
        self.completed = max(self.completed, done_epoch)
        while self._limbo and self._limbo[0][0] <= done_epoch:
            self._free.append(self._limbo.popleft()[1])

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self.completed >= self.epoch:
                    self._free.append(b)
                else:
                    self._limbo.append((self.epoch, b))

    def check_integrity(self, owners: list[list[int]] | None = None) -> None:
        """Assert the pool is consistent; with `owners` (every live block table), also that the
        reference counts equal the number of tables holding each block."""
        free = set(self._free) | {b for _, b in self._limbo}
        assert len(free) == len(self._free) + len(self._limbo), "a block is free twice"
        for b, refs in enumerate(self._refs):
            assert (refs == 0) == (b in free), f"block {b}: {refs} refs, free={b in free}"
        if owners is not None:
            counts = [0] * self.num_blocks
            for table in owners:
                for b in table:
                    counts[b] += 1
            assert counts == self._refs, "reference counts differ from the block tables"


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return model.kv_bytes_per_token(dtype.itemsize) * block_size


def allocate_kv_cache(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
    device: torch.device, shared: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Zeros, [L, 2, num_blocks, block_size, kv_heads, head_dim]. `shared`: another process of
    this host can map it (the IPC handoff writes a decode engine's blocks from the prefill's
    process): on CPU in a memory file (shared_memory); CUDA memory can be mapped as it is."""
    shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    if shared and device.type == "cpu" and hasattr(os, "memfd_create"):
        return shared_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)
