"""Comparing loaded models' weights."""

from __future__ import annotations

import torch

from kvmesh.kernels.quant import QuantizedWeight
from kvmesh.shared.model.llama import LlamaWeights


def assert_same_weights(a: LlamaWeights, b: LlamaWeights) -> None:
    """Every tensor of a and b equal bit for bit (FP8 codes compared as bytes)."""

    def same(x: object, y: object, what: str) -> None:
        if isinstance(x, QuantizedWeight):
            assert isinstance(y, QuantizedWeight) and x.codes.dtype == y.codes.dtype, what
            assert torch.equal(x.codes.view(torch.uint8), y.codes.view(torch.uint8)), what
            assert x.scale.dtype == torch.float32 and torch.equal(x.scale, y.scale), what
        elif x is None:
            assert y is None, what
        else:
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), what
            assert x.dtype == y.dtype and torch.equal(x, y), what

    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        for field in vars(la):
            same(getattr(la, field), getattr(lb, field), f"layers.{i}.{field}")
    for field in ("embed", "norm", "lm_head"):
        same(getattr(a, field), getattr(b, field), field)
