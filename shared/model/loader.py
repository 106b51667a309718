"""Load weights: GGUF files, Hugging Face safetensors directories, or synthetic named shapes.

A model source is one string:
  * "" or "smollm2-135m-instruct"   the default model (GGUF, fetched once)
  * "/path/model.gguf"               a GGUF file (dequantized to the requested dtype)
  * "/path/hf-dir"                   config.json + *.safetensors (+ tokenizer.json); a
                                     quantized one (compressed-tensors) loads as stored
  * "synthetic:llama3-8b"            a named shape with seeded random weights

A file that does not read as a model (malformed, truncated, or its tensors not the shapes its
config gives) raises ModelFileError (a ValueError) naming the file and what is wrong with it;
every size a file claims is checked against the file's before it is read or allocated.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from kvmesh.kernels.quant import QuantizedWeight, Weight, quantize_weight
from kvmesh.kernels.rope import Llama3RopeScaling
from kvmesh.shared.model.checkpoint import StoredCheckpoint
from kvmesh.shared.model.config import SHAPES, ModelConfig, positive_int
from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig
from kvmesh.shared.model.llama import LayerWeights, LlamaWeights
from kvmesh.shared.model.source import SYNTHETIC_PREFIX, ModelFileError, resolve_source
from kvmesh.shared.model.tensors import LOAD_ORDER, PROJECTIONS, SourceTensors

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

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

    def get(name: str) -> torch.Tensor:
        shape = _hf_shape(config, name)
        if len(shape) == 1:
            return torch.ones(shape, dtype=dtype, device=device)
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, 0.02, generator=gen)

    return get


def _hf_shape(c: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape of the tensor of HF name `name` (e.g. "model.layers.0.mlp.up_proj.weight")."""
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
    }[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]


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


_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str:
    part = gguf_name.split(".")
    if len(part) == 4 and part[0] == "blk" and part[2] in _GGUF_NAMES:
        return f"model.layers.{part[1]}.{_GGUF_NAMES[part[2]]}.{part[3]}"
    if gguf_name not in _GGUF_TOP_NAMES:
        raise ValueError(f"tensor {gguf_name!r} is not one of a llama model's")
    return _GGUF_TOP_NAMES[gguf_name]


