"""The KV cache's share of a card: the arithmetic of shared/engine/memory.py, on made-up cards."""

from __future__ import annotations

import pytest
import torch

from kvmesh.shared.engine.memory import (
    CONTEXT_BYTES,
    SLACK_BYTES,
    CardMemory,
    headroom_bytes,
    kv_bytes_on_card,
    step_bytes,
)
from kvmesh.shared.model.config import SHAPES

GIB = 1 << 30
LLAMA3_8B = SHAPES["llama3-8b"]


def test_a_share_of_the_total_less_weights_context_and_headroom() -> None:
    card = CardMemory(total=80 * GIB, free=60 * GIB, used=16 * GIB)
    kv = kv_bytes_on_card(0.45, card, headroom=GIB)
    assert kv == int(0.45 * 80 * GIB) - 16 * GIB - CONTEXT_BYTES - GIB


def test_start_order_does_not_matter_and_shares_never_overcommit_the_card() -> None:
    """Two processes with 0.45 each: whichever starts first, both get the same KV cache, and
    the card's memory at the end is within its total."""
    total, weights, headroom = 80 * GIB, 16 * GIB, GIB
    free = total
    caches = []
    for _ in range(2):  # the second one sees what the first one took
        free -= weights + CONTEXT_BYTES
        kv = kv_bytes_on_card(0.45, CardMemory(total, free, weights), headroom)
        free -= kv
        caches.append(kv)
    assert caches[0] == caches[1]
    assert free >= 2 * headroom + int(0.1 * total) - 2  # the margin left unplanned


def test_a_process_over_its_share_costs_the_next_one_blocks_not_an_oom() -> None:
    card = CardMemory(total=80 * GIB, free=10 * GIB, used=16 * GIB)  # another took 53 GiB
    assert kv_bytes_on_card(0.45, card, headroom=GIB) == 9 * GIB  # its share would give 18


def test_a_share_too_small_for_the_weights_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"share of 0\.200 .* leaves no room .* 16\.00 GiB"):
        kv_bytes_on_card(0.2, CardMemory(80 * GIB, 80 * GIB, 16 * GIB), headroom=GIB)
    with pytest.raises(ValueError, match="less than this process's"):
        kv_bytes_on_card(0.45, CardMemory(80 * GIB, GIB // 2, 16 * GIB), headroom=GIB)


def test_headroom_covers_the_largest_step_twice_and_the_graphs() -> None:
    dtype = torch.bfloat16
    eager = step_bytes(LLAMA3_8B, 512, 64, dtype)
    graphs = step_bytes(LLAMA3_8B, 64, 64, dtype)
    # 512 tokens x (2*4096 + 2*4096 + 2*1024 + 3*14336) x 2 bytes + 64 x 128256 x (2 + 8)
    assert eager == 512 * 61440 * 2 + 64 * 128256 * 10
    assert headroom_bytes(LLAMA3_8B, dtype, 512, 64, graphs=True) == 2 * (eager + graphs) + (
        SLACK_BYTES
    )
    assert headroom_bytes(LLAMA3_8B, dtype, 512, 64, graphs=False) == 2 * eager + SLACK_BYTES
    assert headroom_bytes(LLAMA3_8B, dtype, 512, 64, graphs=True) < 2 * GIB
