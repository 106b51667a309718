"""Quantized checkpoints in the compressed-tensors format (what llm-compressor writes and vLLM
and transformers read): written from a model source a layer at a time, and read by the loader.

A checkpoint is a Hugging Face directory: config.json with a `quantization_config`, the tensors
in safetensors files (one `model.safetensors`, or shards and `model.safetensors.index.json`).
Each quantized linear `<name>` (e.g. model.layers.0.self_attn.q_proj) is stored as:

    fp8  (format "float-quantized", llm-compressor's FP8_DYNAMIC scheme)
         <name>.weight         [out, in]     float8_e4m3fn codes
         <name>.weight_scale   [out, 1]      float32, one scale per output channel
         activations: dynamic, per token (nothing stored)
    int8 (format "pack-quantized", the W8A16 form vLLM serves: it reads 8-bit weight-only
         checkpoints only packed)
         <name>.weight_packed  [out, in/4]   int32: four codes + 128 a word, the first in the
                                             low byte (compressed-tensors' pack_to_int32)
         <name>.weight_shape   [2]           int64, [out, in]
         <name>.weight_scale   [out, 1]      float32

The codes and scales are kernels/quant.py's grid (symmetric, scale = amax / 448 or / 127), so
loading a written checkpoint gives bit for bit what quantizing the source at load gives. Scales
are stored in float32, not the model's dtype, for that reason. Everything else (embeddings,
norms, lm_head and the linears a plan keeps: the `ignore` list) is stored as the source has it,
in the model's dtype under its Hugging Face name: the plain weights, never the loader's folded
ones.

Read: float-quantized, naive-quantized, int-quantized and pack-quantized checkpoints with 8-bit
symmetric weights per channel or per tensor (a per-tensor scale is the same scale for every
row); FP8 weights run with activations quantized per token at run time, whatever the checkpoint
planned for them (static per-tensor input scales are not used); anything else is refused with
a ModelFileError (a ValueError) naming the file and what it holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvmesh.kernels.quant import FP8_DTYPE, QuantizedWeight, Weight, quantize_weight
from kvmesh.shared.model.config import ModelConfig
from kvmesh.shared.model.source import ModelFileError
from kvmesh.shared.model.tensors import LOAD_ORDER, PROJECTIONS, SourceTensors

log = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMATS = {"fp8": "float-quantized", "int8": "pack-quantized"}  # what a write uses
READ_FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized")
SHARD_BYTES = 5 * 10**9  # a safetensors file's size, as Hugging Face's save_pretrained
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------------- config.json


def quantization_config(scheme: str, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for `scheme` ('fp8' or 'int8') with every Linear
    quantized but the modules named in `ignore`."""
    if scheme not in FORMATS:
        raise ValueError(f"scheme must be one of {', '.join(FORMATS)}, got {scheme!r}")
    fp8 = scheme == "fp8"
    group = {
        "targets": ["Linear"],
        "weights": _args("float" if fp8 else "int", "channel", dynamic=False),
        "input_activations": _args("float", "token", dynamic=True) if fp8 else None,
        "output_activations": None,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMATS[scheme],
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def _args(kind: str, strategy: str, dynamic: bool) -> dict[str, Any]:
    """compressed-tensors' QuantizationArgs of an 8-bit symmetric grid."""
    return {
        "num_bits": 8, "type": kind, "symmetric": True, "group_size": None,
        "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
        "observer": None if dynamic else "minmax", "observer_kwargs": {},
    }  # fmt: skip


def hf_config(config: ModelConfig, dtype: torch.dtype, base: dict | None) -> dict[str, Any]:
    """A Llama config.json for `config` (a Hugging Face source's own, `base`, kept whole)."""
    if base is not None:  # transformers >= 5 names the dtype `dtype`, older ones `torch_dtype`
        dtypes = {key: _dtype_name(dtype) for key in ("dtype", "torch_dtype") if key in base}
        return {**base, **(dtypes or {"torch_dtype": _dtype_name(dtype)})}
    eos = list(config.eos_token_ids)
    scaling = config.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position,
        },
        "max_position_embeddings": config.max_position,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": _dtype_name(dtype),
    }  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------- int8 packing


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """int32 [out, ceil(in / 4)] of int8 codes [out, in]: each code + 128 as a byte, four a word,
    column 4j + b in byte b (bits 8b..8b+7); missing columns of the last word are 0 bytes."""
    out, cols = codes.shape
    pad = -cols % 4
    unsigned = (codes.to(torch.int64) + 128).reshape(out, cols)
    unsigned = torch.nn.functional.pad(unsigned, (0, pad)).view(out, -1, 4)
    word = (unsigned << torch.arange(0, 32, 8, device=codes.device)).sum(-1)  # [0, 2^32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int8(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """int8 codes [out, in] of `pack_int8`'s words."""
    word = packed.to(torch.int64) & 0xFFFFFFFF
    unsigned = (word[..., None] >> torch.arange(0, 32, 8, device=packed.device)) & 0xFF
    return (unsigned.flatten(1)[:, : shape[1]] - 128).to(torch.int8).reshape(shape)


