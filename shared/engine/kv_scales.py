"""Per-head scales of an FP8 KV cache, calibrated once when the engine starts.

An FP8 cache (--kv-cache-dtype fp8) holds each K or V value as an E4M3 code times a float32
scale of its layer, K or V, and head (kernels/quant.py: code = value / scale, clamped to
+-448). The scales are static, known before the first token is written, so a block means the
same to every process that reads it: the prefill worker that writes it, the decode worker it is
handed to.

Calibration runs one prompt through the model with a cache in the model's own dtype and takes,
per layer, K or V, and head, the largest |value| written (K after RoPE, as the cache holds it);
the scale is the power of two at or above amax * HEADROOM / 448:
- E4M3 keeps 3 mantissa bits from 2^-6 up to 448, so amax placed 2-4x below 448 costs one or
  two of its 16 binades and leaves room for tokens beyond the calibration's;
- a power of two makes code * scale exact and makes two processes that measured amax a rounding
  apart pick the same scale (unless amax sits on a power of two); the scales' digest is part of
  the KV layout a prefill compares with the decode worker's before a handoff (worker.proto
  KVLayout), so scales that still differ refuse the handoff instead of misreading the blocks.

The prompt: CALIBRATION_TEXT through the model's tokenizer, or for a model without one (the
synthetic shapes) CALIBRATION_TOKENS ids drawn from a fixed seed.
"""

from __future__ import annotations

import hashlib

import torch

from kvmesh.kernels.quant import FP8_MAX
from kvmesh.shared.engine.batch import alone_in_cache
from kvmesh.shared.engine.tokenizer import Tokenizer
from kvmesh.shared.model.llama import LlamaModel

HEADROOM = 2.0  # amax lands in [448 / 4, 448 / 2]
CALIBRATION_TOKENS = 256
# Written for this purpose: plain prose, a list, code and numbers, as requests carry them.
CALIBRATION_TEXT = """\
The harbour town wakes before the sun. Fishing boats slip out past the breakwater while the \
bakery on the corner pulls its first trays of bread from the oven, and the smell drifts down to \
the quay where gulls argue over scraps.
Things to pack for the trip: a rain jacket, two pairs of socks, the charger for the camera, a \
paperback for the train, and the tickets (platform 4, departing 07:52).
def mean(values):
    total = sum(values)
    return total / len(values) if values else 0.0
In 1969, 600 million people watched the first landing on the Moon; the descent stage's engine \
burned for about 12 minutes, and the crew had roughly 25 seconds of fuel left when they touched \
down. Q: What is 17 times 23? A: 391. Translate "good morning" into French: bonjour.
"""


@torch.inference_mode()
def calibrate_kv_scales(
    model: LlamaModel, ids: list[int], block_size: int
) -> torch.Tensor:  # fmt: skip
    """float32 scales [L, 2, kv_heads] on the model's device for an FP8 cache, from one prefill
    of `ids` through a cache in the model's dtype (model.kv_scales must be None meanwhile)."""
    assert model.kv_scales is None, "calibration writes the cache in the model's own dtype"
    batch, cache = alone_in_cache(model.config, ids, block_size, model.dtype, model.device)
    model.forward(batch, cache)
    written = cache.flatten(2, 3)[:, :, : len(ids)]  # [L, 2, n, kv_heads, head_dim]
    amax = written.float().abs().amax(dim=(2, 4))  # [L, 2, kv_heads]
    amax = torch.clamp(amax, min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax * HEADROOM / FP8_MAX)))


def calibration_ids(tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """The calibration prompt's token ids: CALIBRATION_TEXT encoded, or CALIBRATION_TOKENS ids
    from a fixed seed where the model has no tokenizer."""
    if tokenizer is not None:
        return tokenizer.encode(CALIBRATION_TEXT)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(vocab_size, (CALIBRATION_TOKENS,), generator=gen).tolist()


def scales_digest(scales: torch.Tensor | None) -> str:
    """A short digest of the scales (\"\" for none): equal caches have equal digests."""
    if scales is None:
        return ""
    data = scales.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
