"""Model shapes: one frozen dataclass describes a Llama-family decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvmesh.kernels.rope import Llama3RopeScaling


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    max_position: int
    tie_embeddings: bool
    rope_scaling: Llama3RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Checks what a model file could get wrong (a ValueError naming the field); the float
        fields become floats (a config.json may write rope_theta as an int)."""
        for name in _SIZES:
            positive_int(getattr(self, name), name)
        for name in ("rope_theta", "rms_eps"):
            object.__setattr__(self, name, _positive_number(getattr(self, name), name))
        ids = [*self.eos_token_ids, *([] if self.bos_token_id is None else [self.bos_token_id])]
        if bad := [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]:
            raise ValueError(f"bos and eos token ids must be integers >= 0, got {bad[0]!r}")
        if s := self.rope_scaling:
            positive_int(s.original_max_position, "rope scaling's original_max_position")
            for name in ("factor", "low_freq_factor", "high_freq_factor"):
                _positive_number(getattr(s, name), f"rope scaling's {name}")
            if s.low_freq_factor >= s.high_freq_factor:
                raise ValueError(f"rope scaling's low_freq_factor {s.low_freq_factor} is not "
                                 f"below its high_freq_factor {s.high_freq_factor}")  # fmt: skip
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size


_SIZES = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "intermediate_size", "vocab_size", "max_position")  # fmt: skip


def positive_int(value: Any, what: str) -> int:
    """`value` where it is an int in [1, 2**31) (not a bool: no model's size is larger); else a
    ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise ValueError(f"{what} must be a positive integer below 2**31, got {value!r}")
    return value


def _positive_number(value: Any, what: str) -> float:
    """`value` as a float where it is a finite number above 0; else a ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a finite number above 0, got {value!r}")
    return float(value)


_LLAMA3_SCALING = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
)
_LLAMA32_SCALING = Llama3RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
)

# Named real shapes for synthetic (seeded random) models: they cost what the trained model costs.
SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        name="llama3-8b",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_eps=1e-5,
        max_position=8192,
        tie_embeddings=False,
        rope_scaling=_LLAMA3_SCALING,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "llama3.2-1b": ModelConfig(
        name="llama3.2-1b",
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        rms_eps=1e-5,
        max_position=131072,
        tie_embeddings=True,
        rope_scaling=_LLAMA32_SCALING,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        rope_theta=100000.0,
        rms_eps=1e-5,
        max_position=8192,
        tie_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
    # A tiny shape for scheduler benchmarks and fast tests.
    "tiny": ModelConfig(
        name="tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
        rope_theta=10000.0,
        rms_eps=1e-5,
        max_position=4096,
        tie_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}
