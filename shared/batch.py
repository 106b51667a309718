"""What one engine step feeds the model: a packed batch of token runs over the paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Packed tokens of a step. T = new tokens in the step, B = sequences, S = sampled rows.

    Sequence b contributes tokens cu_seqlens_q[b]:cu_seqlens_q[b+1]; its context after the step
    is seq_lens[b] tokens, the new ones last.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset
    block_table: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    sample_indices: torch.Tensor  # [S] int64, rows of the packed tokens whose logits are needed
    max_q_len: int

    @property
    def decode_only(self) -> bool:
        return self.max_q_len == 1
