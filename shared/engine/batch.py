"""What one engine step feeds the model: a packed batch of token runs over the paged cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.shared.engine.kv_cache import allocate_kv_cache, blocks_for
from kvmesh.shared.engine.scheduler import ScheduledSeq
from kvmesh.shared.engine.sequence import PENDING, Sequence
from kvmesh.shared.model.config import ModelConfig


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
    fresh: bool = False  # every sequence starts at token 0: no earlier context in the cache

    @property
    def decode_only(self) -> bool:
        return self.max_q_len == 1

    @classmethod
    def one_prompt(
        cls, ids: torch.Tensor, block_table: torch.Tensor, block_size: int, fresh: bool = True
    ) -> ForwardBatch:
        """One sequence's tokens ids [T] (on the device) at positions 0..T-1 in the blocks
        block_table [>= cdiv(T, block_size)] int32 (the same block may repeat: a scratch block
        takes every token), the last one sampled."""
        n, device = ids.numel(), ids.device
        positions = torch.arange(n, device=device)
        slots = block_table.long()[positions // block_size] * block_size + positions % block_size
        return cls(
            input_ids=ids, positions=positions, slot_mapping=slots,
            block_table=block_table[None], cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32,
            device=device), seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
            sample_indices=torch.tensor([n - 1], device=device), max_q_len=n, fresh=fresh,
        )  # fmt: skip


def alone_in_cache(
    config: ModelConfig, ids: list[int], block_size: int, kv_dtype: torch.dtype,
    device: torch.device,
) -> tuple[ForwardBatch, torch.Tensor]:  # fmt: skip
    """One prompt's fresh step and a KV cache of its own (zeros, just its blocks): for a pass
    outside the engine (calibration, scoring)."""
    num_blocks = blocks_for(len(ids), block_size)
    cache = allocate_kv_cache(config, num_blocks, block_size, kv_dtype, device)
    table = torch.arange(num_blocks, dtype=torch.int32, device=device)
    ids_t = torch.tensor(ids, dtype=torch.int64, device=device)
    return ForwardBatch.one_prompt(ids_t, table, block_size), cache


# (rows of the input ids, rows of the in-flight step's sampled tokens to copy there), on device
Fill = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step's inputs in host memory (pinned on CUDA), padded to a bucket of b rows."""

    ids: torch.Tensor  # [b] int64; rows in the fill are overwritten on the device
    positions: torch.Tensor  # [b] int64
    slots: torch.Tensor  # [b] int64
    seq_lens: torch.Tensor  # [b] int32
    block_table: torch.Tensor  # [b, width] int32


_TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32}
_ALIGN = 16  # bytes between the starts of the views _upload makes