def _unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's conversion, which interleaves each head's two rotary halves:
    rows [h, pair, 2] -> [h, 2, pair] restores the "rotate_half" layout the model uses."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _gguf_tensors(path: Path, dtype: torch.dtype, device: torch.device) -> SourceTensors:
    from gguf.quants import dequantize

    with _malformed(path):
        file = _GGUFFile(path)
        arch = file.meta.get("general.architecture")
        if arch != "llama":
            raise ModelFileError(path, f"architecture {arch!r} is not supported (llama only)")
        config = _gguf_config(path.stem, file.meta, set(file.tensors))
        by_hf_name = {_hf_name(name): name for name in file.tensors}

    def get(name: str) -> torch.Tensor:
        if name not in by_hf_name:
            raise ModelFileError(path, f"no tensor for {name}")
        tensor = file.tensors[by_hf_name[name]]
        _check_shape(config, name, tensor.shape, path)
        with _malformed(path, f"tensor {by_hf_name[name]}"):
            array = dequantize(tensor.data, tensor.kind)
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
    hidden = positive_int(meta["llama.embedding_length"], "llama.embedding_length")
    heads = positive_int(meta["llama.attention.head_count"], "llama.attention.head_count")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        name=name,
        hidden_size=hidden,
        num_layers=meta["llama.block_count"],
        num_heads=heads,
        num_kv_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=meta.get("llama.rope.dimension_count", hidden // heads),
        intermediate_size=meta["llama.feed_forward_length"],
        vocab_size=meta.get("llama.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        rms_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        max_position=meta["llama.context_length"],
        tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


@dataclass(frozen=True)
class _GGUFTensor:
    kind: GGMLQuantizationType  # gguf's
    shape: tuple[int, ...]  # numpy's order (rows first), as the model uses it
    data: np.ndarray  # a view of the memory map: the F32/F16 values, else the blocks' bytes


class _GGUFFile:
    """A GGUF file's metadata and tensors (views of its memory map, nothing read ahead), each
    count, length and offset checked against the file's size before it is used: a corrupt one
    is a ValueError, never a read past the end or an allocation it claims (gguf's own reader
    loops on an array's claimed length past the end of the file, and keeps a numpy array per
    array element). Metadata: ints, floats, bools, strings; arrays of numbers as numpy arrays,
    of strings as lists."""

    _SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: Path) -> None:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.pos = 0
        if self._take(4) != b"GGUF":
            raise ValueError("not a GGUF file (it does not start with GGUF)")
        if (version := self._scalar("<u4")) not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_fields = self._scalar("<u8"), self._scalar("<u8")
        self.meta: dict[str, Any] = {}
        for _ in range(n_fields):  # a huge count ends at the file's end: each takes 12+ bytes
            key = self._unique(self._string(), self.meta, "metadata key")
            self.meta[key] = self._value(self._scalar("<u4"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._scalar("<u4")
            if not 0 < n_dims <= 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (1 to 4)")
            dims = [self._scalar("<u8") for _ in range(n_dims)]
            infos.append((name, dims, self._scalar("<u4"), self._scalar("<u8")))
        align = self.meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & align - 1:
            raise ValueError(f"general.alignment {align!r} is not a power of 2")
        start = -(-self.pos // align) * align
        self.tensors: dict[str, _GGUFTensor] = {}
        for name, dims, kind, offset in infos:
            self.tensors[self._unique(name, self.tensors, "tensor")] = self._tensor(
                name, dims, kind, start + offset
            )

    def _tensor(self, name: str, dims: list[int], kind: int, at: int) -> _GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        if kind not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name!r} has an unknown type {kind}")
        qtype = GGMLQuantizationType(kind)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ValueError(f"tensor {name!r}: rows of {dims[0]} are not whole {qtype.name} "
                             f"blocks of {block}")  # fmt: skip
        shape = tuple(reversed(dims))
        n_bytes = math.prod(dims) // block * block_bytes
        if at + n_bytes > len(self.map):
            raise ValueError(f"tensor {name!r}: {n_bytes} bytes at byte {at} run past the end "
                             f"of the file ({len(self.map)} bytes)")  # fmt: skip
        data = np.frombuffer(self.map, np.uint8, n_bytes, at)
        floats = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
        if qtype in floats:
            return _GGUFTensor(qtype, shape, data.view(floats[qtype]).reshape(shape))
        return _GGUFTensor(qtype, shape, data.reshape(quant_shape_to_byte_shape(shape, qtype)))

    def _take(self, n: int) -> bytes:
        if n > len(self.map) - self.pos:
            raise ValueError(f"truncated: {n} bytes at byte {self.pos} run past the end of the "
                             f"file ({len(self.map)} bytes)")  # fmt: skip
        self.pos += n
        return self.map[self.pos - n : self.pos]

    def _scalar(self, kind: str) -> Any:
        dt = np.dtype(kind)
        return np.frombuffer(self._take(dt.itemsize), dt)[0].item()

    def _string(self) -> str:
        at, n = self.pos, self._scalar("<u8")
        try:
            return self._take(n).decode()
        except UnicodeDecodeError as e:
            raise ValueError(f"the string at byte {at} is not UTF-8 ({e.reason})") from None

    def _value(self, kind: int) -> Any:
        if kind == self._STRING:
            return self._string()
        if kind in self._SCALARS:
            return self._scalar(self._SCALARS[kind])
        if kind != self._ARRAY:
            raise ValueError(f"metadata value of unknown type {kind} at byte {self.pos - 4}")
        item, count = self._scalar("<u4"), self._scalar("<u8")
        if item in self._SCALARS:
            dt = np.dtype(self._SCALARS[item])
            return np.frombuffer(self._take(count * dt.itemsize), dt)
        if item != self._STRING:
            raise ValueError(f"metadata array of type {item} at byte {self.pos - 12} is not "
                             "supported (arrays of numbers or strings)")  # fmt: skip
        if count * 8 > len(self.map) - self.pos:  # each string takes 8+ bytes
            raise ValueError(f"an array of {count} strings at byte {self.pos} runs past the "
                             f"end of the file ({len(self.map)} bytes)")  # fmt: skip
        return [self._string() for _ in range(count)]

    @staticmethod
    def _unique(name: str, seen: dict[str, Any], what: str) -> str:
        if name in seen:
            raise ValueError(f"{what} {name!r} appears twice")
        return name


# -------------------------------------------------------------------------------- safetensors


def _safetensors_tensors(path: Path, dtype: torch.dtype, device: torch.device) -> SourceTensors:
    from safetensors import safe_open

    config_file = path / "config.json"
    with _malformed(config_file, "not valid JSON"):
        hf = json.loads(config_file.read_text())
    if not isinstance(hf, dict):
        raise ModelFileError(config_file, f"not a JSON object but {type(hf).__name__} {hf!r:.40}")
    with _malformed(config_file):
        config = _hf_config(path.name, hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(path, "no *.safetensors files")
    index: dict[str, Path] = {}
    for file in files:
        with _malformed(file), safe_open(str(file), framework="pt") as f:
            index |= dict.fromkeys(f.keys(), file)
    large = sum(f.stat().st_size for f in files) > 1 << 30
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = path if has_tokenizer else None
    if "quantization_config" in hf:
        with _malformed(config_file, "quantization_config"):
            stored = StoredCheckpoint(path, hf["quantization_config"], index, dtype, device)
        return SourceTensors(config, _checked(config, path, stored.get), large, tokenizer, hf,
                             _checked(config, path, stored.linear, ".weight"),
                             stored.scheme)  # fmt: skip

    def get(name: str) -> torch.Tensor:
        if name not in index:
            raise ModelFileError(path, f"no tensor {name}")
        with safe_open(str(index[name]), framework="pt") as f:
            return f.get_tensor(name).to(device=device, dtype=dtype)

    return SourceTensors(config, _checked(config, path, get), large, tokenizer, hf)


def _hf_config(name: str, hf: dict) -> ModelConfig:
    hidden = positive_int(hf["hidden_size"], "hidden_size")
    heads = positive_int(hf["num_attention_heads"], "num_attention_heads")
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` and
    # `rope_scaling`
    rope = _json_object(hf.get("rope_parameters") or {}, "rope_parameters")
    scaling = hf.get("rope_scaling") or (
        rope if rope.get("rope_type", "default") != "default" else None
    )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    eos = hf.get("eos_token_id")
    return ModelConfig(
        name=name,
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        rope_theta=theta,
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        max_position=hf.get("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=_llama3_scaling(scaling),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def _llama3_scaling(scaling: Any) -> Llama3RopeScaling | None:
    if scaling is None:
        return None
    kind = _json_object(scaling, "rope_scaling").get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (llama3 only)")
    return Llama3RopeScaling(  # ModelConfig checks the values
        factor=scaling["factor"],
        low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position=scaling["original_max_position_embeddings"],
    )


def _json_object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {value!r:.40}")
    return value


# ------------------------------------------------------------------------------- file errors

# What a malformed file raises in the readers above and the libraries they call (json, numpy,
# gguf's dequantization, safetensors, torch): a missing key, a value of a wrong type or range,
# bytes that do not parse, shapes that do not fit.
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
              RuntimeError)  # fmt: skip


@contextmanager
def _malformed(where: Path, what: str = "") -> Iterator[None]:
    """Errors reading (`what` of) the file `where` as a ModelFileError naming the file (the
    original its cause); a ModelFileError passes as it is."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelFileError:
        raise
    except (*_MALFORMED, SafetensorError) as e:
        reason = f"missing {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        reason = reason or type(e).__name__
        raise ModelFileError(where, f"{what}: {reason}" if what else reason) from e


def _check_shape(config: ModelConfig, name: str, shape: Sequence[int], where: Path) -> None:
    if tuple(shape) != (want := _hf_shape(config, name)):
        raise ModelFileError(where, f"tensor {name} has shape {list(shape)}, not the "
                                    f"{list(want)} its config gives")  # fmt: skip


_W = TypeVar("_W", torch.Tensor, Weight)


def _checked(
    config: ModelConfig, where: Path, read: Callable[[str], _W], suffix: str = ""
) -> Callable[[str], _W]:
    """`read` (a checkpoint's tensors by name; its linears by name less `suffix`) with its
    errors as ModelFileErrors naming `where`, each tensor's shape checked against `config`."""

    def get(name: str) -> _W:
        with _malformed(where, f"tensor {name}{suffix}"):
            w = read(name)
        shape = w.codes.shape if isinstance(w, QuantizedWeight) else w.shape
        _check_shape(config, name + suffix, shape, where)
        return w

    return get
