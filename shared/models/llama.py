"""Llama-family decoder over a paged KV cache, written against the `Ops` seam.

One forward serves prefill chunks and decode tokens in one packed batch:

    ids -> embed -> [norm -> qkv -> rope -> write K/V -> paged attention -> o
                     -> norm -> gate_up -> silu*mul -> down] x L -> norm -> lm_head (sampled rows)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.rope import rope_cos_sin
from shared.batch import ForwardBatch
from shared.models.config import ModelConfig
from shared.ops import Ops

LayerHook = Callable[[int], None]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, H]
    o: torch.Tensor  # [H, q_size]
    mlp_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 * I, H], gate rows first
    down: torch.Tensor  # [H, I]


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
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

    @torch.inference_mode()
    def forward(
        self, batch: ForwardBatch, kv_cache: torch.Tensor, on_layer: LayerHook | None = None
    ) -> torch.Tensor:
        """Logits [S, V] fp32 for batch.sample_indices; writes the step's K/V into kv_cache.

        kv_cache: [L, 2, num_blocks, block_size, kv_heads, head_dim]. on_layer(l) runs once
        layer l's K/V of this step are in the cache (the handoff sends it from there).
        """
        w, ops = self.weights, self.ops
        h = F.embedding(batch.input_ids, w.embed)  # [T, H]
        residual: torch.Tensor | None = None
        for index, layer in enumerate(w.layers):
            x, residual = ops.rms_norm(h, layer.attn_norm, self.config.rms_eps, residual)
            h = self._attention(index, layer, x, batch, kv_cache)
            if on_layer is not None:
                on_layer(index)
            x, residual = ops.rms_norm(h, layer.mlp_norm, self.config.rms_eps, residual)
            h = ops.linear(ops.linear(x, layer.gate_up), layer.down, gated=True)  # SiLU-and-mul
        h = h[batch.sample_indices]
        assert residual is not None
        x, _ = ops.rms_norm(h, w.norm, self.config.rms_eps, residual[batch.sample_indices])
        return ops.linear(x, w.lm_head).float()

    def _attention(
        self,
        index: int,
        layer: LayerWeights,
        x: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg, ops = self.config, self.ops
        tokens = x.shape[0]
        qkv = ops.linear(x, layer.qkv)  # [T, q_size + 2 * kv_size]
        q = qkv[:, : cfg.q_size].view(tokens, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(tokens, cfg.num_kv_heads, -1)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(tokens, cfg.num_kv_heads, cfg.head_dim)
        k_cache, v_cache = kv_cache[index, 0], kv_cache[index, 1]
        ops.rope_write_kv(
            q, k, v, batch.positions, self.cos_sin, k_cache, v_cache, batch.slot_mapping
        )
        if batch.decode_only:
            out = ops.decode_attention(
                q, k_cache, v_cache, batch.block_table, batch.seq_lens, self.scale
            )
        else:
            out = ops.prefill_attention(
                q,
                k_cache,
                v_cache,
                batch.block_table,
                batch.cu_seqlens_q,
                batch.seq_lens,
                self.scale,
            )
        return ops.linear(out.reshape(tokens, cfg.q_size), layer.o)
