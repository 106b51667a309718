"""Overlapped steps: step N+1 is launched before step N's tokens are processed, so a sampled
token is a placeholder for one step and finishing is decided one step late. The outputs must be
exactly those of the engine that processes every step before the next, and no block may be
reused while a launched step can still write it."""

from __future__ import annotations

import random

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import PENDING, SamplingParams

BASE = dict(model="synthetic:tiny", block_size=4, max_num_batched_tokens=48, max_num_seqs=8)


def engines(num_blocks: int = 64) -> tuple[Engine, Engine]:
    overlapped = Engine(EngineConfig(**BASE, num_blocks=num_blocks))  # type: ignore[arg-type]
    serial = Engine(EngineConfig(**BASE, num_blocks=num_blocks, overlap=False))  # type: ignore[arg-type]
    assert overlapped._overlap and not serial._overlap
    return overlapped, serial


Requests = list[tuple[list[int], SamplingParams]]


def drive(engine: Engine, requests: Requests) -> dict[str, list]:
    """Add a request every other step; every output per request, in order (tokens, output
    count, finish reason)."""
    return drive_counting(engine, requests)[0]


def drive_counting(engine: Engine, requests: Requests) -> tuple[dict[str, list], int]:
    """drive(), and the most preemptions any output reported."""
    outputs: dict[str, list] = {str(i): [] for i in range(len(requests))}
    preemptions = 0
    pending = list(enumerate(requests))
    steps = 0
    while pending or engine.has_work:
        if pending and steps % 2 == 0:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(str(i), prompt, params)
        for out in engine.step():
            assert PENDING not in out.new_token_ids
            preemptions = max(preemptions, out.num_preemptions)
            outputs[out.request_id].append(
                (out.new_token_ids, out.num_output_tokens, out.finish_reason)
            )
        engine.check_integrity()
        steps += 1
    assert engine.pool.num_free == engine.pool.num_blocks
    return outputs, preemptions


def mixed_requests(seed: int, n: int = 14) -> Requests:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 50))]
        temperature = 0.9 if i % 3 == 0 else 0.0
        params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=temperature, seed=i,
                                ignore_eos=True)  # fmt: skip
        requests.append((prompt, params))
    return requests


def test_overlapped_outputs_equal_serial_ones() -> None:
    overlapped, serial = engines()
    requests = mixed_requests(0)
    assert drive(overlapped, requests) == drive(serial, requests)


def test_a_stop_token_seen_one_step_late_emits_nothing_after_it() -> None:
    """The overlapped engine has already launched the next token when it learns of the stop:
    that token is computed and dropped, never emitted."""
    overlapped, serial = engines()
    prompt = list(range(3, 20))
    free_run = drive(serial, [(prompt, SamplingParams(max_tokens=12, ignore_eos=True))])["0"]
    stop = free_run[5][0][0]  # the sixth token
    params = SamplingParams(max_tokens=12, stop_token_ids=(stop,), ignore_eos=True)
    got = drive(overlapped, [(prompt, params)])["0"]
    assert got == drive(serial, [(prompt, params)])["0"]
    first_stop = next(i for i, (ids, _, _) in enumerate(free_run) if ids[0] == stop)
    assert len(got) == first_stop + 1 and got[-1][2] is not None
    assert got[-1][2].value == "stop"


def test_preemption_under_pressure_gives_the_serial_outputs() -> None:
    """A pool too small for the batch: sequences are preempted (some with a token still on the
    device) and recomputed, and the outputs stay those of the serial engine."""
    overlapped, serial = engines(num_blocks=24)
    requests = mixed_requests(1, n=12)
    got, preemptions = drive_counting(overlapped, requests)
    assert got == drive(serial, requests)
    assert preemptions > 0, "the pool was meant to be too small to avoid preemption"


def test_blocks_freed_during_a_launched_step_wait_for_it() -> None:
    engine, _ = engines(num_blocks=16)
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", list(range(3, 10)), SamplingParams(max_tokens=50, ignore_eos=True))
    while not engine._in_flight or len(engine._in_flight.sampled) < 2:
        engine.step()  # until a step with both sequences is in flight
    free = engine.pool.num_free
    held = len(engine._seqs["a"].block_table)
    assert engine.abort("a")
    assert engine.pool.num_free == free  # the launched step may still write a's blocks
    engine.check_integrity()
    outputs = engine.step()  # processes that step: a's blocks become allocatable
    assert all(o.request_id == "b" for o in outputs)
    assert engine.pool.num_free >= free + held - 1  # b may have taken one block meanwhile
    engine.check_integrity()


def test_abort_everything_after_a_failed_step_resets_the_pipeline() -> None:
    engine, _ = engines()
    for i in range(3):
        engine.add_request(str(i), [5 + i] * 9, SamplingParams(max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    outputs = engine.abort_all()
    assert sorted(o.request_id for o in outputs) == ["0", "1", "2"]
    assert all(o.finish_reason is not None and o.finish_reason.value == "abort" for o in outputs)
    assert not engine.has_work
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_sequence_done_at_launch_keeps_its_blocks_until_that_step_completes() -> None:
    """A sequence whose last token is launched leaves the batch at once (it cannot continue),
    but the launched step still writes its KV: its blocks stay unallocatable until then."""
    engine, _ = engines(num_blocks=16)
    engine.add_request("c", list(range(3, 12)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("d", list(range(3, 40)), SamplingParams(max_tokens=30, ignore_eos=True))
    c = engine._seqs["c"]
    blocks: list[int] = []
    while c.block_table or not blocks:  # until a launch took c out with its last token
        blocks = list(c.block_table)
        engine.step()
    assert "c" in engine._seqs  # its last token is still on the device
    assert not set(blocks) & set(engine.pool._free)
    engine.check_integrity()
    engine.step()  # processes that step
    assert "c" not in engine._seqs
    taken = set(engine._seqs["d"].block_table)
    assert set(blocks) <= set(engine.pool._free) | taken
