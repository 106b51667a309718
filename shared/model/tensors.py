"""A model source's tensors by Hugging Face name, and the names the loader groups them under:
what the loader assembles a model from and what a checkpoint is written from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.kernels.quant import Weight
from kvmesh.shared.model.config import ModelConfig

# A decoder layer's projections (LayerWeights' fields) and the Hugging Face linears each joins,
# in row order. A quantization plan names projections as "layers.{i}.{projection}".
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
# The order a load reads a layer's projections in (synthetic weights draw from one seeded
# generator in this order: whatever reads a source's tensors keeps it, to see the same weights)
LOAD_ORDER = ("qkv", "gate_up", "o", "down")


@dataclass
class SourceTensors:
    """A model source's tensors by Hugging Face name, each read (and converted to the asked
    dtype and device) when asked for."""

    config: ModelConfig
    get: Callable[[str], torch.Tensor]  # an HF name -> the tensor (quantized ones dequantized)
    large: bool  # over 1 GiB: loading shows progress
    tokenizer_source: Path | None  # a .gguf file or an HF directory; None for synthetic models
    hf: dict | None = None  # a Hugging Face directory's config.json
    # a quantized checkpoint's ('fp8' or 'int8') linears as stored: an HF linear's name
    # ("model.layers.0.mlp.up_proj") -> its codes and scales, or its weight where not quantized
    linear: Callable[[str], Weight] | None = None
    scheme: str = "none"