# ------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class Written:
    """What write_checkpoint wrote."""

    path: Path
    scheme: str
    quantized: int  # Hugging Face linears stored quantized
    ignore: list[str]  # the modules stored in the model's dtype (lm_head always)
    files: list[str]  # the safetensors files
    bytes: int  # of all tensors

    def summary(self) -> str:
        """One line for a README: what the checkpoint holds."""
        kept = [n for n in self.ignore if n != "lm_head"]
        return (
            f"{self.path}: {self.scheme} ({QUANT_METHOD}, {FORMATS[self.scheme]}), "
            f"{self.quantized} linears quantized, {len(kept)} kept in full precision"
            f"{' (' + ', '.join(kept) + ')' if kept else ''} and lm_head; "
            f"{len(self.files)} safetensors file(s), {self.bytes / 1e6:.1f} MB"
        )


def write_checkpoint(
    src: SourceTensors, out: Path, scheme: str, keep: frozenset[str] = frozenset(),
    shard_bytes: int = SHARD_BYTES,
) -> Written:  # fmt: skip
    """Write `src` (loader.open_source) to the empty or new directory `out`, its decoder
    linears quantized to `scheme` ('fp8' or 'int8') with kernels/quant.py's quantize_weight
    except those of the projections named in `keep` ("layers.{i}.{qkv|o|gate_up|down}").

    Tensors are read from the source one at a time in the loader's order (LOAD_ORDER, then the
    embedding) and written a shard at a time: at most one shard and one tensor are held."""
    config = src.config
    names = {f"layers.{i}.{p}" for i in range(config.num_layers) for p in PROJECTIONS}
    if unknown := sorted(keep - names):
        raise ValueError(f"unknown projections to keep: {', '.join(unknown)} (layers.<i>."
                         f"<{'|'.join(PROJECTIONS)}>, i < {config.num_layers})")  # fmt: skip
    quantization_config(scheme, [])  # checks the scheme
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} is not empty: write a checkpoint into a new directory")
    shards = _Shards(out, shard_bytes)
    ignore, quantized = [], 0
    dtype: torch.dtype | None = None
    for name, tensor, kept in _tensors(src, keep):
        if dtype is None:
            dtype = tensor.dtype
        if kept is None:
            shards.add(name, tensor)
        elif kept:
            shards.add(name, tensor)
            ignore.append(name.removesuffix(".weight"))
        else:
            _add_quantized(shards, name.removesuffix(".weight"), tensor, scheme)
            quantized += 1
    assert dtype is not None
    files, total = shards.close()
    ignore.append("lm_head")
    hf = hf_config(config, dtype, src.hf)
    hf["quantization_config"] = quantization_config(scheme, ignore)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return Written(out, scheme, quantized, ignore, files, total)


