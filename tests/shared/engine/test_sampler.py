"""Seeded sampling is reproducible whatever shares the batch; masks behave as specified."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig, RequestError
from kvmesh.shared.engine.sampler import SamplingBatch, sample, uniform_noise
from kvmesh.shared.engine.sequence import SamplingParams


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(max_num_batched_tokens=256, max_num_seqs=32))


def _run(
    engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return out


def test_seeded_request_is_the_same_alone_and_in_a_batch_of_16(engine: Engine) -> None:
    tok = engine.tokenizer
    assert tok is not None
    target = (
        tok.encode("Once upon a time, in a small village,"),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234),
    )
    alone = _run(engine, {"target": target})["target"]
    others: dict[str, tuple[list[int], SamplingParams]] = {}
    for i in range(16):
        prompt = tok.encode(f"Story {i}: the dragon " + "and the knight " * (i % 5))
        seed = None if i % 2 else 1000 + i
        params = SamplingParams(max_tokens=8 + i, temperature=0.3 + 0.1 * (i % 8), seed=seed)
        others[f"o{i}"] = (prompt, params)
    batched = _run(engine, {**others, "target": target})["target"]
    assert alone == batched
    assert len(set(alone)) > 3  # it really sampled, not a degenerate repetition


def test_different_seeds_differ_and_greedy_ignores_noise(engine: Engine) -> None:
    tok = engine.tokenizer
    assert tok is not None
    prompt = tok.encode("List some animals:")
    runs = _run(
        engine,
        {
            "a": (prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=1)),
            "b": (prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=2)),
            "g1": (prompt, SamplingParams(max_tokens=16, seed=7)),
            "g2": (prompt, SamplingParams(max_tokens=16, seed=8)),
        },
    )
    assert runs["a"] != runs["b"]
    assert runs["g1"] == runs["g2"]


def _batch(n: int, temperature: float, top_p: float = 1.0, top_k: int = 0) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((n,), temperature),
        top_p=torch.full((n,), top_p),
        top_k=torch.full((n,), top_k, dtype=torch.int64),
        seeds=torch.arange(n, dtype=torch.int64) * 7919,
        steps=torch.zeros(n, dtype=torch.int64),
        all_greedy=temperature == 0,
        any_top_p_or_k=top_p < 1 or top_k > 0,
    )


def test_top_k_and_top_p_keep_only_allowed_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 100).repeat(4000, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    picked = sample(logits, _batch(4000, 1.0, top_k=5))
    assert set(picked.tolist()) == top5  # all five are reachable, nothing else is
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    allowed = set(order[:nucleus].tolist())
    picked = sample(logits, _batch(4000, 1.0, top_p=0.5))
    assert set(picked.tolist()) == allowed


def test_sampling_follows_the_softmax_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)
    picked = sample(logits, _batch(20000, 1.0))
    freq = torch.bincount(picked, minlength=3).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.015)


def test_noise_is_uniform_and_depends_on_seed_and_step() -> None:
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50000)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_a_resumed_seeded_request_goes_on_with_the_same_tokens_and_text(engine: Engine) -> None:
    """The gateway's failover resumes a request on another worker: prompt + the tokens already
    sent, output_offset of them. Its seeded random stream goes on where it was (the noise of
    output token i is a function of the seed and i), so it samples what the request would
    have, and its text continues the text sent."""
    tok = engine.tokenizer
    assert tok is not None
    prompt = tok.encode("Once upon a time, in a small village,")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=77)
    whole: list[int] = []
    texts: list[str] = []
    engine.add_request("whole", prompt, params)
    while engine.has_work:
        for o in engine.step():
            whole += o.new_token_ids
            texts.append(o.text)
    assert len(whole) == 20 and len(set(whole)) > 3
    cut = 7
    sent = "".join(texts[:cut])  # one token an output here
    resumed = SamplingParams(max_tokens=20 - cut, temperature=0.9, top_k=40, seed=77,
                             output_offset=cut, text_offset=len(sent))  # fmt: skip
    rest: list[int] = []
    engine.add_request("resumed", prompt + whole[:cut], resumed)
    while engine.has_work:
        for o in engine.step():
            rest += o.new_token_ids
            sent += o.text
    assert rest == whole[cut:]
    assert sent == "".join(texts) == tok.decode(whole)
    with pytest.raises(RequestError, match="output_offset 9 must be less"):
        engine.validate(prompt[:9], dataclasses.replace(resumed, output_offset=9))
