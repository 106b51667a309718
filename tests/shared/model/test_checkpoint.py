"""Quantized checkpoints (compressed-tensors): a written checkpoint loads bit for bit as the
source quantized at load, holds the schema and tensors other readers expect, keeps the planned
projections in full precision, and what kvmesh cannot load as stored is refused by name."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from weights import assert_same_weights

from kvmesh.kernels.quant import FP8_DTYPE, QuantizedWeight, quantize_weight
from kvmesh.shared.model.checkpoint import (
    INDEX,
    pack_int8,
    unpack_int8,
    write_checkpoint,
)
from kvmesh.shared.model.config import SHAPES
from kvmesh.shared.model.loader import _hf_config, fold_norm, load_model, open_source

CPU = torch.device("cpu")
KEEP = frozenset({"layers.1.qkv", "layers.0.down"})


def test_int8_packing_is_compressed_tensors_layout() -> None:
    # pack_to_int32's documented example: [1, 2] -> bytes 129, 130, 0, 0 -> 33409
    assert pack_int8(torch.tensor([[1, 2]], dtype=torch.int8)).tolist() == [[33409]]
    assert pack_int8(torch.full((1, 4), 127, dtype=torch.int8)).tolist() == [[-1]]
    codes = torch.randint(
        -127, 128, (7, 13), dtype=torch.int8, generator=torch.Generator().manual_seed(0)
    )
    packed = pack_int8(codes)
    assert packed.dtype == torch.int32 and packed.shape == (7, 4)
    assert torch.equal(unpack_int8(packed, (7, 13)), codes)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_round_trip_equals_quantize_at_load(scheme: str, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    src = open_source("synthetic:tiny", torch.float32, CPU)
    written = write_checkpoint(src, out, scheme, KEEP, shard_bytes=60_000)
    assert len(written.files) > 1 and (out / INDEX).is_file()  # sharded as HF shards
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert set(index.values()) == set(written.files)

    loaded = load_model(str(out), torch.float32, CPU)
    at_load = load_model("synthetic:tiny", torch.float32, CPU, quantization=scheme, keep=KEEP)
    assert_same_weights(loaded.weights, at_load.weights)
    # the kept projections load in full precision, the norm's weight folded in
    layer1, layer0 = loaded.weights.layers[1], loaded.weights.layers[0]
    assert isinstance(layer1.qkv, torch.Tensor) and layer1.qkv_gain is None
    assert isinstance(layer0.down, torch.Tensor) and isinstance(layer0.qkv, QuantizedWeight)
    assert loaded.config == SHAPES["tiny"].__class__(**{**vars(SHAPES["tiny"]), "name": "ckpt"})


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_config_and_tensors_follow_compressed_tensors(scheme: str, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    write_checkpoint(open_source("synthetic:tiny", torch.float32, CPU), out, scheme, KEEP)
    hf = json.loads((out / "config.json").read_text())
    q = hf["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    assert q["format"] == {"fp8": "float-quantized", "int8": "pack-quantized"}[scheme]
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    assert (w["num_bits"], w["strategy"], w["symmetric"], w["dynamic"]) == (
        8,
        "channel",
        True,
        False,
    )
    assert w["type"] == {"fp8": "float", "int8": "int"}[scheme]
    a = group["input_activations"]
    if scheme == "fp8":
        assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == (
            "float",
            8,
            "token",
            True,
        )
    else:
        assert a is None  # weight-only
    kept_linears = [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"] + [
        "model.layers.0.mlp.down_proj"
    ]
    assert sorted(q["ignore"]) == sorted([*kept_linears, "lm_head"])
    assert hf["torch_dtype"] == "float32" and hf["model_type"] == "llama"

    tensors = load_file(str(out / "model.safetensors"))
    cfg = SHAPES["tiny"]
    o = "model.layers.0.self_attn.o_proj"
    if scheme == "fp8":
        assert tensors[o + ".weight"].dtype == FP8_DTYPE
        assert tensors[o + ".weight"].shape == (cfg.hidden_size, cfg.q_size)
    else:
        assert o + ".weight" not in tensors
        assert tensors[o + ".weight_packed"].shape == (cfg.hidden_size, cfg.q_size // 4)
        assert tensors[o + ".weight_shape"].tolist() == [cfg.hidden_size, cfg.q_size]
    assert tensors[o + ".weight_scale"].shape == (cfg.hidden_size, 1)
    assert tensors[o + ".weight_scale"].dtype == torch.float32
    for linear in kept_linears:  # the plain weights, no scales
        assert tensors[linear + ".weight"].dtype == torch.float32
        assert linear + ".weight_scale" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float32
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert _hf_config("tiny", hf) == SHAPES["tiny"]  # a Llama config.json of the same model
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_default_model_round_trip_int8(tmp_path: Path) -> None:
    """The real model (GGUF source): the written INT8 checkpoint loads as quantizing at load."""
    out = tmp_path / "ckpt"
    write_checkpoint(open_source("", torch.float32, CPU), out, "int8", frozenset({"layers.3.o"}))
    at_load = load_model(
        "", torch.float32, CPU, quantization="int8", keep=frozenset({"layers.3.o"})
    )
    loaded = load_model(str(out), torch.float32, CPU)
    assert_same_weights(loaded.weights, at_load.weights)
    assert loaded.config.tie_embeddings and loaded.weights.lm_head is loaded.weights.embed


def _rewrite(out: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))


def test_a_group_stored_in_part_quantized_loads_in_full_precision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """q_proj kept (ignored) but k_proj quantized, as an external checkpoint may have it: the
    layer's qkv loads dequantized in full precision, with a log line."""
    out = tmp_path / "ckpt"
    write_checkpoint(open_source("synthetic:tiny", torch.float32, CPU), out, "fp8",
                     frozenset({"layers.0.qkv"}))  # fmt: skip
    k_name = "model.layers.0.self_attn.k_proj"
    k_plain = load_file(str(out / "model.safetensors"))[k_name + ".weight"]
    k_q = quantize_weight(k_plain, "fp8")
    assert isinstance(k_q, QuantizedWeight)

    def quantize_k(t: dict[str, torch.Tensor]) -> None:
        t[k_name + ".weight"], t[k_name + ".weight_scale"] = k_q.codes, k_q.scale

    _rewrite(out, quantize_k)
    with caplog.at_level(logging.INFO, logger="kvmesh.shared.model.loader"):
        loaded = load_model(str(out), torch.float32, CPU)
    assert "layers.0.qkv: its linears are stored in part quantized" in caplog.text
    plain = open_source("synthetic:tiny", torch.float32, CPU)
    layer = loaded.weights.layers[0]
    src = load_file(str(out / "model.safetensors"))
    p = "model.layers.0."
    expected = torch.cat([src[p + "self_attn.q_proj.weight"], k_q.dequantize(),
                          src[p + "self_attn.v_proj.weight"]])  # fmt: skip
    assert isinstance(layer.qkv, torch.Tensor) and layer.qkv_gain is None
    assert torch.equal(layer.qkv, fold_norm(expected, src[p + "input_layernorm.weight"]))
    assert isinstance(loaded.weights.layers[1].qkv, QuantizedWeight)
    assert plain.config == loaded.config.__class__(**{**vars(loaded.config), "name": "tiny"})


