"""Accuracy of kvmesh's quantization on the default model (issue 27), on CPU.

    python benchmarks/quant_accuracy.py [--tokens 24576] [--window 2048] [--keep 12]
                                        [--random-draws 3] [--calib-tokens 1024]

The vehicle is kvmesh's own model, the code that serves: LlamaModel with the torch reference ops
(REFERENCE_OPS, which compute the GPU kernels' quantization grids: kernels/quant.py) in float32
on CPU, on the default model's GGUF (SmolLM2-135M-Instruct; its Q4_1 weights dequantized to
float32: "unquantized" means those float32 weights). Schemes quantize the decoder layers'
projections at load (loader.load_model(quantization=, keep=)); lm_head and the embeddings stay
float32. FP8 is W8A8 (per-token FP8 activations) for prefills of more than 64 rows, every
window here, and weight-only for the decode steps of the agreement test; INT8 is weight-only.

Perplexity: pydoc_data.topics' text (kvmesh.shared.model.sensitivity: pydoc_text), its first
--tokens tokens in windows of --window, each one packed prefill from an empty KV cache; exp(mean
NLL) of the predictions inside each window. The sensitivity plan keeps in float32 the --keep
projections (of 120) whose FP8 quantization alone moves the next-token distribution most (mean
KL) on the --calib-tokens tokens after the evaluation's (disjoint); the random rows keep as
many projections drawn by seeded generators (seeds 0 ..).

FP8 KV cache: the unquantized model writing and reading an E4M3 cache under the per-head scales
the engine calibrates when it starts (shared/engine/kv_scales.py).

Greedy agreement: 8 prompts (completion and chat) through shared/engine's Engine with
EngineConfig(quantization=...) or (kv_cache_dtype="fp8"), 32 new tokens each (EOS ignored),
compared token by token with the unquantized engine's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch
from common import header, table

from kvmesh.shared.engine import kv_scales
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.engine.tokenizer import Tokenizer, load_tokenizer
from kvmesh.shared.model import sensitivity
from kvmesh.shared.model.llama import LlamaModel
from kvmesh.shared.model.loader import LoadedModel, load_model
from kvmesh.shared.model.ops import REFERENCE_OPS

CPU = torch.device("cpu")
# Measured outside the project (HF model, every linear but lm_head quantized the plain way,
# the first 24,576 tokens of pydoc_data.topics), from issue 27.
EXTERNAL = {"none": 11.13, "fp8": 11.47, "int8": 11.15}
NEW_TOKENS = 32
COMPLETIONS = (
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "In 1969, the Apollo 11 mission",
    "Photosynthesis is the process by which",
)
CHATS = (
    "What is the difference between a list and a tuple in Python?",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is to a ten-year-old.",
)


def llama(loaded: LoadedModel) -> LlamaModel:
    return LlamaModel(loaded.config, loaded.weights, REFERENCE_OPS)


def timed(label: str, fn: Callable[[], float]) -> float:
    t = time.perf_counter()
    value = fn()
    print(f"  {label}: {value:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return value


def prompts(tok: Tokenizer) -> list[list[int]]:
    chats = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    return [tok.encode(p) for p in COMPLETIONS] + chats


def greedy(engine: Engine, batch: list[list[int]]) -> list[list[int]]:
    """Each prompt's NEW_TOKENS greedy tokens, all the prompts served together."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(batch):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(batch))}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(batch))]


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[str, str, str]:
    """(identical tokens up to the first divergence, identical tokens by position, prompts
    identical throughout), each over all the prompts' tokens."""
    total = sum(len(r) for r in ref)
    prefix = same = whole = 0
    for r, g in zip(ref, got, strict=True):
        diverge = next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), len(r))
        prefix += diverge
        same += sum(a == b for a, b in zip(r, g, strict=True))
        whole += diverge == len(r)
    return f"{prefix / total:.1%}", f"{same / total:.1%}", f"{whole}/{len(ref)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=sensitivity.EVAL_TOKENS)
    parser.add_argument("--window", type=int, default=2_048)
    parser.add_argument("--calib-tokens", type=int, default=sensitivity.CALIB_TOKENS)
    parser.add_argument("--keep", type=int, default=12)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    print(header("Quantization accuracy (CPU, kvmesh's model, reference ops, float32)"))
    unq = load_model("", torch.float32, CPU)
    assert unq.tokenizer_source is not None
    tok = load_tokenizer(unq.tokenizer_source)
    models = {"none": llama(unq)}
    for scheme in ("fp8", "int8"):
        models[scheme] = llama(load_model("", torch.float32, CPU, quantization=scheme))
    evaluation = sensitivity.evaluation_ids(tok.encode, args.tokens)
    calib = sensitivity.calibration_ids(tok.encode, args.calib_tokens, args.tokens)
    names = sensitivity.projection_names(models["none"])
    print(f"python {sys.version.split()[0]}: {unq.config.name}; pydoc_data.topics, the first "
          f"{args.tokens:,} tokens in windows of {args.window:,}; calibration: the "
          f"{args.calib_tokens:,} tokens after them; {len(names)} projections, lm_head and "
          f"embeddings kept in float32")  # fmt: skip

    fp8, none = models["fp8"], models["none"]

    def fp8_keeping(label: str, keep: frozenset[str]) -> float:
        """Perplexity of the FP8 model with the `keep` projections unquantized."""
        with sensitivity.swapped(fp8, none, sorted(keep)):
            return timed(label, lambda: sensitivity.perplexity(fp8, evaluation, args.window))

    t = time.perf_counter()
    ranking = sensitivity.rank_projections(
        none, fp8, calib, on_each=lambda s: print(f"  {s.name}: KL {s.kl:.5f}", flush=True)
    )
    rank_s = time.perf_counter() - t
    plan = sensitivity.keep_most_sensitive(ranking, args.keep)
    print(f"\nFP8 sensitivity ranking, one projection at a time, {len(calib):,} calibration "
          f"tokens, {rank_s:.0f} s; the plan keeps the first {args.keep}:")  # fmt: skip
    print(table([(str(i + 1), s.name, f"{s.kl:.5f}") for i, s in enumerate(ranking[: args.top])],
                ("rank", "projection", "mean KL (nats)")))  # fmt: skip
    print(f"plan: {', '.join(sorted(plan))}\n", flush=True)

    ppl = {}
    for scheme, model in models.items():
        ppl[scheme] = timed(scheme, functools.partial(sensitivity.perplexity, model, evaluation,
                                                      args.window))  # fmt: skip
    # FP8 KV cache: the unquantized model with the scales the engine calibrates at start
    kv_ids = kv_scales.calibration_ids(tok, unq.config.vocab_size)
    none.kv_scales = kv_scales.calibrate_kv_scales(none, kv_ids, sensitivity.BLOCK_SIZE)
    ppl["kv"] = timed("fp8 kv", lambda: sensitivity.perplexity(none, evaluation, args.window))
    none.kv_scales = None
    ppl["plan"] = fp8_keeping("plan", plan)
    draws = [fp8_keeping(f"random seed {seed}", sensitivity.random_choice(names, args.keep, seed))
             for seed in range(args.random_draws)]  # fmt: skip

    base = ppl["none"]

    def rel(value: float) -> str:
        return f"{(value / base - 1) * 100:+.2f}%"

    def ext(scheme: str) -> tuple[str, str]:
        value = EXTERNAL[scheme]
        return f"{value:.2f}", "" if scheme == "none" else f"{(value / 11.13 - 1) * 100:+.2f}%"

    def met(ok: bool) -> str:
        return "yes" if ok else "NO"

    random_mean = statistics.fmean(draws) if draws else float("nan")
    rows: list[tuple[str, ...]] = [
        ("unquantized (fp32)", f"{base:.3f}", "", *ext("none"), "", ""),
        ("FP8 W8A8, uniform", f"{ppl['fp8']:.3f}", rel(ppl["fp8"]), *ext("fp8"), "<= +3.5%",
         met(ppl["fp8"] <= base * 1.035)),
        ("INT8 weight-only, uniform", f"{ppl['int8']:.3f}", rel(ppl["int8"]), *ext("int8"),
         "within 0.5%", met(abs(ppl["int8"] / base - 1) <= 0.005)),
        (f"FP8, sensitivity plan ({args.keep} of {len(names)} kept)", f"{ppl['plan']:.3f}",
         rel(ppl["plan"]), "", "", "within 1.5%, < random",
         met(ppl["plan"] <= base * 1.015 and ppl["plan"] < min(draws, default=float("inf")))),
    ]  # fmt: skip
    for seed, value in enumerate(draws):
        rows.append((f"FP8, {args.keep} random kept (seed {seed})", f"{value:.3f}", rel(value),
                     "", "", "", ""))  # fmt: skip
    if len(draws) > 1:
        rows.append((f"FP8, {args.keep} random kept (mean of {len(draws)})",
                     f"{random_mean:.3f}", rel(random_mean), "", "", "", ""))  # fmt: skip
    rows.append(("FP8 KV cache, unquantized weights", f"{ppl['kv']:.3f}", rel(ppl["kv"]), "",
                 "", "within 1%", met(abs(ppl["kv"] / base - 1) <= 0.01)))  # fmt: skip
    print()
    print(table(rows, ("scheme", "ppl", "vs unquantized", "external ppl", "external vs unq",
                       "target", "met")))  # fmt: skip

    # Greedy agreement, through the engine that serves
    batch = prompts(tok)
    engines = {
        "FP8 W8A8, uniform": EngineConfig(quantization="fp8"),
        "INT8 weight-only, uniform": EngineConfig(quantization="int8"),
        "FP8 KV cache, unquantized weights": EngineConfig(kv_cache_dtype="fp8"),
    }
    reference = greedy(Engine(EngineConfig(), unq, tok), batch)
    agree: list[tuple[str, ...]] = []
    for label, config in engines.items():
        agree.append((label, *agreement(reference, greedy(Engine(config, tokenizer=tok), batch))))
    planned = load_model("", torch.float32, CPU, quantization="fp8", keep=plan)
    got = greedy(Engine(EngineConfig(quantization="fp8"), planned, tok), batch)
    agree.append((f"FP8, sensitivity plan ({args.keep} kept)", *agreement(reference, got)))
    print(
        f"\nGreedy agreement with the unquantized engine: {len(batch)} prompts "
        f"({len(COMPLETIONS)} completions, {len(CHATS)} chats), {NEW_TOKENS} new tokens each:"
    )
    print(table(agree, ("scheme", "identical to first divergence", "identical by position",
                       "prompts identical")))  # fmt: skip


if __name__ == "__main__":
    main()