def _tensors(
    src: SourceTensors, keep: frozenset[str]
) -> Iterator[tuple[str, torch.Tensor, bool | None]]:
    """(HF name, tensor, whether kept) of every tensor of the model in the loader's order;
    `kept` None for tensors that are not decoder linears."""
    for i in range(src.config.num_layers):
        p = f"model.layers.{i}."
        for projection in LOAD_ORDER:
            kept = f"layers.{i}.{projection}" in keep
            for linear in PROJECTIONS[projection]:
                yield p + linear + ".weight", src.get(p + linear + ".weight"), kept
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield p + norm + ".weight", src.get(p + norm + ".weight"), None
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        yield name, src.get(name), None
    if not src.config.tie_embeddings:
        yield "lm_head.weight", src.get("lm_head.weight"), None


def _add_quantized(shards: _Shards, linear: str, w: torch.Tensor, scheme: str) -> None:
    q = quantize_weight(w, scheme)
    assert isinstance(q, QuantizedWeight)
    if scheme == "fp8":
        shards.add(linear + ".weight", q.codes)
    else:
        shards.add(linear + ".weight_packed", pack_int8(q.codes))
        shards.add(linear + ".weight_shape", torch.tensor(list(q.codes.shape)))
    shards.add(linear + ".weight_scale", q.scale)


