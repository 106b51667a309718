"""Llama-family decoder over a paged KV cache, written against the `Ops` seam.

One forward serves prefill chunks and decode tokens in one packed batch:

    ids -> embed -> [norm -> qkv -> rope -> write K/V -> paged attention -> o (+ residual)
                     -> norm -> gate_up -> silu*mul -> down (+ residual)] x L -> norm -> lm_head
                     (sampled rows)

Each norm is asked of the projection that reads it (`ops.linear(..., norm=)`), each residual
add of the projection that feeds the stream (`ops.linear(..., residual=)`), SiLU-and-mul of
gate_up (`swiglu=True`): the decode kernels fuse them into the skinny linear; the references
and the other paths run them as separate steps with the same math. The norms' weights are
folded into the projections that read them (loader.fold_norm), so a norm is only 1 / rms of
each row: the projection that updates the residual stream (o, down) hands the rows' sums of
squares to the one that normalizes it (gate_up, the next qkv) as `RowSquares`, and the decode
kernels scale their product by it: no norm launch between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.kernels.decode_attention import NewToken
from kvmesh.kernels.first_chunk_attention import FreshChunks
from kvmesh.kernels.linear import RowSquares
from kvmesh.kernels.quant import Weight
from kvmesh.kernels.rope import rope_cos_sin
from kvmesh.shared.engine.batch import ForwardBatch
from kvmesh.shared.model.config import ModelConfig
from kvmesh.shared.model.ops import Ops

LayerHook = Callable[[int], None]
StreamHook = Callable[[int, torch.Tensor], None]  # (layer index, the residual stream entering it)


@dataclass
class LayerWeights:
    """A decoder layer's projections. A half-precision projection that reads a norm has the
    norm's weight folded into its columns (loader.fold_norm, gain None); a quantized one keeps
    its codes as the checkpoint's (or the load's) grid made them and the norm's weight apart
    (`*_gain`, applied by the linear: kernels/linear.py)."""

    qkv: Weight  # [q_size + 2 * kv_size, H], the input norm's weight folded in unless qkv_gain
    o: Weight  # [H, q_size]
    gate_up: Weight  # [2 * I, H], gate rows first; the MLP norm's weight folded in unless gain
    down: Weight  # [H, I]
    qkv_gain: torch.Tensor | None = None  # [H] the input norm's weight, where not folded
    gate_up_gain: torch.Tensor | None = None  # [H] the MLP norm's weight, where not folded


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor | None  # [H], the final norm's weight; None: folded into lm_head
    lm_head: torch.Tensor  # [V, H], the embedding itself when tied


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: LlamaWeights, ops: Ops) -> None:
        self.config = config
        self.weights = weights
        self.ops = ops
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.cos_sin = rope_cos_sin(
            config.head_dim,
            config.max_position,
            config.rope_theta,
            config.rope_scaling,
            self.device,
        )  # [max_position, head_dim] fp32
        self.scale = config.head_dim**-0.5
        # an FP8 cache's per-head scales [L, 2 (K, V), kv_heads] fp32 (shared/engine/kv_scales.py);
        # None: the cache holds the model's dtype
        self.kv_scales: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_cache: torch.Tensor, on_layer: LayerHook | None = None
    ) -> torch.Tensor:
        """Logits [S, V] in the model's dtype for batch.sample_indices; writes the step's K/V into
        kv_cache.

        kv_cache: [L, 2, num_blocks, block_size, kv_heads, head_dim]. on_layer(l) runs once
        layer l's K/V of this step are in the cache (the handoff sends it from there).
        """
        h = F.embedding(batch.input_ids, self.weights.embed)  # [T, H], the residual stream
        return self.head(self.run_layers(h, batch, kv_cache, on_layer=on_layer), batch)

    def run_layers(
        self, h: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, start: int = 0,
        on_layer: LayerHook | None = None, on_input: StreamHook | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The residual stream after the last layer, from h, the stream entering layer `start`
        (updated in place; layers before `start` are not run and their cache is not written).
        on_input(l, h) sees the stream entering layer l, before l changes it in place."""
        w, ops, eps = self.weights, self.ops, self.config.rms_eps
        squares = RowSquares()  # of h's rows; the first qkv sums them itself
        for index in range(start, len(w.layers)):
            layer = w.layers[index]
            if on_input is not None:
                on_input(index, h)
            h, squares = self._attention(index, layer, h, batch, kv_cache, squares)
            if on_layer is not None:
                on_layer(index)
            act = ops.linear(
                h, layer.gate_up, norm=(layer.gate_up_gain, eps), swiglu=True, squares=squares
            )
            squares = RowSquares()
            # the stream updated in place
            h = ops.linear(act, layer.down, residual=h, out=h, squares_out=squares)
        return h

    def head(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [S, V] of the final stream's rows batch.sample_indices (final norm, lm_head)."""
        w = self.weights
        return self.ops.linear(
            h[batch.sample_indices], w.lm_head, norm=(w.norm, self.config.rms_eps)
        )

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        h: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: torch.Tensor,
        squares: RowSquares,
    ) -> tuple[torch.Tensor, RowSquares]:
        """The residual stream h after layer `index`'s attention block, and its rows' squares
        (`squares`: h's before it)."""
        cfg, ops = self.config, self.ops
        tokens = h.shape[0]
        qkv = ops.linear(h, layer.qkv, norm=(layer.qkv_gain, cfg.rms_eps), squares=squares)
        q = qkv[:, : cfg.q_size].view(tokens, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(tokens, cfg.num_kv_heads, -1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(tokens, cfg.num_kv_heads, cfg.head_dim)
        k_cache, v_cache = kv_cache[index, 0], kv_cache[index, 1]
        kv_scale = None if self.kv_scales is None else self.kv_scales[index]  # an FP8 cache's
        if batch.decode_only:  # RoPE and the KV write inside the attention launch
            new = NewToken(k, v, batch.positions, self.cos_sin, batch.slot_mapping)
            out = ops.decode_attention(
                q, k_cache, v_cache, batch.block_table, batch.seq_lens, self.scale, new,
                kv_scale=kv_scale,
            )  # fmt: skip
        else:
            ops.rope_write_kv(
                q, k, v, batch.positions, self.cos_sin, k_cache, v_cache, batch.slot_mapping,
                kv_scale=kv_scale,
            )  # fmt: skip
            fresh = FreshChunks(k, v, batch.max_q_len) if batch.fresh else None
            out = ops.prefill_attention(
                q,
                k_cache,
                v_cache,
                batch.block_table,
                batch.cu_seqlens_q,
                batch.seq_lens,
                self.scale,
                fresh,
                kv_scale=kv_scale,
            )
        squares = RowSquares()
        h = ops.linear(out.reshape(tokens, cfg.q_size), layer.o, residual=h, out=h,
                       squares_out=squares)  # fmt: skip
        return h, squares
