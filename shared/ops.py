"""The seam between the engine and the kernels: Triton on CUDA, the torch references elsewhere.

Both sides of every pair share one signature (kernels/ keeps them side by side), so the model is
written once against `Ops` and the device decides which implementation runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kernels import (
    activation,
    block_copy,
    decode_attention,
    kv_write,
    prefill_attention,
    rms_norm,
    rope,
)


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rope: Callable[..., None]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    write_kv: Callable[..., None]
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    gather_blocks: Callable[..., torch.Tensor]
    scatter_blocks: Callable[..., None]


REFERENCE_OPS = Ops(
    rms_norm=rms_norm.rms_norm_ref,
    apply_rope=rope.apply_rope_ref,
    silu_and_mul=activation.silu_and_mul_ref,
    write_kv=kv_write.write_kv_ref,
    prefill_attention=prefill_attention.prefill_attention_ref,
    decode_attention=decode_attention.decode_attention_ref,
    gather_blocks=block_copy.gather_blocks_ref,
    scatter_blocks=block_copy.scatter_blocks_ref,
)


def _triton_ops() -> Ops:
    fns: dict[str, Any] = dict(
        rms_norm=rms_norm.rms_norm,
        apply_rope=rope.apply_rope,
        silu_and_mul=activation.silu_and_mul,
        write_kv=kv_write.write_kv,
        prefill_attention=prefill_attention.prefill_attention,
        decode_attention=decode_attention.decode_attention,
        gather_blocks=block_copy.gather_blocks,
        scatter_blocks=block_copy.scatter_blocks,
    )
    return Ops(**fns)


def ops_for(device: torch.device, use_kernels: bool = True) -> Ops:
    """Triton kernels on CUDA devices (unless disabled), the torch references everywhere else."""
    if device.type == "cuda" and use_kernels:
        return _triton_ops()
    return REFERENCE_OPS