class _Shards:
    """safetensors files of at most `limit` bytes of tensors each (a tensor larger than that
    gets a file of its own), named as Hugging Face names them once all are written."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".part-{len(self.written)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> tuple[list[str], int]:
        """The final file names and the tensors' bytes; writes the index if there are shards."""
        if self.pending:
            self._flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]  # fmt: skip
        weight_map = {}
        for (path, tensors), name in zip(self.written, names, strict=True):
            path.rename(self.out / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names, self.total


# -------------------------------------------------------------------------------------------- read


class StoredCheckpoint:
    """A compressed-tensors checkpoint's tensors (the loader's safetensors source): `linear`
    gives a linear as stored (QuantizedWeight, or its weight in `dtype` where not quantized),
    `get` any tensor by name in `dtype` (a quantized linear's weight dequantized)."""

    def __init__(self, path: Path, config: dict[str, Any], index: dict[str, Path],
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.scheme = stored_scheme(path, config)
        self.path, self.index, self.dtype, self.device = path, index, dtype, device

    def linear(self, name: str) -> Weight:
        """The linear `name` (no ".weight" suffix) as stored."""
        if name + ".weight_packed" in self.index:
            shape = tuple(int(n) for n in self._read(name + ".weight_shape").tolist())
            if len(shape) != 2:
                raise ModelFileError(
                    self._file(name + ".weight_shape"),
                    f"{name}.weight_shape is {list(shape)}, not [out, in]",
                )
            codes = unpack_int8(self._read(name + ".weight_packed"), (shape[0], shape[1]))
        elif name + ".weight_scale" in self.index:
            codes = self._read(name + ".weight")
        else:
            return self._read(name + ".weight").to(device=self.device, dtype=self.dtype)
        expected = FP8_DTYPE if self.scheme == "fp8" else torch.int8
        if codes.dtype != expected:
            raise ModelFileError(
                self._file(name + ".weight_scale"),
                f"{name}'s codes are {codes.dtype}, not {expected} as a {self.scheme} checkpoint's",
            )
        scale = self._read(name + ".weight_scale").float()
        if scale.numel() == 1:  # per tensor: the one scale of every row
            scale = scale.reshape(1, 1).expand(codes.shape[0], 1)
        if scale.numel() != codes.shape[0]:
            raise ModelFileError(
                self._file(name + ".weight_scale"),
                f"{name}.weight_scale has shape {list(scale.shape)}; only per-channel "
                f"[{codes.shape[0]}, 1] or per-tensor scales are supported",
            )
        return QuantizedWeight(codes.to(self.device),
                               scale.reshape(-1, 1).contiguous().to(self.device))  # fmt: skip

    def get(self, name: str) -> torch.Tensor:
        linear = name.removesuffix(".weight")
        if name.endswith(".weight") and (
            linear + ".weight_scale" in self.index or linear + ".weight_packed" in self.index
        ):  # fmt: skip
            w = self.linear(linear)
            assert isinstance(w, QuantizedWeight)
            return w.dequantize().to(self.dtype)
        return self._read(name).to(device=self.device, dtype=self.dtype)

    def _file(self, name: str) -> Path:
        return self.index.get(name, self.path)

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.index:
            raise ModelFileError(self.path, f"no tensor {name}")
        with safe_open(str(self.index[name]), framework="pt") as f:
            return f.get_tensor(name)


def stored_scheme(path: Path, config: dict[str, Any]) -> str:
    """'fp8' or 'int8': the scheme of a checkpoint's `quantization_config`; a ModelFileError
    naming the checkpoint's config.json and what it asks for where kvmesh cannot load it as
    stored."""

    def unsupported(what: str) -> ModelFileError:
        return ModelFileError(
            path / "config.json",
            f"{what} is not supported (kvmesh loads {QUANT_METHOD} checkpoints of 8-bit "
            "symmetric weights per channel or per tensor: FP8 with activations per token or per "
            "tensor, INT8 weight-only)",
        )

    if not isinstance(config, dict):
        raise unsupported(f"a quantization_config of {config!r:.40}")
    method, fmt = config.get("quant_method"), config.get("format")
    if method != QUANT_METHOD:
        raise unsupported(f"quant_method {method!r}")
    if fmt not in READ_FORMATS:
        raise unsupported(f"format {fmt!r}")
    if config.get("kv_cache_scheme"):
        raise unsupported("a stored KV cache quantization (kv_cache_scheme)")
    groups = config.get("config_groups") or {}
    if not groups or not isinstance(groups, dict):
        raise unsupported("a quantization_config without config_groups (an object)")
    schemes = {_group_scheme(name, group, unsupported) for name, group in groups.items()}
    if len(schemes) > 1:
        raise unsupported("config groups of both fp8 and int8")
    return schemes.pop()


def _group_scheme(name: str, group: dict[str, Any], unsupported: Any) -> str:
    """A config group's scheme ('fp8' or 'int8'), checked."""
    if not isinstance(group, dict):
        raise unsupported(f"{name}: a config group of {group!r:.40}")
    w, a = group.get("weights"), group.get("input_activations")
    if not w or not isinstance(w, dict):
        raise unsupported(f"{name} without weights")
    if a is not None and not isinstance(a, dict):
        raise unsupported(f"{name}: input_activations {a!r:.40}")
    if group.get("output_activations"):
        raise unsupported(f"{name}: output activation quantization")
    if w.get("num_bits") != 8 or w.get("type") not in ("float", "int"):
        raise unsupported(f"{name}: {w.get('num_bits')}-bit {w.get('type')} weights")
    if w.get("strategy") not in ("channel", "tensor"):
        raise unsupported(f"{name}: weights quantized per {w.get('strategy')}")
    if not w.get("symmetric", True) or w.get("dynamic"):
        raise unsupported(f"{name}: asymmetric or dynamic weights")
    if w["type"] == "int":
        if a is not None:
            raise unsupported(f"{name}: quantized activations with int8 weights (int8 here is "
                              "weight-only)")  # fmt: skip
        return "int8"
    if a is not None and (a.get("type"), a.get("num_bits")) != ("float", 8):
        raise unsupported(f"{name}: {a.get('num_bits')}-bit {a.get('type')} activations")
    if a is None or a.get("strategy") != "token" or not a.get("dynamic"):
        how = "none" if a is None else f"per {a.get('strategy')}, dynamic={a.get('dynamic')}"
        log.info("%s: activations are quantized per token at run time (the checkpoint plans "
                 "%s)", name, how)  # fmt: skip
    if a is not None and a.get("strategy") not in ("token", "tensor"):
        raise unsupported(f"{name}: activations quantized per {a.get('strategy')}")
    return "fp8"
