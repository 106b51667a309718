"""Load weights: GGUF files, Hugging Face safetensors directories, or synthetic named shapes.

A model source is one string:
  * "" or "smollm2-135m-instruct"   the default model (GGUF, fetched once)
  * "/path/model.gguf"               a GGUF file (dequantized to the requested dtype)
  * "/path/hf-dir"                   config.json + *.safetensors (+ tokenizer.json); a
                                     quantized one (compressed-tensors) loads as stored
  * "synthetic:llama3-8b"            a named shape with seeded random weights
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvmesh.kernels.quant import QuantizedWeight, Weight, quantize_weight
from kvmesh.kernels.rope import Llama3RopeScaling
from kvmesh.shared.model.checkpoint import StoredCheckpoint
from kvmesh.shared.model.config import SHAPES, ModelConfig
from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig
from kvmesh.shared.model.llama import LayerWeights, LlamaWeights
from kvmesh.shared.model.source import SYNTHETIC_PREFIX, resolve_source
from kvmesh.shared.model.tensors import LOAD_ORDER, PROJECTIONS, SourceTensors

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: LlamaWeights
    tokenizer_source: Path | None  # a .gguf file or an HF directory; None for synthetic models
    # an FP8 KV cache's per-head scales [L, 2, kv_heads] fp32 where the checkpoint has them
    kv_scales: torch.Tensor | None = None


def open_source(
    source: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
    fetch: FetchConfig | None = None,
) -> SourceTensors:  # fmt: skip
    """The tensors of the model at `source` (see the module's docstring), read lazily."""
    source = resolve_source(source, fetch)
    if source.startswith(SYNTHETIC_PREFIX):
        config = _shape(source[len(SYNTHETIC_PREFIX) :])
        get = _synthetic_getter(config, dtype, device, seed)
        return SourceTensors(config, get, config.num_parameters() > 1e9, None)
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_tensors(path, dtype, device)
    if (path / "config.json").is_file():
        return _safetensors_tensors(path, dtype, device)
    raise ValueError(
        f"unknown model {source!r}: expected {DEFAULT_MODEL!r}, a .gguf file, a Hugging Face "
        f"directory with config.json, or {SYNTHETIC_PREFIX}<{'|'.join(SHAPES)}>"
    )


def load_model(
    source: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
    fetch: FetchConfig | None = None, quantization: str = "none",
    keep: frozenset[str] = frozenset(),
) -> LoadedModel:  # fmt: skip
    """The model at `source` in `dtype` on `device`; quantization 'fp8' or 'int8' quantizes the
    decoder layers' projections as each layer loads (never a second full copy of the model)
    except those named in `keep` ("layers.{i}.{projection}", PROJECTIONS); lm_head and the
    embeddings stay in `dtype`. A quantized checkpoint loads as stored (`quantization` 'none'
    or its own scheme), its projections named in `keep` dequantized to `dtype`."""
    src = open_source(source, dtype, device, seed, fetch)
    if src.linear is not None:
        if quantization not in ("none", src.scheme):
            raise ValueError(
                f"{source}: the checkpoint is quantized to {src.scheme}; it cannot load as "
                f"{quantization!r} (quantize the unquantized model instead)"
            )
        quantization = "none"  # the linears it left unquantized stay so
    weights = _assemble(src.config, src.get, src.large, quantization, keep, src.linear)
    return LoadedModel(src.config, weights, src.tokenizer_source)


def _shape(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def _assemble(
    config: ModelConfig, get: Callable[[str], torch.Tensor], progress: bool,
    quantization: str = "none", keep: frozenset[str] = frozenset(),
    linear: Callable[[str], Weight] | None = None,
) -> LlamaWeights:  # fmt: skip
    """Build LlamaWeights from a getter of HF-named tensors (already dtype/device converted) and,
    for a quantized checkpoint, of its linears as stored (`linear`). Each projection is made by
    _projection, a layer at a time (never a second full copy of the model); the final norm's
    weight stays apart when lm_head is the embedding (tied), else is folded into lm_head."""
    linear = linear or (lambda name: get(name + ".weight"))
    layers = []
    for i in tqdm(range(config.num_layers), desc="loading", unit="layer", disable=not progress):
        p = f"model.layers.{i}."
        parts = {name: [linear(p + hf) for hf in PROJECTIONS[name]] for name in LOAD_ORDER}
        gains = {"qkv": get(p + "input_layernorm.weight"),
                 "gate_up": get(p + "post_attention_layernorm.weight")}  # fmt: skip
        made = {
            name: _projection(f"layers.{i}.{name}", parts[name], gains.get(name),
                              gains["qkv"].dtype, quantization, f"layers.{i}.{name}" in keep)
            for name in LOAD_ORDER
        }  # fmt: skip
        layers.append(
            LayerWeights(
                qkv=made["qkv"][0], o=made["o"][0], gate_up=made["gate_up"][0],
                down=made["down"][0], qkv_gain=made["qkv"][1], gate_up_gain=made["gate_up"][1],
            )
        )  # fmt: skip
    embed = get("model.embed_tokens.weight")
    norm = get("model.norm.weight")
    if config.tie_embeddings:
        return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=embed)
    lm_head = fold_norm(get("lm_head.weight"), norm)
    return LlamaWeights(embed=embed, layers=layers, norm=None, lm_head=lm_head)


def _projection(
    name: str, parts: list[Weight], gain: torch.Tensor | None, dtype: torch.dtype,
    scheme: str, kept: bool,
) -> tuple[Weight, torch.Tensor | None]:  # fmt: skip
    """A projection from its HF linears' weights (row order) and the norm weight it reads (None
    for o and down), as (weight, norm weight kept apart or None):
    - every part stored quantized (a checkpoint's) and not kept: the stored codes and scales,
      rows concatenated (scales are per row, so this is the grid of the whole), gain apart;
    - else in `dtype` (stored parts dequantized), quantized to `scheme` ('fp8' or 'int8': the
      plain weight's grid, the gain kept apart) unless kept or stored quantized in part, or
      with the gain folded in (fold_norm)."""
    stored = [w for w in parts if isinstance(w, QuantizedWeight)]
    if stored and len(stored) == len(parts) and not kept:
        return QuantizedWeight(_cat([w.codes for w in stored]),
                               _cat([w.scale for w in stored])), gain  # fmt: skip
    if stored and not kept:
        log.info("%s: its linears are stored in part quantized, in part not: it loads in %s",
                 name, dtype)  # fmt: skip
    w = _cat([x.dequantize().to(dtype) if isinstance(x, QuantizedWeight) else x for x in parts])
    if kept or stored or scheme == "none":
        return (w if gain is None else fold_norm(w, gain)), None
    return quantize_weight(w, scheme), gain


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def fold_norm(w: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """w [N, K] with an RMSNorm's weight [K] folded into its columns: w @ (gain * x) =
    (w * gain) @ x, so the model normalizes x without the gain (one rounding of each product to
    w's dtype; exact for the synthetic models' unit gains)."""
    return w * gain.to(w.dtype)[None, :]


# ---------------------------------------------------------------------------------- synthetic


def synthetic_weights(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int,
    quantization: str = "none", keep: frozenset[str] = frozenset(),
) -> LlamaWeights:  # fmt: skip
    """Seeded random weights of the right shape (norms at 1, matrices ~N(0, 0.02))."""
    get = _synthetic_getter(config, dtype, device, seed)
    return _assemble(config, get, config.num_parameters() > 1e9, quantization, keep)


def _synthetic_getter(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int
) -> Callable[[str], torch.Tensor]:
    """HF name -> a seeded random tensor: each matrix is the generator's next draw, so the
    weights depend on the order they are asked for in (LOAD_ORDER, then the embedding)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = _hf_shapes(config)

    def get(name: str) -> torch.Tensor:
        shape = shapes[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, 0.02, generator=gen)

    return get


def _hf_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, i = c.hidden_size, c.intermediate_size
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (c.q_size, h),
        "self_attn.k_proj.weight": (c.kv_size, h),
        "self_attn.v_proj.weight": (c.kv_size, h),
        "self_attn.o_proj.weight": (h, c.q_size),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "model.embed_tokens.weight": (c.vocab_size, h),
        "lm_head.weight": (c.vocab_size, h),
        "model.norm.weight": (h,),
    }


# --------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, index, kind, suffix = gguf_name.split(".")
        return f"model.layers.{index}.{_GGUF_NAMES[kind]}.{suffix}"
    return {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }[gguf_name]


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves:
    rows [h, pair, 2] -> [h, 2, pair] restores the "rotate_half" layout the model uses."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _gguf_tensors(path: Path, dtype: torch.dtype, device: torch.device) -> SourceTensors:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"{path.name}: architecture {arch!r} is not supported (llama only)")
    config = _gguf_config(path.stem, meta, {t.name for t in reader.tensors})
    by_hf_name = {_hf_name(t.name): t for t in reader.tensors}

    def get(name: str) -> torch.Tensor:
        tensor = by_hf_name[name]
        array = dequantize(tensor.data, tensor.tensor_type)
        if name.endswith("q_proj.weight"):
            array = _unpermute_rotary(array, config.num_heads)
        elif name.endswith("k_proj.weight"):
            array = _unpermute_rotary(array, config.num_kv_heads)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # F32 tensors come straight from the memory map
            array = array.copy()
        return torch.from_numpy(array).to(device=device, dtype=dtype)

    return SourceTensors(config, get, path.stat().st_size > 1 << 30, path)


def _gguf_config(name: str, meta: dict, tensor_names: set[str]) -> ModelConfig:
    hidden = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    head_dim = int(meta.get("llama.rope.dimension_count", hidden // heads))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        name=name,
        hidden_size=hidden,
        num_layers=int(meta["llama.block_count"]),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        vocab_size=int(meta.get("llama.vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        max_position=int(meta["llama.context_length"]),
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


# -------------------------------------------------------------------------------- safetensors


def _safetensors_tensors(path: Path, dtype: torch.dtype, device: torch.device) -> SourceTensors:
    from safetensors import safe_open

    hf = json.loads((path / "config.json").read_text())
    config = _hf_config(path.name, hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    index = dict(_safetensors_index(files))
    large = sum(f.stat().st_size for f in files) > 1 << 30
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = path if has_tokenizer else None
    if "quantization_config" in hf:
        stored = StoredCheckpoint(path, hf["quantization_config"], index, dtype, device)
        return SourceTensors(config, stored.get, large, tokenizer, hf, stored.linear,
                             stored.scheme)  # fmt: skip

    def get(name: str) -> torch.Tensor:
        with safe_open(str(index[name]), framework="pt") as f:
            return f.get_tensor(name).to(device=device, dtype=dtype)

    return SourceTensors(config, get, large, tokenizer, hf)


def _safetensors_index(files: list[Path]) -> Iterator[tuple[str, Path]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, file


def _hf_config(name: str, hf: dict) -> ModelConfig:
    heads = hf["num_attention_heads"]
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` and
    # `rope_scaling`
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id")
    return ModelConfig(
        name=name,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rope_theta=float(theta),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=_llama3_scaling(scaling),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def _llama3_scaling(scaling: dict | None) -> Llama3RopeScaling | None:
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (llama3 only)")
    return Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )
