"""`kvmesh quantize`: a quantized checkpoint the workers load, its full-precision layers chosen
by measured sensitivity.

    model --load twice--> unquantized + quantized --rank_projections--> table, keep the N most
    sensitive --write_checkpoint (from the source's tensors, a layer at a time)--> DIR
                                                                           + the tokenizer

The ranking (shared/model/sensitivity.py) runs the calibration text through both models; the
checkpoint is written from the source's own tensors, never from the loaded models (their
full-precision projections hold the norms' weights folded in), so its codes are those that
quantizing at load makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmesh.shared.engine.tokenizer import converted_tokenizer, load_tokenizer
from kvmesh.shared.model.checkpoint import FORMATS, Written, write_checkpoint
from kvmesh.shared.model.fetch import FetchConfig
from kvmesh.shared.model.llama import LlamaModel
from kvmesh.shared.model.loader import load_model, open_source
from kvmesh.shared.model.ops import ops_for
from kvmesh.shared.model.sensitivity import (
    Sensitivity,
    calibration_ids,
    keep_most_sensitive,
    rank_projections,
)

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantizeConfig:
    model: str  # a model source (loader.py)
    scheme: str  # 'fp8' or 'int8'
    out: Path  # a new (or empty) directory
    keep: int = 0  # projections kept in the model's dtype, the most sensitive first
    calib_tokens: int = 1024  # of the calibration text (sensitivity.calibration_ids)
    device: str = "cpu"
    dtype: str = "float32"  # the checkpoint's unquantized tensors, and the ranking's runs
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if self.scheme not in FORMATS:
            raise ValueError(f"scheme must be one of {', '.join(FORMATS)}, got {self.scheme!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.keep < 0 or self.calib_tokens < 2:
            raise ValueError(f"need keep >= 0 and calib_tokens >= 2, got {self.keep} and "
                             f"{self.calib_tokens}")  # fmt: skip


def quantize(config: QuantizeConfig) -> Written:
    """Rank (when keeping any), print the ranking, write the checkpoint and its tokenizer."""
    dtype, device = getattr(torch, config.dtype), torch.device(config.device)
    keep: frozenset[str] = frozenset()
    if config.keep:
        ranking = rank(config, dtype, device)
        if config.keep > len(ranking):
            raise ValueError(f"--keep {config.keep}: the model has {len(ranking)} projections")
        keep = keep_most_sensitive(ranking, config.keep)
        print(ranking_table(ranking, keep), flush=True)
    src = open_source(config.model, dtype, device, fetch=config.fetch)
    written = write_checkpoint(src, config.out, config.scheme, keep)
    if src.tokenizer_source is not None:
        save_tokenizer(src.tokenizer_source, config.out, config.fetch.cache)
    return written


def rank(config: QuantizeConfig, dtype: torch.dtype, device: torch.device) -> list[Sensitivity]:
    """Every projection's sensitivity to `config.scheme`, most sensitive first."""
    plain = load_model(config.model, dtype, device, fetch=config.fetch)
    if plain.tokenizer_source is None:
        raise ValueError(f"{config.model}: no tokenizer for the calibration text (use --keep 0)")
    encode = load_tokenizer(plain.tokenizer_source, config.fetch.cache).encode
    quantized = load_model(config.model, dtype, device, fetch=config.fetch,
                           quantization=config.scheme)  # fmt: skip
    ops = ops_for(device)
    return rank_projections(
        LlamaModel(plain.config, plain.weights, ops),
        LlamaModel(quantized.config, quantized.weights, ops),
        calibration_ids(encode, config.calib_tokens),
    )


def ranking_table(ranking: list[Sensitivity], keep: frozenset[str]) -> str:
    """The ranking as a table: rank, projection, KL (nats per position), whether kept."""
    rows = [f"{'rank':>4}  {'projection':<18} {'KL (nats)':>11}  kept"]
    for i, s in enumerate(ranking, 1):
        rows.append(f"{i:>4}  {s.name:<18} {s.kl:>11.3e}  {'yes' if s.name in keep else ''}")
    return "\n".join(rows)


def save_tokenizer(source: Path, out: Path, cache: Path) -> None:
    """The tokenizer of a .gguf file (converted, through the cache) or of a Hugging Face
    directory, saved into `out` as Hugging Face files the engine's tokenizer loader reads."""
    from transformers import AutoTokenizer

    hf_dir = source if source.is_dir() else converted_tokenizer(source, cache)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(str(out))
