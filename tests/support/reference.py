"""Hugging Face transformers as the correctness reference, shared by several tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from kvmesh.shared.model.fetch import default_model_path


@cache
def hf_model():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@dataclass
class Greedy:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each step


def hf_greedy(prompt: list[int], max_new_tokens: int) -> Greedy:
    """HF `generate`, one prompt at a time, greedy, with the logit margin of every step."""
    out = hf_model().generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=2,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    margins = []
    for logits in out.logits:
        top2 = logits[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return Greedy(tokens, margins)


def first_divergence(ours: list[int], ref: Greedy) -> int | None:
    """Index of the first differing token, or None when ours matches the reference."""
    for i, (a, b) in enumerate(zip(ours, ref.tokens, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(ref.tokens) else min(len(ours), len(ref.tokens))


def long_text(words: int) -> str:
    base = (
        "The history of computing is a story of people building machines that think in steps. "
        "Early engineers wired logic by hand, later ones wrote compilers, and today we serve "
        "language models across many accelerators connected by fast networks. "
    )
    out = []
    while len(out) < words:
        out.extend(base.split())
    return " ".join(out[:words])
