"""CUDA graphs of the decode forward, one per batch-size bucket.

A decode step launches ~10 kernels per layer; at small batches their launch cost is larger than
their run time. Each bucket's graph is captured once against static input buffers, largest
bucket first into one shared memory pool, and a step replays the smallest bucket that holds its
batch after copying its inputs into the buffers' first rows. Rows past the batch are padding: one
token at position 0 of a scratch block that no sequence owns, so they write and read only there.
"""

from __future__ import annotations

import torch

from kvmesh.shared.engine.batch import DecodeInputs, Fill, ForwardBatch
from kvmesh.shared.model.llama import LlamaModel


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return sorted({*small, *range(8, max_batch + 1, 8), max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        max_batch: int,
        table_width: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.table_width = table_width
        self.buckets = graph_buckets(max_batch)
        dev = kv_cache.device
        block_size = kv_cache.shape[3]  # [L, 2, blocks, block_size, kv_heads, D]
        n = self.buckets[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_table = torch.full((n, table_width), scratch_block, dtype=torch.int32,
                                      device=dev)  # fmt: skip
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.sample_rows = torch.arange(n, dtype=torch.int64, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.replays = 0

    def bucket_for(self, n: int) -> int | None:
        for b in self.buckets:
            if b >= n:
                return b
        return None

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.ids[:b],
            positions=self.positions[:b],
            slot_mapping=self.slots[:b],
            block_table=self.block_table[:b],
            cu_seqlens_q=self.cu_seqlens[: b + 1],
            seq_lens=self.seq_lens[:b],
            sample_indices=self.sample_rows[:b],
            max_q_len=1,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, into one memory pool. The static inputs hold
        padding rows only, so capture's own forwards touch nothing but the scratch block."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv_cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv_cache.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                batch = self._batch(b)
                self.model.forward(batch, self.kv_cache)  # compiles kernels, warms cuBLAS
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._logits[b] = self.model.forward(batch, self.kv_cache)
                self._graphs[b] = graph
        torch.cuda.current_stream(self.kv_cache.device).wait_stream(stream)
        torch.cuda.synchronize(self.kv_cache.device)

    def run(self, inputs: DecodeInputs, fill: Fill | None, prev_tokens: torch.Tensor | None,
            num_seqs: int) -> torch.Tensor:  # fmt: skip
        """Replay the bucket of len(inputs.ids) rows (the first num_seqs real, the rest padding):
        logits [num_seqs, V] (the model's dtype), a view of the graph's output valid until the
        next replay.
        fill = (rows, sources): input ids taken from prev_tokens[sources] on the device."""
        b = inputs.ids.shape[0]
        assert b in self._graphs, f"no graph for a batch of {b}"
        width = inputs.block_table.shape[1]
        assert width <= self.table_width
        self.ids[:b].copy_(inputs.ids, non_blocking=True)
        self.positions[:b].copy_(inputs.positions, non_blocking=True)
        self.slots[:b].copy_(inputs.slots, non_blocking=True)
        self.seq_lens[:b].copy_(inputs.seq_lens, non_blocking=True)
        self.block_table[:b, :width].copy_(inputs.block_table, non_blocking=True)
        if fill is not None:
            assert prev_tokens is not None
            rows, sources = fill
            self.ids.index_copy_(0, rows, prev_tokens.index_select(0, sources))
        self._graphs[b].replay()
        self.replays += 1
        return self._logits[b][:num_seqs]
