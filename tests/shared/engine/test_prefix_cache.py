"""Prefix caching: the block pool's cache by exact block ids, a randomized soak with sharing,
eviction, aborts and preemption under the integrity check, and the real model's greedy tokens
with caching on and off (chats sharing a long system prompt, multi-turn conversations, a prefix
evicted between two requests)."""

from __future__ import annotations

import random

import pytest
import torch
from reference import long_text

from kvmesh.shared.engine.engine import Engine, EngineConfig, RequestOutput
from kvmesh.shared.engine.kv_cache import BlockPool
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.engine.tokenizer import Tokenizer, load_tokenizer
from kvmesh.shared.model.loader import LoadedModel, load_model

GREEDY = SamplingParams(max_tokens=12)


def test_pool_caches_shares_and_evicts_least_recently_freed_blocks() -> None:
    pool = BlockPool(5)
    a, b = pool.allocate(3), pool.allocate(2)
    assert (a, b) == ([0, 1, 2], [3, 4])
    pool.cache(a, [10, 11, 12])
    pool.cache([3], [10])  # a hash held already stays with its block
    assert pool.match([10, 11, 12, 13]) == [0, 1, 2] and pool.num_cached == 3
    pool.free(b)
    pool.free(a)  # cached: to the back, tail first; uncached 3, 4 to the front
    assert list(pool._free) == [3, 4, 2, 1, 0]
    assert pool.match([10, 11]) == [0, 1]
    pool.take([0, 1])  # a new sequence shares the cached prefix: off the free list
    pool.take([0])  # and a second one
    assert list(pool._free) == [3, 4, 2] and pool.num_free_in([0, 1, 2]) == 1
    pool.check_integrity(owners=[[0, 1], [0]])
    assert pool.allocate(3) == [3, 4, 2] and pool.num_evicted == 1  # 2 held hash 12
    assert pool.match([10, 11, 12]) == [0, 1] and pool.num_cached == 2
    pool.free([2, 3, 4])
    pool.free([0, 1])
    pool.free([0])
    pool.check_integrity(owners=[])


def test_a_block_freed_while_a_step_runs_is_matched_only_once_it_completed() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.cache(blocks, [7])
    pool.epoch = 1  # a step is running
    pool.free(blocks)
    assert pool.match([7]) == []  # in limbo: neither shareable nor allocatable yet
    pool.release(1)
    assert pool.match([7]) == blocks
    pool.check_integrity(owners=[])


def test_randomized_sharing_eviction_aborts_and_preemption_keep_the_pool_consistent() -> None:
    """Prompts drawn from a few shared prefixes on a pool too small for all of them: sequences
    share blocks, freed cached blocks are evicted and reused, sequences are preempted and
    aborted, and after every step each block's reference count equals the tables holding it.
    Greedy outputs equal those of the same engine without prefix caching."""
    base = dict(model="synthetic:tiny", block_size=4, num_blocks=48, max_num_batched_tokens=32,
                max_num_seqs=8, max_model_len=120)  # fmt: skip
    rng = random.Random(3)
    prefixes = [[rng.randrange(3, 500) for _ in range(rng.randint(8, 40))] for _ in range(6)]
    requests = []
    for i in range(80):
        tail = [rng.randrange(3, 500) for _ in range(rng.randint(0, 12))]
        prompt = rng.choice(prefixes) + tail
        temperature = 0.0 if i % 4 else 1.0
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=temperature, seed=i,
                                ignore_eos=True)  # fmt: skip
        requests.append((prompt, params))
    aborts = {i for i in range(80) if rng.random() < 0.1}
    outputs = {}
    for caching in (True, False):
        engine = Engine(EngineConfig(**base, prefix_caching=caching))  # type: ignore[arg-type]
        outputs[caching], preemptions = _soak(engine, requests, aborts)
        if caching:
            assert engine.scheduler.num_cached_tokens > 0
            assert engine.pool.num_evicted > 0
            assert preemptions > 0, "the pool was meant to be too small to avoid preemption"
            assert engine.pool.num_cached > 0  # freed cached blocks stay cached
    assert outputs[True] == outputs[False]


def _soak(
    engine: Engine, requests: list[tuple[list[int], SamplingParams]], aborts: set[int]
) -> tuple[dict[str, list[int]], int]:
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(requests))}
    pending = list(enumerate(requests))
    preemptions = steps = 0
    while pending or engine.has_work:
        if pending and steps % 2 == 0:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            if i - 3 in aborts:  # a request added a few steps ago: often running, sharing
                engine.abort(str(i - 3))
                outputs.pop(str(i - 3))
        preemptions += sum(s.num_preemptions for s in engine.scheduler.waiting)
        for out in engine.step():
            if out.request_id in outputs:
                outputs[out.request_id] += out.new_token_ids
        engine.check_integrity()
        steps += 1
    assert engine.pool.num_free == engine.pool.num_blocks
    return outputs, preemptions


# ------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def model() -> tuple[LoadedModel, Tokenizer]:
    config = EngineConfig()
    loaded = load_model(config.model, torch.float32, torch.device("cpu"), fetch=config.fetch)
    assert loaded.tokenizer_source is not None
    return loaded, load_tokenizer(loaded.tokenizer_source, config.fetch.cache)


