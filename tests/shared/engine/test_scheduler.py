"""Block pool and scheduler: exact block ids on tiny cases, and a randomized soak with aborts and
preemptions that checks integrity after every step."""

from __future__ import annotations

import random

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig, RequestError
from kvmesh.shared.engine.kv_cache import BlockPool
from kvmesh.shared.engine.scheduler import Scheduler, SchedulerConfig
from kvmesh.shared.engine.sequence import SamplingParams, Sequence


def _seq(rid: str, n: int, arrival: int) -> Sequence:
    return Sequence(rid, list(range(n)), n, SamplingParams(), seed=0, arrival=arrival)


def test_pool_allocates_in_free_list_order_and_counts_references() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert (a, b) == ([0, 1], [2])
    pool.share(b)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 3  # block 2 still has one reference
    pool.check_integrity(owners=[b])
    pool.free(b)
    # blocks without a cached hash go to the front of the free list (nothing there to keep),
    # a table's blocks in their order
    assert pool.allocate(4) == [2, 0, 1, 3]
    with pytest.raises(AssertionError):
        pool.free([3, 3])


def test_prompt_is_chunked_under_the_token_budget() -> None:
    sched = Scheduler(SchedulerConfig(block_size=4, max_num_batched_tokens=6), BlockPool(8))
    long, short = _seq("long", 10, 1), _seq("short", 3, 2)
    sched.add(long)
    sched.add(short)
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [("long", 6)]
    assert long.block_table == [0, 1]
    long.num_computed = 6
    plan = sched.schedule()  # the rest of the long prompt, then the short one fits the budget
    assert [(s.seq.request_id, s.num_new_tokens) for s in plan.scheduled] == [
        ("long", 4),
        ("short", 2),
    ]
    assert long.block_table == [0, 1, 2] and short.block_table == [3]


def test_newest_sequence_is_preempted_when_blocks_run_out() -> None:
    sched = Scheduler(SchedulerConfig(block_size=2, max_num_batched_tokens=64), BlockPool(4))
    old, new = _seq("old", 4, 1), _seq("new", 4, 2)
    sched.add(old)
    sched.add(new)
    sched.schedule()
    old.num_computed = new.num_computed = 4
    old.token_ids.append(9)  # each now needs a third block; only one can have it
    new.token_ids.append(9)
    plan = sched.schedule()
    assert plan.preempted == [new]
    assert [s.seq for s in plan.scheduled] == [old]
    assert new.num_computed == 0 and new.block_table == [] and sched.waiting[0] is new


def test_randomized_requests_aborts_and_preemptions_keep_the_pool_consistent() -> None:
    rng = random.Random(1)
    config = EngineConfig(
        model="synthetic:tiny",
        block_size=4,
        num_blocks=40,
        max_num_batched_tokens=32,
        max_num_seqs=12,
        max_model_len=120,
    )
    engine = Engine(config)
    submitted = finished = aborted = 0
    live: set[str] = set()
    preemptions = 0
    while submitted < 500 or engine.has_work:
        for _ in range(rng.randint(0, 3)):
            if submitted == 500:
                break
            prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 60))]
            params = SamplingParams(
                max_tokens=rng.randint(1, 40),
                temperature=rng.choice([0.0, 1.0]),
                ignore_eos=True,
            )
            engine.add_request(f"r{submitted}", prompt, params)
            live.add(f"r{submitted}")
            submitted += 1
        if live and rng.random() < 0.1:
            victim = rng.choice(sorted(live))
            assert engine.abort(victim)
            live.discard(victim)
            aborted += 1
        preemptions += sum(s.num_preemptions for s in engine.scheduler.waiting)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                finished += 1
        engine.check_integrity()
    assert finished + aborted == 500
    assert preemptions > 0, "the pool was meant to be too small to avoid preemption"
    assert engine.pool.num_free == engine.pool.num_blocks
    engine.check_integrity()


def test_requests_that_cannot_be_served_are_rejected_with_reasons() -> None:
    engine = Engine(EngineConfig(model="synthetic:tiny", num_blocks=8, block_size=4))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(RequestError, match="context"):
        engine.add_request("b", list(range(40)), SamplingParams())
    with pytest.raises(RequestError, match="limit"):
        engine.add_request("c", [5], SamplingParams(max_tokens=10**6))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request("d", [10**6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert engine.pool.num_free == 8


def test_decode_role_commits_received_kv_and_continues_like_aggregated() -> None:
    """The handoff path inside one process: prefill engine -> copy blocks -> decode engine."""
    from kvmesh.shared.engine.engine import Role

    base = dict(model="synthetic:tiny", block_size=4, num_blocks=64, max_num_batched_tokens=64)
    aggregated = Engine(EngineConfig(**base))  # type: ignore[arg-type]
    prefill = Engine(EngineConfig(**base, role=Role.PREFILL))  # type: ignore[arg-type]
    decode = Engine(EngineConfig(**base, role=Role.DECODE))  # type: ignore[arg-type]
    prompt = list(range(3, 30))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    aggregated.add_request("x", prompt, params)
    expected: list[int] = []
    while aggregated.has_work:
        expected += [t for o in aggregated.step() for t in o.new_token_ids]

    dst = decode.reserve("x", len(prompt))
    assert dst is not None
    exported: dict[int, torch.Tensor] = {}

    def export(layer: int, seqs: list[Sequence]) -> None:
        ids = torch.tensor(seqs[0].block_table)
        exported[layer] = prefill.model.ops.gather_blocks(prefill.kv_cache[layer], ids)

    prefill.export_hook = export
    prefill.add_request("x", prompt, params)
    (first,) = prefill.step()
    assert first.finish_reason is not None and first.finish_reason.value == "handoff"
    assert sorted(exported) == list(range(prefill.model_config.num_layers))
    for layer, data in exported.items():
        decode.model.ops.scatter_blocks(decode.kv_cache[layer], torch.tensor(dst), data)
    decode.commit("x", prompt, first.new_token_ids[0], params)
    got = list(first.new_token_ids)
    while decode.has_work:
        got += [t for o in decode.step() for t in o.new_token_ids]
    assert got == expected
    assert prefill.pool.num_free == prefill.pool.num_blocks
    assert decode.pool.num_free == decode.pool.num_blocks
