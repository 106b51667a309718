"""Load weights: GGUF files, Hugging Face safetensors directories, or synthetic named shapes.

A model source is one string:
  * "" or "smollm2-135m-instruct"   the default model (GGUF, fetched once)
  * "/path/model.gguf"               a GGUF file (dequantized to the requested dtype)
  * "/path/hf-dir"                   config.json + *.safetensors (+ tokenizer.json)
  * "synthetic:llama3-8b"            a named shape with seeded random weights
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvmesh.kernels.quant import quantize_weight
from kvmesh.kernels.rope import Llama3RopeScaling
from kvmesh.shared.model.config import SHAPES, ModelConfig
from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig
from kvmesh.shared.model.llama import LayerWeights, LlamaWeights
from kvmesh.shared.model.source import SYNTHETIC_PREFIX, resolve_source

# A decoder layer's projections (LayerWeights' fields) and the Hugging Face linears each joins,
# in row order. A quantization plan names projections as "layers.{i}.{projection}".
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: LlamaWeights
    tokenizer_source: Path | None  # a .gguf file or an HF directory; None for synthetic models


def load_model(
    source: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
    fetch: FetchConfig | None = None, quantization: str = "none",
    keep: frozenset[str] = frozenset(),
) -> LoadedModel:  # fmt: skip
    """The model at `source` in `dtype` on `device`; quantization 'fp8' or 'int8' quantizes the
    decoder layers' projections as each layer loads (never a second full copy of the model)
    except those named in `keep` ("layers.{i}.{projection}", PROJECTIONS); lm_head and the
    embeddings stay in `dtype`."""
    source = resolve_source(source, fetch)
    if source.startswith(SYNTHETIC_PREFIX):
        config = _shape(source[len(SYNTHETIC_PREFIX) :])
        weights = synthetic_weights(config, dtype, device, seed, quantization, keep)
        return LoadedModel(config, weights, None)
    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        config, weights = _load_gguf(path, dtype, device, quantization, keep)
        return LoadedModel(config, weights, path)
    if (path / "config.json").is_file():
        config, weights = _load_safetensors(path, dtype, device, quantization, keep)
        has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        return LoadedModel(config, weights, path if has_tokenizer else None)
    raise ValueError(
        f"unknown model {source!r}: expected {DEFAULT_MODEL!r}, a .gguf file, a Hugging Face "
        f"directory with config.json, or {SYNTHETIC_PREFIX}<{'|'.join(SHAPES)}>"
    )


def _shape(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def _assemble(
    config: ModelConfig, get: Callable[[str], torch.Tensor], progress: bool,
    quantization: str = "none", keep: frozenset[str] = frozenset(),
) -> LlamaWeights:  # fmt: skip
    """Build LlamaWeights from a getter of HF-named tensors (already dtype/device converted).
    Each RMSNorm's weight is folded into the columns of the projection that reads the norm
    (fold_norm), unless the projection is quantized ('fp8' or 'int8', each layer's as it loads:
    the grid is the plain weight's, as a quantized checkpoint's is, and the norm's weight is
    kept apart); the final norm's stays apart when lm_head is the embedding (tied)."""
    layers = []
    for i in tqdm(range(config.num_layers), desc="loading", unit="layer", disable=not progress):
        p = f"model.layers.{i}."
        qkv = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        gate_up = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        input_gain = get(p + "input_layernorm.weight")
        mlp_gain = get(p + "post_attention_layernorm.weight")
        o, down = get(p + "self_attn.o_proj.weight"), get(p + "mlp.down_proj.weight")
        scheme = {name: "none" if f"layers.{i}.{name}" in keep else quantization
                  for name in PROJECTIONS}  # fmt: skip
        qkv_gain = None if scheme["qkv"] == "none" else input_gain
        gate_up_gain = None if scheme["gate_up"] == "none" else mlp_gain
        layers.append(
            LayerWeights(
                qkv=quantize_weight(qkv if qkv_gain is not None else fold_norm(qkv, input_gain),
                                    scheme["qkv"]),
                o=quantize_weight(o, scheme["o"]),
                gate_up=quantize_weight(
                    gate_up if gate_up_gain is not None else fold_norm(gate_up, mlp_gain),
                    scheme["gate_up"],
                ),
                down=quantize_weight(down, scheme["down"]),
                qkv_gain=qkv_gain,
                gate_up_gain=gate_up_gain,
            )
        )  # fmt: skip
    embed = get("model.embed_tokens.weight")
    norm = get("model.norm.weight")
    if config.tie_embeddings:
        return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=embed)
    lm_head = fold_norm(get("lm_head.weight"), norm)
    return LlamaWeights(embed=embed, layers=layers, norm=None, lm_head=lm_head)


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
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = _hf_shapes(config)

    def get(name: str) -> torch.Tensor:
        shape = shapes[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, 0.02, generator=gen)

    return _assemble(config, get, config.num_parameters() > 1e9, quantization, keep)


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


def _load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, quantization: str = "none",
    keep: frozenset[str] = frozenset(),
) -> tuple[ModelConfig, LlamaWeights]:  # fmt: skip
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

    return config, _assemble(config, get, path.stat().st_size > 1 << 30, quantization, keep)


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


def _load_safetensors(
    path: Path, dtype: torch.dtype, device: torch.device, quantization: str = "none",
    keep: frozenset[str] = frozenset(),
) -> tuple[ModelConfig, LlamaWeights]:  # fmt: skip
    from safetensors import safe_open

    hf = json.loads((path / "config.json").read_text())
    config = _hf_config(path.name, hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    index = dict(_safetensors_index(files))

    def get(name: str) -> torch.Tensor:
        with safe_open(str(index[name]), framework="pt") as f:
            return f.get_tensor(name).to(device=device, dtype=dtype)

    total = sum(f.stat().st_size for f in files)
    return config, _assemble(config, get, total > 1 << 30, quantization, keep)


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
