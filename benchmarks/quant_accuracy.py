"""Perplexity of the default model under the reference FP8 and INT8 grids (issue 27), on CPU.

    python benchmarks/quant_accuracy.py [--tokens 24576] [--window 2048] [--sensitivity]

The vehicle is Hugging Face transformers' Llama on the default model's GGUF (SmolLM2-135M-
Instruct, its Q4_1 weights dequantized to float32: "unquantized" means those float32 weights),
with every nn.Linear of the decoder layers swapped for kvmesh.kernels.quant's reference
forward; lm_head (tied to the embeddings) and the norms stay float32. Activations are float32.

Evaluation text: the values of `pydoc_data.topics.topics` (the standard library's docs text)
in sorted key order, joined by "\\n\\n", tokenized by the GGUF's tokenizer without special
tokens; the first --tokens tokens, cut into non-overlapping --window-token windows, each run
from an empty cache. Perplexity = exp(mean NLL) over every next-token prediction inside a
window (window - 1 of them a window; the first token of a window is context only).

--sensitivity quantizes one linear at a time to FP8 W8A8 and ranks the linears by the mean KL
divergence KL(unquantized || quantized) of the next-token distributions over a calibration
text disjoint from the evaluation tokens: the --calib-tokens tokens that follow them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from common import header, table
from torch import nn

from kvmesh.kernels import quant
from kvmesh.shared.model.fetch import default_model_path

# Measured outside the project (HF model, every linear but lm_head quantized the plain way,
# the first 24,576 tokens of pydoc_data.topics), from issue 27.
EXTERNAL = {"none": 11.13, "fp8": 11.47, "int8": 11.15}
TARGET = {"none": "", "fp8": "<= +3.5%", "int8": "within 0.5%"}
LABEL = {"none": "unquantized (fp32)", "fp8": "FP8 W8A8", "int8": "INT8 weight-only"}


class QuantLinear(nn.Module):
    """An nn.Linear's forward on a reference grid: 'fp8' (W8A8, dynamic per-token activations)
    or 'int8' (weight-only)."""

    def __init__(self, linear: nn.Linear, scheme: str) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.scheme = scheme
        q = quant.quantize_weight_fp8(w) if scheme == "fp8" else quant.quantize_weight_int8(w)
        # The codes held as float32 (the same values, exactly) spare a cast on every call.
        self.weight = quant.QuantizedWeight(q.codes.float(), q.scale)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "fp8":
            return quant.linear_w8a8_fp8(x, self.weight, self.bias)
        return quant.linear_w8a16_int8(x, self.weight, self.bias)


def decoder_linears(model: nn.Module) -> list[str]:
    """Qualified names of the decoder layers' nn.Linear modules (lm_head excluded)."""
    return [n for n, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, nn.Linear)]  # fmt: skip


@contextmanager
def quantized(model: nn.Module, scheme: str, names: list[str]) -> Iterator[None]:
    """The model with the named linears on `scheme`'s grid ('none': unchanged) until exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if scheme != "none":
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            setattr(parent, child, QuantLinear(original, scheme))
            swapped.append((parent, child, original))
    try:
        yield
    finally:
        for parent, child, original in swapped:
            setattr(parent, child, original)


def load() -> tuple[nn.Module, Callable[[str], list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    kw = {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    return model.eval(), lambda text: tok(text, add_special_tokens=False)["input_ids"]


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window].unsqueeze(0)
        logits = model(chunk).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def sensitivity(model: nn.Module, calib: torch.Tensor, top: int) -> list[tuple[str, float]]:
    """Each decoder linear's mean KL(unquantized || FP8 alone) per calibration position."""
    ref = torch.log_softmax(model(calib.unsqueeze(0)).logits[0].float(), -1)
    scores = []
    for name in decoder_linears(model):
        with quantized(model, "fp8", [name]):
            out = torch.log_softmax(model(calib.unsqueeze(0)).logits[0].float(), -1)
        kl = (ref.exp() * (ref - out)).sum(-1).mean()
        scores.append((name, float(kl)))
    return sorted(scores, key=lambda s: -s[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24_576)
    parser.add_argument("--window", type=int, default=2_048)
    parser.add_argument("--schemes", default="none,fp8,int8")
    parser.add_argument("--sensitivity", action="store_true")
    parser.add_argument("--calib-tokens", type=int, default=1_024)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    print(header("Quantization accuracy (CPU reference)"))
    model, encode = load()
    text = pydoc_text()
    ids = torch.tensor(encode(text))
    assert len(ids) >= args.tokens + args.calib_tokens, len(ids)
    evaluation = ids[: args.tokens]
    names = decoder_linears(model)
    print(f"python {sys.version.split()[0]}: pydoc_data.topics {len(text):,} chars, "
          f"{len(ids):,} tokens; evaluating the first {args.tokens:,} in "
          f"{math.ceil(args.tokens / args.window)} windows of {args.window:,}; "
          f"{len(names)} linears quantized, lm_head kept")  # fmt: skip

    ppl: dict[str, float] = {}
    for scheme in filter(None, args.schemes.split(",")):  # --schemes "": sensitivity only
        t = time.perf_counter()
        with quantized(model, scheme, names):
            ppl[scheme] = perplexity(model, evaluation, args.window)
        print(f"  {scheme}: {ppl[scheme]:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    base = ppl.get("none")
    rows = []
    for scheme, value in ppl.items():
        ext = EXTERNAL[scheme]
        rel = "" if base is None or scheme == "none" else f"{(value / base - 1) * 100:+.2f}%"
        ext_rel = "" if scheme == "none" else f"{(ext / EXTERNAL['none'] - 1) * 100:+.2f}%"
        rows.append((LABEL[scheme], f"{value:.3f}", rel, f"{ext:.2f}", ext_rel, TARGET[scheme]))
    if rows:
        print(table(rows, ("scheme", "ppl", "vs unquantized", "external ppl", "external vs unq",
                           "target")))  # fmt: skip

    if args.sensitivity:
        calib = ids[args.tokens : args.tokens + args.calib_tokens]
        t = time.perf_counter()
        ranked = sensitivity(model, calib, args.top)
        print(f"\nFP8 sensitivity, one linear at a time, {len(calib):,} calibration tokens "
              f"(the ones after the evaluation's), {time.perf_counter() - t:.0f} s:")  # fmt: skip
        print(table([(str(i + 1), n, f"{kl:.5f}") for i, (n, kl) in enumerate(ranked)],
                    ("rank", "linear", "mean KL (nats)")))  # fmt: skip


if __name__ == "__main__":
    main()
