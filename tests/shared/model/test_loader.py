"""Weights from a Hugging Face safetensors directory give HF's own greedy tokens; synthetic
shapes are seeded and cost what the real model costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.config import SHAPES
from kvmesh.shared.model.loader import load_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_safetensors_directory_matches_hf_greedy(hf_dir) -> None:
    path, model = hf_dir
    loaded = load_model(str(path), torch.float32, torch.device("cpu"))
    assert loaded.config.rope_scaling is not None and loaded.config.num_kv_heads == 2
    assert loaded.tokenizer_source is None  # no tokenizer files were saved
    engine = Engine(EngineConfig(model=str(path), block_size=4, num_blocks=128,
                                 max_num_batched_tokens=16), loaded)  # fmt: skip
    prompts = [[5, 17, 42], list(range(3, 90)), [7] * 20]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True))
    ours: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work:
        for out in engine.step():
            ours[out.request_id] += out.new_token_ids
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                 min_new_tokens=12, pad_token_id=0)  # fmt: skip
        assert ours[str(i)] == ref[0, len(p) :].tolist(), i


def test_synthetic_shapes_are_seeded_and_sized_like_the_real_model() -> None:
    a = load_model("synthetic:tiny", torch.float32, torch.device("cpu"), seed=1)
    b = load_model("synthetic:tiny", torch.float32, torch.device("cpu"), seed=1)
    c = load_model("synthetic:tiny", torch.float32, torch.device("cpu"), seed=2)
    assert torch.equal(a.weights.layers[0].qkv, b.weights.layers[0].qkv)
    assert not torch.equal(a.weights.layers[0].qkv, c.weights.layers[0].qkv)
    cfg = SHAPES["tiny"]
    n = sum(t.numel() for t in [a.weights.embed, a.weights.lm_head])
    n += sum(t.numel() for layer in a.weights.layers for t in vars(layer).values() if t is not None)
    # the norms' weights live folded into the projections that read them (lm_head's too: untied)
    assert a.weights.norm is None and not cfg.tie_embeddings
    assert n + (2 * cfg.num_layers + 1) * cfg.hidden_size == cfg.num_parameters()
    assert abs(SHAPES["llama3-8b"].num_parameters() / 8.03e9 - 1) < 0.01


def test_unknown_sources_are_explained() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        load_model("/nonexistent/model", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown synthetic shape"):
        load_model("synthetic:gpt-5", torch.float32, torch.device("cpu"))