@pytest.fixture(scope="module")
def fp8_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp8") / "ckpt"
    write_checkpoint(open_source("synthetic:tiny", torch.float32, CPU), out, "fp8")
    return out


def _with_config(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    hf = json.loads((src / "config.json").read_text())
    edit(hf["quantization_config"])
    (dst / "config.json").write_text(json.dumps(hf))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq'"),
        (lambda q: q.update(format="nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized'"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "4-bit float"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group",
                                                                    group_size=128), "per group"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="block"), "per block"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False), "asymmetric"),
        (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="group"),
         "activations quantized per group"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    ],
)  # fmt: skip
def test_unsupported_schemes_are_refused_by_name(
    fp8_tiny: Path, tmp_path: Path, edit: Callable[[dict], object], message: str
) -> None:
    bad = _with_config(fp8_tiny, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match="not supported") as e:
        load_model(str(bad), torch.float32, CPU)
    assert message in str(e.value) and str(bad / "config.json") in str(e.value)


def test_wrong_codes_and_a_second_scheme_are_refused(fp8_tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quantized to fp8; it cannot load as 'int8'"):
        load_model(str(fp8_tiny), torch.float32, CPU, quantization="int8")
    # a group that says int while its tensors are FP8
    bad = _with_config(fp8_tiny, tmp_path / "bad", lambda q: (
        q.update(format="naive-quantized"),
        q["config_groups"]["group_0"]["weights"].update(type="int"),
        q["config_groups"]["group_0"].update(input_activations=None)))  # fmt: skip
    with pytest.raises(ValueError, match="codes are torch.float8_e4m3fn, not torch.int8"):
        load_model(str(bad), torch.float32, CPU)


def test_write_refuses_unknown_plans_and_used_directories(tmp_path: Path) -> None:
    src = open_source("synthetic:tiny", torch.float32, CPU)
    with pytest.raises(ValueError, match="unknown projections to keep: layers.2.qkv"):
        write_checkpoint(src, tmp_path / "a", "fp8", frozenset({"layers.2.qkv"}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not empty"):
        write_checkpoint(src, tmp_path / "b", "fp8")
    with pytest.raises(ValueError, match="scheme must be one of"):
        write_checkpoint(src, tmp_path / "c", "int4")


def test_hugging_face_source_in_bfloat16(tmp_path: Path) -> None:
    """From a Hugging Face directory: its config.json is kept (plus the quantization), its
    tensors in the asked dtype, and the round trip is exact there too (untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so folding them would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    bf16 = torch.bfloat16
    out = tmp_path / "ckpt"
    write_checkpoint(open_source(str(tmp_path / "hf"), bf16, CPU), out, "fp8", KEEP)
    source = json.loads((tmp_path / "hf" / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("quantization_config", "dtype",
            "torch_dtype")} == {k: v for k, v in source.items() if k not in ("dtype",
            "torch_dtype")}  # fmt: skip
    assert "bfloat16" in (written.get("dtype"), written.get("torch_dtype"))
    loaded = load_model(str(out), bf16, CPU)
    assert_same_weights(
        loaded.weights, load_model(str(tmp_path / "hf"), bf16, CPU, quantization="fp8",
                                   keep=KEEP).weights,
    )  # fmt: skip
    assert loaded.weights.embed.dtype == bf16 and loaded.weights.norm is None  # folded: untied
