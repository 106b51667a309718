"""The seam between the engine and the kernels: Triton on CUDA, the torch references elsewhere.

Both sides of every pair share one signature (kernels/ keeps them side by side as `name` and
`name_ref`), so the model is written once against `Ops` and the device decides which runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType

import torch

from kvmesh.kernels import (
    argmax,
    block_copy,
    decode_attention,
    linear,
    prefill_attention,
    rope_kv,
)


@dataclass(frozen=True)
class Ops:
    rope_write_kv: Callable[..., None]  # RoPE on q and k, then k and v into the paged cache
    prefill_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    gather_blocks: Callable[..., torch.Tensor]
    scatter_blocks: Callable[..., None]
    # y = x @ w.T; norm=(g, eps): rms_norm(x) @ w.T; swiglu=True: silu(x @ gate.T) * (x @ up.T);
    # residual=r: + r; out=o: y written into o (which may be r: the residual stream in place);
    # squares_out / squares: y's rows' sums of squares handed to the next norm (RowSquares)
    linear: Callable[..., torch.Tensor]
    argmax: Callable[..., torch.Tensor]  # greedy tokens: first index of each row's largest value


# the kernel module of each op
_MODULES: dict[str, ModuleType] = {
    "rope_write_kv": rope_kv,
    "prefill_attention": prefill_attention,
    "decode_attention": decode_attention,
    "gather_blocks": block_copy,
    "scatter_blocks": block_copy,
    "linear": linear,
    "argmax": argmax,
}


def _ops(suffix: str) -> Ops:
    return Ops(**{f.name: getattr(_MODULES[f.name], f.name + suffix) for f in fields(Ops)})


REFERENCE_OPS = _ops("_ref")
KERNEL_OPS = _ops("")


def ops_for(device: torch.device, use_kernels: bool = True) -> Ops:
    """Triton kernels on CUDA devices (unless disabled), the torch references everywhere else."""
    if device.type == "cuda" and use_kernels:
        return KERNEL_OPS
    return REFERENCE_OPS
