"""Batched sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Randomness is counter-based: the noise for token i of a request is a hash of (seed, i, vocab id),
so a seeded request samples the same tokens whatever else shares its batch, and again after a
preemption recomputes it. Sampling is the Gumbel-max trick over the masked, tempered logits:
argmax(logits / T + Gumbel noise) draws from softmax(logits / T). No host sync is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64 constants, as signed int64 so torch can hold them
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) float64 [B, vocab] from a splitmix64 hash of (seed [B], step [B], vocab id)."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = seeds[:, None] * _GOLDEN + steps[:, None] * _MIX2 + ids[None, :] * _MIX1
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 11).double() + 0.5) * (1.0 / (1 << 53))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, already on the logits' device."""

    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_p: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64, 0 = off
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, index of the token being sampled (output tokens so far)
    all_greedy: bool
    any_top_p_or_k: bool


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Token ids [B] int64 from logits [B, V] fp32."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    if batch.any_top_p_or_k:
        scaled = _mask_top_p_top_k(scaled, batch.top_p, batch.top_k)
    noise = uniform_noise(batch.seeds, batch.steps, logits.shape[-1])
    gumbel = -torch.log(-torch.log(noise))
    sampled = (scaled.double() + gumbel).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy)


def _mask_top_p_top_k(
    logits: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)  # renormalized over the top-k
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
