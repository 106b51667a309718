"""The Llama model written against `Ops`, run on the Triton kernels (the interpreter, fp16) and
on the torch references (float64, the same weights): a prefill of two prompts in one packed
batch over shuffled blocks, then a decode step of both. Covers how the model calls the fused
ops (the norm inside the projection that reads it, its sums of squares handed over by the one
that feeds the stream, which adds the residual; RoPE with the KV write), which the per-kernel
tests do not."""

import dataclasses

import pytest
import torch
from kernel_inputs import assert_close

from kvmesh.kernels.quant import FP8_DTYPE, Weight
from kvmesh.shared.engine.batch import ForwardBatch
from kvmesh.shared.model.config import ModelConfig
from kvmesh.shared.model.llama import LayerWeights, LlamaModel, LlamaWeights
from kvmesh.shared.model.loader import fold_norm, synthetic_weights
from kvmesh.shared.model.ops import KERNEL_OPS, REFERENCE_OPS

CONFIG = ModelConfig(name="small-gqa", hidden_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=64, intermediate_size=192, vocab_size=300,
                     rope_theta=10000.0, rms_eps=1e-5, max_position=256, tie_embeddings=False,
                     rope_scaling=None, bos_token_id=1, eos_token_ids=(2,))  # fmt: skip
PAGE = 16


def _weights(dtype: torch.dtype) -> LlamaWeights:
    """Seeded weights with norm weights away from 1 folded into the projections that read the
    norms (as the loader does), so a norm that misses a row's scale shows."""
    w = synthetic_weights(CONFIG, dtype, torch.device("cpu"), seed=4)
    gen = torch.Generator().manual_seed(5)

    def norm_weight() -> torch.Tensor:
        return (1 + torch.randn(CONFIG.hidden_size, generator=gen) / 3).to(dtype)

    layers = [dataclasses.replace(layer, qkv=fold_norm(layer.qkv, norm_weight()),
                                  gate_up=fold_norm(layer.gate_up, norm_weight()))
              for layer in w.layers]  # fmt: skip
    return dataclasses.replace(w, layers=layers, lm_head=fold_norm(w.lm_head, norm_weight()))


def _as(weights: LlamaWeights, dtype: torch.dtype) -> LlamaWeights:
    def cast(layer: LayerWeights) -> LayerWeights:
        def to(t: Weight | None) -> Weight | None:  # quantized weights keep their codes
            return t.to(dtype) if isinstance(t, torch.Tensor) else t

        return LayerWeights(**{f.name: to(getattr(layer, f.name))
                               for f in dataclasses.fields(layer)})  # fmt: skip

    assert weights.norm is None  # folded into lm_head (CONFIG is untied)
    return LlamaWeights(weights.embed.to(dtype), [cast(layer) for layer in weights.layers],
                        None, weights.lm_head.to(dtype))  # fmt: skip


def _batch(ids, positions, blocks, lens, q_lens, table) -> ForwardBatch:
    slots = [blocks[b] * PAGE + p for b, n in enumerate(q_lens)
             for p in range(lens[b] - n, lens[b])]  # fmt: skip
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    return ForwardBatch(
        input_ids=torch.tensor(ids), positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots), block_table=torch.tensor(table, dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        sample_indices=torch.tensor(cu[1:]) - 1, max_q_len=max(q_lens),
    )  # fmt: skip


def _logits(
    ops, weights: LlamaWeights, dtype: torch.dtype, kv_scales: torch.Tensor | None = None
) -> list[torch.Tensor]:
    model = LlamaModel(CONFIG, weights, ops)
    model.kv_scales = kv_scales  # an FP8 cache's, else None
    cache = torch.zeros(CONFIG.num_layers, 2, 5, PAGE, CONFIG.num_kv_heads, CONFIG.head_dim,
                        dtype=dtype if kv_scales is None else FP8_DTYPE)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in (5, 9)]
    blocks, table = [3, 1], [[3], [1]]  # shuffled, one block a sequence
    prefill = _batch(prompts[0] + prompts[1], list(range(5)) + list(range(9)), blocks, [5, 9],
                     [5, 9], table)  # fmt: skip
    decode = _batch([7, 11], [5, 9], blocks, [6, 10], [1, 1], table)
    return [model.forward(prefill, cache), model.forward(decode, cache)]


def test_the_model_on_the_kernels_matches_the_references():
    weights = _weights(torch.float16)
    kernels = _logits(KERNEL_OPS, weights, torch.float16)
    reference = _logits(REFERENCE_OPS, _as(weights, torch.float64), torch.float64)
    for got, want in zip(kernels, reference, strict=True):
        assert got.shape == want.shape == (2, CONFIG.vocab_size)
        assert_close(got, want, torch.float16, factor=4)


@pytest.mark.parametrize("scheme,kv_fp8", [("fp8", False), ("int8", False), ("none", True)])
def test_the_quantized_model_on_the_kernels_matches_the_references(scheme, kv_fp8):
    """FP8/INT8 projections (their norm gains apart, away from 1) or an FP8 KV cache: the model on
    the kernels (fp16) against the references (fp32) on the same codes and scales."""
    w = synthetic_weights(CONFIG, torch.float16, torch.device("cpu"), seed=4, quantization=scheme)
    gen = torch.Generator().manual_seed(5)
    if scheme != "none":
        gains = [(1 + torch.randn(CONFIG.hidden_size, generator=gen) / 3).half() for _ in range(4)]
        w = dataclasses.replace(w, layers=[
            dataclasses.replace(layer, qkv_gain=gains[2 * i], gate_up_gain=gains[2 * i + 1])
            for i, layer in enumerate(w.layers)])  # fmt: skip
    scales = None
    if kv_fp8:  # powers of two putting the synthetic K/V (|x| < 1) well inside the grid
        exponents = torch.randint(
            -9, -6, (CONFIG.num_layers, 2, CONFIG.num_kv_heads), generator=gen
        )
        scales = torch.exp2(exponents.float())
    kernels = _logits(KERNEL_OPS, w, torch.float16, scales)
    reference = _logits(REFERENCE_OPS, _as(w, torch.float32), torch.float32, scales)
    for got, want in zip(kernels, reference, strict=True):
        assert got.shape == want.shape == (2, CONFIG.vocab_size)
        assert_close(got, want.double(), torch.float16, factor=8)
