"""Layer-wise quantization sensitivity and perplexity, measured through kvmesh's own model.

Every figure here runs the model that serves (LlamaModel over a paged KV cache with whatever
`Ops` it holds: the torch references on CPU compute the GPU kernels' quantization grids), one
packed prefill a window from an empty cache, logits for every position.

Texts: the standard library's documentation text, `pydoc_data.topics.topics`' values in sorted
key order joined by "\\n\\n" (`pydoc_text`), tokenized without special tokens. Evaluation is its
first EVAL_TOKENS tokens; calibration is the CALIB_TOKENS tokens after them (`calibration_ids`
with skip = the evaluation's length), so the two never overlap.

Perplexity = exp(mean NLL) over the next-token predictions inside each window (window - 1 a
window: a window's first token is context only). Sensitivity of a projection
("layers.{i}.{qkv|o|gate_up|down}", loader.PROJECTIONS) = the mean over calibration positions of
KL(P_unquantized || P_that projection alone quantized) of the next-token distribution, in nats:
the divergence the quantization of that projection alone adds to what the model predicts, the
quantity a plan that keeps a few projections unquantized wants to remove most of.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.kernels.linear import MAX_M
from kvmesh.kernels.quant import FP8_DTYPE
from kvmesh.shared.engine.batch import ForwardBatch, alone_in_cache
from kvmesh.shared.model.llama import LayerWeights, LlamaModel
from kvmesh.shared.model.tensors import PROJECTIONS

EVAL_TOKENS = 24_576  # the evaluation text: the first tokens of pydoc_text()
CALIB_TOKENS = 1_024  # the calibration text: the tokens after the evaluation's
BLOCK_SIZE = 16  # of the KV cache a window runs in
# the norm gain a quantized projection keeps apart (LayerWeights), by projection
_GAINS = {"qkv": "qkv_gain", "gate_up": "gate_up_gain"}


@dataclass(frozen=True)
class Sensitivity:
    name: str  # "layers.{i}.{projection}"
    kl: float  # mean KL(unquantized || this projection alone quantized), nats per position


def pydoc_text() -> str:
    """The standard library's documentation text: pydoc_data.topics' values in sorted key
    order, joined by blank lines (about 24,000 words of English and code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=2)
def pydoc_ids(encode: Callable[[str], list[int]]) -> tuple[int, ...]:
    """pydoc_text() tokenized by `encode` (seconds: kept for the next call with the same one)."""
    return tuple(encode(pydoc_text()))


def evaluation_ids(encode: Callable[[str], list[int]], tokens: int = EVAL_TOKENS) -> list[int]:
    """The first `tokens` tokens of pydoc_text() (encode: text -> ids without special tokens)."""
    ids = pydoc_ids(encode)
    if len(ids) < tokens:
        raise ValueError(f"pydoc_data.topics has {len(ids):,} tokens, fewer than {tokens:,}")
    return list(ids[:tokens])


def calibration_ids(
    encode: Callable[[str], list[int]], tokens: int = CALIB_TOKENS, skip: int = EVAL_TOKENS
) -> list[int]:
    """The default calibration text: tokens skip .. skip + tokens of pydoc_text() (encode: text
    -> ids without special tokens). skip = the evaluation's length keeps them disjoint."""
    ids = pydoc_ids(encode)
    if len(ids) < skip + tokens:
        raise ValueError(
            f"pydoc_data.topics has {len(ids):,} tokens, fewer than {skip:,} + {tokens:,}"
        )
    return list(ids[skip : skip + tokens])


def projection_names(model: LlamaModel) -> list[str]:
    """Every decoder projection's name, layer by layer in PROJECTIONS' order."""
    return [f"layers.{i}.{p}" for i in range(len(model.weights.layers)) for p in PROJECTIONS]


# ------------------------------------------------------------------------------ forward passes


def _window(model: LlamaModel, ids: Sequence[int]) -> tuple[ForwardBatch, torch.Tensor]:
    """One packed prefill of `ids` that samples every position, and its empty KV cache (FP8
    where the model has kv_scales, as the engine's --kv-cache-dtype fp8 gives it, else in the
    model's dtype)."""
    kv_dtype = model.dtype if model.kv_scales is None else FP8_DTYPE
    batch, cache = alone_in_cache(model.config, list(ids), BLOCK_SIZE, kv_dtype, model.device)
    return dataclasses.replace(batch, sample_indices=batch.positions), cache


def window_logits(model: LlamaModel, ids: Sequence[int]) -> torch.Tensor:
    """Logits [len(ids), V] in float32, row t the model's prediction of the token after ids[t]:
    one packed prefill of `ids` from an empty KV cache (`_window`)."""
    return model.forward(*_window(model, ids)).float()


def _windows(ids: Sequence[int], window: int) -> Iterator[Sequence[int]]:
    """ids cut into consecutive windows of `window` tokens (the last may be shorter); a last
    window of one token predicts nothing inside itself and is left out."""
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) > 1:
            yield chunk


def score(model: LlamaModel, ids: Sequence[int], window: int) -> torch.Tensor:
    """NLL (nats, float32) of every next-token prediction inside each window, in order: window - 1
    a window, each window run from an empty KV cache."""
    nll = []
    for chunk in _windows(ids, window):
        logits = window_logits(model, chunk)[:-1]
        target = torch.tensor(list(chunk[1:]), dtype=torch.int64, device=logits.device)
        nll.append(F.cross_entropy(logits, target, reduction="none"))
    return torch.cat(nll)


