"""StepInputs: a step's inputs packed into one buffer, each view where the kernels expect it."""

from __future__ import annotations

import torch

from kvmesh.shared.engine.batch import StepInputs
from kvmesh.shared.engine.scheduler import ScheduledSeq
from kvmesh.shared.engine.sequence import SamplingParams, Sequence


def _prompt(rid: str, n: int, first_block: int) -> Sequence:
    seq = Sequence(rid, list(range(3, 3 + n)), n, SamplingParams(), seed=0, arrival=0)
    seq.block_table = list(range(first_block, first_block + -(-n // 16)))
    return seq


def test_every_view_of_a_step_starts_16_byte_aligned() -> None:
    """Triton compiles a kernel once per pattern of 16-byte aligned pointers: a step whose views
    were aligned differently from the warm-up's would compile anew while serving. Odd lengths of
    int64 and int32 arrays (7 tokens, 3 sequences) put an unaligned view right after them."""
    inputs = StepInputs(torch.device("cpu"), block_size=16, scratch_block=99)
    scheduled = [ScheduledSeq(_prompt(f"r{i}", n, 10 * i), n) for i, n in enumerate((1, 2, 4))]
    batch, sampled = inputs.batch(scheduled, None)
    views = [batch.input_ids, batch.positions, batch.slot_mapping, batch.block_table,
             batch.cu_seqlens_q, batch.seq_lens, batch.sample_indices]  # fmt: skip
    assert [v.data_ptr() % 16 for v in views] == [0] * len(views)
    assert batch.positions.tolist() == [0, 0, 1, 0, 1, 2, 3]
    assert batch.cu_seqlens_q.tolist() == [0, 1, 3, 7] and batch.seq_lens.tolist() == [1, 2, 4]
    assert batch.block_table.tolist() == [[0], [10], [20]]
    assert batch.slot_mapping.tolist() == [0, 160, 161, 320, 321, 322, 323]
    assert len(sampled) == 3 and batch.sample_indices.tolist() == [0, 2, 6]
