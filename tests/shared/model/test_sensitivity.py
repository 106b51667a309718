"""Quantization accuracy of the default model through kvmesh's own model (reference ops, float32,
CPU), on a reduced evaluation text: issue 27's targets (INT8 within 0.5% of unquantized, FP8
W8A8 no worse than +3.5%, an FP8 KV cache within 1%, a sensitivity plan keeping 10% of the
projections within 1.5% and better than as many chosen at random) and the ranking's properties.

benchmarks/quant_accuracy.py measures the same on the full text (24,576 tokens).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvmesh.shared.engine import kv_scales
from kvmesh.shared.engine.tokenizer import load_tokenizer
from kvmesh.shared.model import sensitivity
from kvmesh.shared.model.llama import LlamaModel
from kvmesh.shared.model.loader import load_model
from kvmesh.shared.model.ops import REFERENCE_OPS
from kvmesh.shared.model.sensitivity import Sensitivity
from kvmesh.shared.model.tensors import PROJECTIONS

EVAL_TOKENS = 1_024  # the first tokens of pydoc_data.topics, one window
WINDOW = 1_024
# the tokens after the evaluation's: a ranking runs the model 121 times over them, so few; more
# than linear.MAX_M = 64 keeps FP8 on its prefill path (W8A8), and a ranking over 72 left the
# plan at +1.52% (over 128: within 1.5%)
CALIB_TOKENS = 128
KEEP = 12  # of 120 projections: 10%
SEED = 0  # of the random choice the plan must beat

CPU = torch.device("cpu")


class Setup:
    """The default model unquantized, FP8 and INT8, the texts, the unquantized perplexity and
    the FP8 ranking, computed once for the module."""

    def __init__(self) -> None:
        loaded = load_model("", torch.float32, CPU)
        assert loaded.tokenizer_source is not None
        self.tokenizer = load_tokenizer(loaded.tokenizer_source)
        self.encode = encode = self.tokenizer.encode
        self.none = LlamaModel(loaded.config, loaded.weights, REFERENCE_OPS)
        self.fp8, self.int8 = (
            LlamaModel(loaded.config, load_model("", torch.float32, CPU, quantization=s).weights,
                       REFERENCE_OPS)
            for s in ("fp8", "int8")
        )  # fmt: skip
        self.evaluation = sensitivity.evaluation_ids(encode, EVAL_TOKENS)
        self.calibration = sensitivity.calibration_ids(encode, CALIB_TOKENS, EVAL_TOKENS)
        self._ranking: list[Sensitivity] | None = None
        self.base = sensitivity.perplexity(self.none, self.evaluation, WINDOW)

    @property
    def ranking(self) -> list[Sensitivity]:
        """The FP8 ranking over the calibration text, measured on first use."""
        if self._ranking is None:
            self._ranking = sensitivity.rank_projections(self.none, self.fp8, self.calibration)
        return self._ranking

    def fp8_keeping(self, keep: frozenset[str]) -> float:
        """Perplexity of the FP8 model with `keep` unquantized."""
        with sensitivity.swapped(self.fp8, self.none, sorted(keep)):
            return sensitivity.perplexity(self.fp8, self.evaluation, WINDOW)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def test_texts_are_disjoint_slices_of_pydoc_topics(setup: Setup) -> None:
    assert len(setup.evaluation) == EVAL_TOKENS and len(setup.calibration) == CALIB_TOKENS
    both = sensitivity.evaluation_ids(setup.encode, EVAL_TOKENS + CALIB_TOKENS)
    assert both == setup.evaluation + setup.calibration
    from pydoc_data.topics import topics

    assert sensitivity.pydoc_text().startswith(topics[min(topics)] + "\n\n")


def test_unquantized_perplexity_is_the_models(setup: Setup) -> None:
    # SmolLM2-135M on this documentation text: about 11 over 24,576 tokens, a little higher on
    # the first 1,024; a broken model or mask gives hundreds
    assert 8 < setup.base < 20


def test_int8_weight_only_within_half_a_percent(setup: Setup) -> None:
    ppl = sensitivity.perplexity(setup.int8, setup.evaluation, WINDOW)
    assert ppl != setup.base  # the weights did change
    assert abs(ppl / setup.base - 1) <= 0.005, (ppl, setup.base)


def test_fp8_w8a8_within_three_and_a_half_percent(setup: Setup) -> None:
    ppl = sensitivity.perplexity(setup.fp8, setup.evaluation, WINDOW)
    assert setup.base < ppl <= setup.base * 1.035, (ppl, setup.base)


def test_fp8_kv_cache_within_one_percent(setup: Setup) -> None:
    model = setup.none
    ids = kv_scales.calibration_ids(setup.tokenizer, model.config.vocab_size)
    model.kv_scales = kv_scales.calibrate_kv_scales(model, ids, sensitivity.BLOCK_SIZE)
    try:
        ppl = sensitivity.perplexity(model, setup.evaluation, WINDOW)
    finally:
        model.kv_scales = None
    assert ppl != setup.base  # the cache did hold codes
    assert abs(ppl / setup.base - 1) <= 0.01, (ppl, setup.base)


def test_the_plan_keeping_ten_percent_is_within_one_and_a_half_percent_and_beats_random(
    setup: Setup,
) -> None:
    names = sensitivity.projection_names(setup.none)
    plan = sensitivity.keep_most_sensitive(setup.ranking, KEEP)
    chance = sensitivity.random_choice(names, KEEP, SEED)
    assert len(plan) == len(chance) == KEEP == len(names) // 10
    planned, random = setup.fp8_keeping(plan), setup.fp8_keeping(chance)
    assert planned <= setup.base * 1.015, (planned, setup.base)
    assert planned < random, (planned, random)


def test_the_ranking_names_every_projection_once_most_sensitive_first(setup: Setup) -> None:
    ranking = setup.ranking
    layers = setup.none.config.num_layers
    assert sorted(s.name for s in ranking) == sorted(
        f"layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS
    )
    kls = [s.kl for s in ranking]
    assert kls == sorted(kls, reverse=True)
    assert all(math.isfinite(kl) and kl >= 0 for kl in kls)
    assert kls[0] > 0  # FP8 moves the distribution somewhere
    plan = sensitivity.keep_most_sensitive(ranking, 3)
    assert plan == frozenset(s.name for s in ranking[:3])


def test_swapping_restores_the_model_and_moves_the_gain_with_the_weight(setup: Setup) -> None:
    none, fp8 = setup.none, setup.fp8
    layer = none.weights.layers[0]
    before = (layer.qkv, layer.qkv_gain, layer.o)
    assert layer.qkv_gain is None and fp8.weights.layers[0].qkv_gain is not None
    with sensitivity.swapped(none, fp8, ["layers.0.qkv"]):
        assert layer.qkv is fp8.weights.layers[0].qkv
        assert layer.qkv_gain is fp8.weights.layers[0].qkv_gain
        assert layer.o is before[2]
    assert (layer.qkv, layer.qkv_gain, layer.o) == before
    with (
        pytest.raises(ValueError, match="bad projection name"),
        sensitivity.swapped(none, fp8, ["layers.0.o", "layers.0.q_proj"]),
    ):
        pass
    assert layer.o is before[2]  # the swaps made before the bad name are undone


def test_kl_of_the_model_against_itself_is_zero(setup: Setup) -> None:
    run = sensitivity.Calibrated.run(setup.none, setup.calibration[:80])
    for layer in (0, 17):  # the whole model, and from a layer's stream on
        assert run.kl_from(setup.none, layer) == pytest.approx(0, abs=1e-6)


def test_a_run_from_a_layers_stream_is_the_whole_models(setup: Setup) -> None:
    """The ranking's shortcut: with a projection of layer l quantized, running from the stream
    entering l gives the KL a whole forward does."""
    ids = setup.calibration[:80]
    run = sensitivity.Calibrated.run(setup.none, ids)
    with sensitivity.swapped(setup.none, setup.fp8, ["layers.9.gate_up"]):
        whole = torch.log_softmax(sensitivity.window_logits(setup.none, ids), -1)
        resumed = run.kl_from(setup.none, 9)
    ref = run.reference
    expected = float((ref.exp() * (ref - whole)).sum(-1).double().sum())
    assert expected > 0 and resumed == pytest.approx(expected, rel=1e-4)


def test_small_inputs_are_refused(setup: Setup) -> None:
    with pytest.raises(ValueError, match="longer than 64 tokens"):
        sensitivity.rank_projections(setup.none, setup.fp8, setup.calibration[:64])
    with pytest.raises(ValueError, match=r"give \[10\]"):  # the last window: 10 tokens
        sensitivity.rank_projections(setup.none, setup.fp8, setup.evaluation[:110], window=100)
    with pytest.raises(ValueError, match="fewer than"):
        sensitivity.evaluation_ids(lambda text: [1, 2, 3], 4)
    with pytest.raises(ValueError, match="n must be"):
        sensitivity.keep_most_sensitive([Sensitivity("layers.0.o", 1.0)], -1)
