"""Content hashes of full KV blocks, for prefix caching.

A block's K/V depend on every token before it and on what computes them, so its hash chains:

    root     = H(salt, bs)             salt: model, weights' seed, dtype, quantization, KV dtype
    h[0]     = H(root, tokens[0:bs])         (all that changes a block's content besides tokens)
    h[i]     = H(h[i-1], tokens[i*bs:(i+1)*bs])

Equal hashes mean equal prefixes computed the same way; 128-bit BLAKE2b digests make a collision
negligible, and they are the same in every process (a prefix index shared over the mesh).
"""

from __future__ import annotations

import hashlib
from array import array

from kvmesh.shared.engine.sequence import PENDING, Sequence


def _digest(parent: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class BlockHasher:
    """Extends a sequence's block hashes over its full blocks of known tokens."""

    def __init__(self, salt: str, block_size: int) -> None:
        self.block_size = block_size
        self.root = _digest(b"kvmesh-kv-block", f"{salt}|block size {block_size}".encode())

    def extend(self, seq: Sequence, num_blocks: int) -> list[int]:
        """seq.block_hashes, grown to cover at most its first num_blocks blocks: stops before a
        block that is not full or holds a token still being sampled (PENDING)."""
        bs, hashes = self.block_size, seq.block_hashes
        parent = hashes[-1].to_bytes(16, "little") if hashes else self.root
        num_blocks = min(num_blocks, seq.num_tokens // bs)
        for i in range(len(hashes), num_blocks):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            if PENDING in tokens:
                break
            parent = _digest(parent, array("q", tokens).tobytes())
            hashes.append(int.from_bytes(parent, "little"))
        return hashes