class StepInputs:
    """Builds a step's inputs from the scheduled sequences: host lists -> (pinned) host tensors
    -> asynchronous copies, so the host never waits for the device here.

    A sequence's last token may be PENDING: sampled by the step still in flight. Its input row
    is then filled on the device from that step's sampled tokens (row seq.pending_row).
    """

    def __init__(self, device: torch.device, block_size: int, scratch_block: int) -> None:
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block  # padding rows of graphed steps read/write only here
        self._pin = device.type == "cuda"

    def pinned(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return self._pinned(torch.tensor(values, dtype=dtype))

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._pin else t

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return self.pinned(values, dtype).to(self.device, non_blocking=True)

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The arrays on the device, each a view of its dtype and shape into one buffer that
        one pinned buffer and one asynchronous copy fill (a copy and a pinned allocation cost
        the host ~40-80 us each, and a prefill's GPU waits for them)."""
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            # 16-byte aligned: Triton compiles a kernel once per pattern of 16-byte aligned
            # pointer arguments, so every step's views must agree (and int64 views need 8)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        host = self._pinned(torch.empty(total, dtype=torch.uint8))
        flat = host.numpy()
        for a, offset in zip(arrays, offsets, strict=True):
            flat[offset : offset + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        dev = host.to(self.device, non_blocking=True)
        return [
            dev[offset : offset + a.nbytes].view(_TORCH_DTYPES[a.dtype.type]).view(a.shape)
            for a, offset in zip(arrays, offsets, strict=True)
        ]

    def _fill(self, rows: list[int], sources: list[int]) -> Fill | None:
        if not rows:
            return None
        both = self._to_device([rows, sources], torch.int64)
        return both[0], both[1]

    def batch(
        self, scheduled: list[ScheduledSeq], prev_tokens: torch.Tensor | None
    ) -> tuple[ForwardBatch, list[Sequence]]:
        """Any mix of prompt chunks and decode tokens, packed; and the sequences to sample."""
        bs = self.block_size
        total = sum(s.num_new_tokens for s in scheduled)
        ids = np.empty(total, np.int64)
        positions = np.empty(total, np.int64)
        slots = np.empty(total, np.int64)
        width = max(len(s.seq.block_table) for s in scheduled)
        tables = np.zeros((len(scheduled), width), np.int32)
        cu = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        fill_rows: list[int] = []
        fill_sources: list[int] = []
        for b, s in enumerate(scheduled):
            seq, n, row = s.seq, s.num_new_tokens, cu[-1]
            tables[b, : len(seq.block_table)] = seq.block_table
            start, end = seq.num_computed, seq.num_computed + n
            if seq.token_ids[end - 1] == PENDING:  # only ever the last token
                fill_rows.append(row + n - 1)
                fill_sources.append(seq.pending_row)
            if n == 1:  # a decode token: scalars beat array set-up
                ids[row] = seq.token_ids[start]
                positions[row] = start
                slots[row] = seq.block_table[start // bs] * bs + start % bs
            else:  # a prompt chunk: vectorised (chunks run to thousands of tokens)
                pos = np.arange(start, end)
                ids[row : row + n] = seq.token_ids[start:end]
                positions[row : row + n] = pos
                slots[row : row + n] = np.asarray(seq.block_table)[pos // bs] * bs + pos % bs
            cu.append(row + n)
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(cu[-1] - 1)
                sampled.append(seq)
        fill = np.array([fill_rows, fill_sources], np.int64)
        input_ids, *rest, fill_dev = self._upload([
            ids, positions, slots, tables, np.array(cu, np.int32),
            np.array(seq_lens, np.int32), np.array(sample_rows, np.int64), fill,
        ])  # fmt: skip
        if fill_rows:
            assert prev_tokens is not None
            input_ids.index_copy_(0, fill_dev[0], prev_tokens.index_select(0, fill_dev[1]))
        positions_dev, slots_dev, tables_dev, cu_dev, lens_dev, sample_dev = rest
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions_dev,
            slot_mapping=slots_dev,
            block_table=tables_dev,
            cu_seqlens_q=cu_dev,
            seq_lens=lens_dev,
            sample_indices=sample_dev,
            max_q_len=max(s.num_new_tokens for s in scheduled),
            fresh=all(s.seq.num_computed == 0 for s in scheduled),
        )
        return batch, sampled

    def decode(
        self, scheduled: list[ScheduledSeq], bucket: int
    ) -> tuple[DecodeInputs, Fill | None, list[Sequence]]:
        """One token per sequence, padded to `bucket` rows; every sequence is sampled."""
        bs, scratch = self.block_size, self.scratch_block
        n = len(scheduled)
        pad = bucket - n
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        fill_rows: list[int] = []
        fill_sources: list[int] = []
        sampled = [s.seq for s in scheduled]
        for row, seq in enumerate(sampled):
            p = seq.num_computed
            token = seq.token_ids[p]
            if token == PENDING:
                fill_rows.append(row)
                fill_sources.append(seq.pending_row)
                token = 0
            ids.append(token)
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
        width = max(len(seq.block_table) for seq in sampled)
        tables = [seq.block_table + [scratch] * (width - len(seq.block_table)) for seq in sampled]
        inputs = DecodeInputs(
            ids=self.pinned(ids + [0] * pad, torch.int64),
            positions=self.pinned(positions + [0] * pad, torch.int64),
            slots=self.pinned(slots + [scratch * bs] * pad, torch.int64),
            seq_lens=self.pinned([p + 1 for p in positions] + [1] * pad, torch.int32),
            block_table=self.pinned(tables + [[scratch] * width] * pad, torch.int32),
        )
        return inputs, self._fill(fill_rows, fill_sources), sampled