def perplexity(model: LlamaModel, ids: Sequence[int], window: int) -> float:
    """exp(mean NLL) over `score`'s predictions."""
    return math.exp(float(score(model, ids, window).double().mean()))


@dataclass
class Calibrated:
    """A calibration window run unquantized: its batch and cache, the residual stream entering
    each layer, and the reference next-token log-probabilities."""

    batch: ForwardBatch
    cache: torch.Tensor
    inputs: list[torch.Tensor]  # [T, H] the stream entering layer l, l = 0..L-1
    reference: torch.Tensor  # [T, V] float32

    @classmethod
    @torch.inference_mode()
    def run(cls, model: LlamaModel, ids: Sequence[int]) -> Calibrated:
        batch, cache = _window(model, ids)
        inputs: list[torch.Tensor] = []
        h = F.embedding(batch.input_ids, model.weights.embed)
        h = model.run_layers(h, batch, cache, on_input=lambda _, h: inputs.append(h.clone()))
        reference = torch.log_softmax(model.head(h, batch).float(), -1)
        return cls(batch, cache, inputs, reference)

    @torch.inference_mode()
    def kl_from(self, model: LlamaModel, layer: int) -> float:
        """The summed KL(reference || model) over the window's positions, for a model equal to
        the reference one in every layer before `layer` (run from the stream entering it)."""
        h = model.run_layers(self.inputs[layer].clone(), self.batch, self.cache, start=layer)
        out = torch.log_softmax(model.head(h, self.batch).float(), -1)
        return float((self.reference.exp() * (self.reference - out)).sum(-1).double().sum())


# ---------------------------------------------------------------------------- swapping weights


def _parse(name: str) -> tuple[int, str]:
    """("layers.{i}.{projection}") -> (i, projection), checked."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or (
        parts[2] not in PROJECTIONS
    ):  # fmt: skip
        raise ValueError(
            f"bad projection name {name!r}: expected layers.<i>.<{'|'.join(PROJECTIONS)}>"
        )
    return int(parts[1]), parts[2]


def _fields(projection: str) -> tuple[str, ...]:
    """The LayerWeights fields that make one projection: its weight and, if it reads a norm,
    the gain kept apart from it (None where folded into the weight)."""
    gain = _GAINS.get(projection)
    return (projection,) if gain is None else (projection, gain)


@contextmanager
def swapped(target: LlamaModel, source: LlamaModel, names: Sequence[str]) -> Iterator[None]:
    """`target` with the named projections (weight and norm gain together) taken from `source`
    (the same model loaded another way) until exit, then its own back."""
    saved: list[tuple[LayerWeights, str, object]] = []
    try:
        for name in names:
            index, projection = _parse(name)
            to, frm = target.weights.layers[index], source.weights.layers[index]
            for field in _fields(projection):
                saved.append((to, field, getattr(to, field)))
                setattr(to, field, getattr(frm, field))
        yield
    finally:
        for layer, field, value in reversed(saved):
            setattr(layer, field, value)


# ------------------------------------------------------------------------------------- ranking


def rank_projections(
    unquantized: LlamaModel, quantized: LlamaModel, calib_ids: Sequence[int], window: int = 1024,
    on_each: Callable[[Sensitivity], None] | None = None,
) -> list[Sensitivity]:  # fmt: skip
    """Every projection's sensitivity, most sensitive first: each of `quantized`'s projections
    (the same model loaded with a quantization scheme) swapped alone into `unquantized`, the
    calibration text run, the KL against `unquantized` itself measured, the projection swapped
    back. on_each(s) runs as each projection's is measured (progress). A projection of layer l
    changes nothing before l: its run starts from the unquantized stream entering l, kept from
    the reference run (about half the layers a projection, on average).

    Every window must be longer than linear.MAX_M tokens: shorter runs compute FP8 projections
    weight-only (the decode rule), not W8A8 as the prefills the ranking stands for."""
    short = [len(c) for c in _windows(calib_ids, window) if len(c) <= MAX_M]
    if short or not calib_ids:
        raise ValueError(
            f"calibration windows must be longer than {MAX_M} tokens (FP8 runs W8A8 above "
            f"that); {len(calib_ids)} tokens in windows of {window} give {short or [0]}"
        )
    windows = [Calibrated.run(unquantized, c) for c in _windows(calib_ids, window)]
    positions = sum(w.reference.shape[0] for w in windows)
    ranking = []
    for name in projection_names(unquantized):
        layer = _parse(name)[0]
        with swapped(unquantized, quantized, [name]):
            kl = sum(w.kl_from(unquantized, layer) for w in windows) / positions
        ranking.append(Sensitivity(name, kl))
        if on_each is not None:
            on_each(ranking[-1])
    return sorted(ranking, key=lambda s: (-s.kl, s.name))


def keep_most_sensitive(ranking: list[Sensitivity], n: int) -> frozenset[str]:
    """The names of the n most sensitive projections of a ranking (rank_projections' order):
    the plan's `keep` (loader.load_model)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return frozenset(s.name for s in ranking[:n])


def random_choice(names: Sequence[str], n: int, seed: int) -> frozenset[str]:
    """n of `names` drawn uniformly without replacement by a seeded generator: the baseline a
    sensitivity plan of the same size must beat."""
    return frozenset(random.Random(seed).sample(list(names), n))
