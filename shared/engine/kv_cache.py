"""Paged KV cache: one preallocated tensor and a pool of fixed-size blocks with reference counts.

kv: [num_layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]
slot of token t of a sequence = block_table[t // block_size] * block_size + t % block_size
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque

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

    Prefix cache: a full block whose K/V a completed step wrote can be given its content hash
    (`cache`); `match` then finds it by hash and `take` shares it. A freed block keeps its hash
    and content on the free list until it is allocated again, which drops the hash. The free list
    is the eviction order: blocks without a hash go to its front (nothing to keep), cached ones
    to its back (least recently freed evicted first), a table's blocks tail first (a prefix's end
    is evicted before its start, which every longer match needs).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._limbo: deque[tuple[int, int]] = deque()  # (epoch, block), epochs ascending
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # content hash -> the block holding it
        self.num_evicted = 0  # cached blocks allocated again (their content lost)
        self.epoch = 0  # the latest step launched
        self.completed = 0  # the latest step known complete

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._limbo)

    @property
    def num_cached(self) -> int:
        """Blocks holding a content hash, in use or free."""
        return len(self._cached)

    def release(self, done_epoch: int) -> None:
        """Steps up to done_epoch completed: blocks freed while they ran become allocatable."""
        self.completed = max(self.completed, done_epoch)
        while self._limbo and self._limbo[0][0] <= done_epoch:
            self._to_free_list(self._limbo.popleft()[1])

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
            h = self._hash[b]
            if h is not None:  # evicted: its content is about to be overwritten
                self._hash[b] = None
                del self._cached[h]
                self.num_evicted += 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if self.completed >= self.epoch:
                    self._to_free_list(b)
                else:
                    self._limbo.append((self.epoch, b))

    def _to_free_list(self, block: int) -> None:
        self._free[block] = None
        if self._hash[block] is None:
            self._free.move_to_end(block, last=False)

    # --------------------------------------------------------------------------- prefix cache

    def cache(self, blocks: list[int], hashes: list[int]) -> None:
        """blocks[i] holds the content hashes[i] (written by a completed step). A hash another
        block holds already stays with it: this block is then an ordinary one."""
        for b, h in zip(blocks, hashes, strict=True):
            if self._hash[b] is None and h not in self._cached:
                self._hash[b] = h
                self._cached[h] = b
                if b in self._free:  # freed already: among the cached ones now
                    self._free.move_to_end(b)

    def match(self, hashes: list[int]) -> list[int]:
        """The blocks holding the longest run of hashes from the first, in use or on the free
        list (not in limbo: `take` needs them allocatable or shared)."""
        blocks = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None or (self._refs[b] == 0 and b not in self._free):
                break
            blocks.append(b)
        return blocks

    def num_free_in(self, blocks: list[int]) -> int:
        return sum(self._refs[b] == 0 for b in blocks)

    def take(self, blocks: list[int]) -> None:
        """One more reference to each of `match`'s blocks, off the free list where free."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def check_integrity(self, owners: list[list[int]] | None = None) -> None:
        """Assert the pool is consistent; with `owners` (every live block table), also that the
        reference counts equal the number of tables holding each block."""
        free = set(self._free) | {b for _, b in self._limbo}
        assert len(free) == len(self._free) + len(self._limbo), "a block is free twice"
        for b, refs in enumerate(self._refs):
            assert (refs == 0) == (b in free), f"block {b}: {refs} refs, free={b in free}"
        assert all(self._hash[b] == h for h, b in self._cached.items()), "a hash is misfiled"
        assert sum(h is not None for h in self._hash) == len(self._cached), "an unindexed hash"
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
