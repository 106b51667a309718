"""How many bytes the KV cache takes on its device.

On a CPU the cache gets a byte budget. On a GPU a process gets a *share* of the card's total
memory for everything it puts there, so that processes sharing a card split it explicitly and
none can starve another, whatever order they start in (`kvmesh up` gives each of the k
processes on a card 1/k of the mesh's share):

    KV bytes = share * total
               - used          this process's allocations so far: weights, RoPE tables
               - CONTEXT_BYTES the CUDA context, kernel modules, communicator buffers (outside
                               torch's allocator)
               - headroom      twice the largest eager step's and the decode graphs'
                               transient tensors (allocator slack), plus SLACK_BYTES

and never more than the card has free now, less the headroom: a process outside the plan
holding memory costs blocks (and a warning), not an out-of-memory error later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvmesh.shared.model.config import ModelConfig

log = logging.getLogger(__name__)

CONTEXT_BYTES = 1 << 30
SLACK_BYTES = 512 << 20  # cuBLAS workspaces, Triton launch buffers, small step inputs
GIB = float(1 << 30)


@dataclass(frozen=True)
class CardMemory:
    """A card's memory as one process sees it (bytes)."""

    total: int
    free: int  # on the card, all processes counted
    used: int  # by this process's allocator (torch.cuda.memory_reserved)


def step_bytes(model: ModelConfig, tokens: int, sampled: int, dtype: torch.dtype) -> int:
    """An upper bound on one forward step's transient tensors: per token the residual stream
    and its normed copy, qkv, the attention output, gate_up and its product; per sampled row
    the logits, their fp32 copy and the sampler's probabilities."""
    per_token = 2 * model.hidden_size + 2 * model.q_size + 2 * model.kv_size
    per_token += 3 * model.intermediate_size
    per_row = model.vocab_size * (dtype.itemsize + 2 * 4)
    return tokens * per_token * dtype.itemsize + sampled * per_row


def headroom_bytes(
    model: ModelConfig, dtype: torch.dtype, max_batched_tokens: int, max_seqs: int, graphs: bool
) -> int:
    """What a process keeps free beside its weights and KV cache for its steps to run."""
    eager = step_bytes(model, max_batched_tokens, min(max_seqs, max_batched_tokens), dtype)
    graphed = step_bytes(model, max_seqs, max_seqs, dtype) if graphs else 0  # their own pool
    return 2 * (eager + graphed) + SLACK_BYTES


def kv_bytes_on_card(share: float, card: CardMemory, headroom: int) -> int:
    """The KV cache's bytes for a process allowed `share` of the card (see the module doc);
    ValueError when the share leaves nothing for it."""
    planned = int(share * card.total) - card.used - CONTEXT_BYTES - headroom
    if planned <= 0:
        raise ValueError(
            f"a GPU memory share of {share:.3f} ({share * card.total / GIB:.2f} GiB of "
            f"{card.total / GIB:.2f} GiB) leaves no room for the KV cache: this process "
            f"uses {card.used / GIB:.2f} GiB (weights), and keeps "
            f"{(CONTEXT_BYTES + headroom) / GIB:.2f} GiB for the CUDA context and its steps"
        )
    available = card.free - headroom
    if available < planned:
        log.warning(
            "the card has %.2f GiB free, less than this process's share leaves for the KV "
            "cache (%.2f GiB): another process holds more than its share; sizing the cache "
            "from what is free", card.free / GIB, planned / GIB,
        )  # fmt: skip
        if available <= 0:
            raise ValueError(
                f"the card has {card.free / GIB:.2f} GiB free, less than this process's "
                f"{headroom / GIB:.2f} GiB of step headroom"
            )
        return available
    return planned


def card_memory(device: torch.device) -> CardMemory:
    free, total = torch.cuda.mem_get_info(device)
    return CardMemory(total=total, free=free, used=torch.cuda.memory_reserved(device))