@pytest.fixture(scope="module")
def engines(model: tuple[LoadedModel, Tokenizer]) -> dict[bool, Engine]:
    """Caching on and off over the same weights."""
    loaded, tok = model
    return {
        on: Engine(EngineConfig(prefix_caching=on, kv_cache_bytes=128 << 20), loaded, tok)
        for on in (True, False)
    }


def _run(engine: Engine, prompts: list[list[int]], stagger: int = 0) -> list[RequestOutput]:
    """Each prompt's tokens (a new one every `stagger` steps, all at once if 0): per prompt,
    its last output with every token in new_token_ids."""
    final: dict[int, RequestOutput] = {}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_work:
        while pending and (stagger == 0 or steps % stagger == 0):
            i, prompt = pending.pop(0)
            engine.add_request(f"p{i}", prompt, GREEDY)
            if stagger:
                break
        for out in engine.step():
            i = int(out.request_id[1:])
            tokens[i] += out.new_token_ids
            if out.finished:
                out.new_token_ids = tokens[i]
                final[i] = out
        engine.check_integrity()
        steps += 1
    return [final[i] for i in range(len(prompts))]


def test_chats_sharing_a_long_system_prompt(engines: dict[bool, Engine]) -> None:
    tok = engines[True].tokenizer
    assert tok is not None
    system = "You are a careful assistant. " + long_text(260)
    questions = ["What is 2+2?", "Name three colors.", "Who wrote Hamlet?", "Say hi."]
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": q}]
        )
        for q in questions
    ]
    shared = _common_prefix(prompts)
    assert shared > 300, shared
    on, off = _run(engines[True], prompts, stagger=4), _run(engines[False], prompts, stagger=4)
    assert [o.new_token_ids for o in on] == [o.new_token_ids for o in off]
    assert off[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 0 for o in off)
    bs = engines[True].config.block_size
    # the first computes the system prompt; each later one finds its full blocks cached
    assert [o.num_cached_tokens for o in on[1:]] == [shared // bs * bs] * 3


def test_multi_turn_conversations_reuse_the_previous_turns(engines: dict[bool, Engine]) -> None:
    tok = engines[True].tokenizer
    assert tok is not None
    bs = engines[True].config.block_size
    turns = [
        ["Tell me about the moon. " + long_text(80), "And the sun?", "Which is larger?"],
        ["Write a haiku about rain.", "Now one about snow.", "Which do you prefer?"],
    ]
    chats: list[list[dict[str, str]]] = [[] for _ in turns]
    previous: list[list[int]] = [[] for _ in turns]  # the last turn's prompt and answer
    for t in range(3):
        for chat, conversation in zip(chats, turns, strict=True):
            chat.append({"role": "user", "content": conversation[t]})
        prompts = [tok.apply_chat_template(chat) for chat in chats]
        on, off = _run(engines[True], prompts), _run(engines[False], prompts)
        assert [o.new_token_ids for o in on] == [o.new_token_ids for o in off], t
        for prompt, before, out in zip(prompts, previous, on, strict=True):
            # a turn holds the previous turns' tokens: every full block of them is reused
            # where the answer's text encodes to the tokens generated
            # (the last answer token was sampled, never computed)
            reused = min(_common_prefix([prompt, before]), len(before) - 1, len(prompt) - 1)
            assert out.num_cached_tokens == max(reused, 0) // bs * bs, (t, reused)
            assert (out.num_cached_tokens > 0) == (t > 0)
        for chat, out in zip(chats, on, strict=True):
            chat.append({"role": "assistant", "content": tok.decode(out.new_token_ids)})
        previous = [p + o.new_token_ids for p, o in zip(prompts, on, strict=True)]


def test_a_prefix_evicted_between_two_requests_is_computed_again(
    model: tuple[LoadedModel, Tokenizer],
) -> None:
    """A small pool: another prompt evicts the end of the first prompt's cached blocks, the same
    prompt again finds only their start; one that takes every block evicts them all. The tokens
    stay the same."""
    loaded, tok = model
    engine = Engine(EngineConfig(num_blocks=40, max_num_batched_tokens=256), loaded, tok)
    pool, bs = engine.pool, engine.config.block_size
    prompt = tok.encode(long_text(200))
    filler = tok.encode("A different text about the sea. " + long_text(600))
    (first,) = _run(engine, [prompt])
    (hit,) = _run(engine, [prompt])
    assert hit.num_cached_tokens == (len(prompt) - 1) // bs * bs
    uncached = pool.num_free - pool.num_cached
    # the uncached free blocks and 4 cached ones, the least recently freed: the prompt's end
    _run(engine, [filler[: (uncached + 4) * bs - GREEDY.max_tokens]])
    assert pool.num_evicted == 4
    (partial,) = _run(engine, [prompt])
    assert 0 < partial.num_cached_tokens < hit.num_cached_tokens
    _run(engine, [filler[: pool.num_blocks * bs - GREEDY.max_tokens]])  # takes every block
    (miss,) = _run(engine, [prompt])
    assert miss.num_cached_tokens == 0
    assert first.new_token_ids == hit.new_token_ids == partial.new_token_ids == miss.new_token_ids
    assert pool.num_free == pool.num_blocks


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(n < len(s) for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n
