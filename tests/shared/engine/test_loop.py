"""The engine thread and its callers: a caller cancelled at any point (its client hung up) never
kills the thread nor leaks blocks, and a thread that does die says so to every caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.loop import EngineDied, EngineLoop
from kvmesh.shared.engine.sequence import SamplingParams

CONFIG = EngineConfig(model="synthetic:tiny", block_size=4, num_blocks=64,
                      max_num_batched_tokens=64)  # fmt: skip


@pytest.fixture
def loop() -> Iterator[EngineLoop]:
    loop = EngineLoop(Engine(CONFIG))
    loop.start()
    yield loop
    loop.stop()


def _blocking(started: threading.Event, gate: threading.Event):  # type: ignore[no-untyped-def]
    """A command that holds the engine thread until `gate` is set."""

    def fn(engine: Engine) -> str:
        started.set()
        assert gate.wait(10)
        return "done"

    return fn


def test_a_call_cancelled_before_it_runs_is_skipped(loop: EngineLoop) -> None:
    async def scenario() -> list[str]:
        started, gate, ran = threading.Event(), threading.Event(), []
        busy = asyncio.create_task(loop.call(_blocking(started, gate)))
        assert await asyncio.to_thread(started.wait, 10)
        queued = asyncio.create_task(loop.call(lambda e: ran.append("queued")))
        await asyncio.sleep(0.05)  # it is queued behind the busy command
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        assert await busy == "done"
        assert await loop.call(lambda e: "alive") == "alive"
        return ran

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == []
    assert loop._thread.is_alive()


def test_a_call_cancelled_while_it_runs_completes_and_posted_cleanup_follows(
    loop: EngineLoop,
) -> None:
    """The engine thread settles a future its caller has given up on (the InvalidStateError that
    killed it); the caller's cleanup, posted after the cancel, runs after the call."""
    total = loop.engine.pool.num_blocks

    async def scenario() -> int:
        started, gate = threading.Event(), threading.Event()
        hold = _blocking(started, gate)
        reserve = asyncio.create_task(loop.call(lambda e: (hold(e), e.reserve("r", 40))[1]))
        assert await asyncio.to_thread(started.wait, 10)
        reserve.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserve
        loop.post(lambda e: e.abort("r"))  # what a cancelled Reserve handler does
        gate.set()
        return await loop.call(lambda e: e.pool.num_free)

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == total
    assert loop._thread.is_alive()


def test_many_cancels_at_random_points_leave_no_block_held(loop: EngineLoop) -> None:
    """Requests added and cancelled while the engine steps: each cancel, wherever it lands,
    ends with the request aborted and its blocks free."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)

    async def request(i: int) -> None:
        rid = f"r{i}"
        queue = loop.subscribe(rid)
        try:
            await loop.call(lambda e: e.add_request(rid, list(range(3, 3 + 10 + i)), params))
            while not (await queue.get()).finished:
                pass
        finally:
            loop.unsubscribe(rid)
            loop.post(lambda e: e.abort(rid))

    async def scenario() -> tuple[int, int]:
        tasks = [asyncio.create_task(request(i)) for i in range(24)]
        for i, task in enumerate(tasks):
            await asyncio.sleep(0.002 * (i % 5))
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):  # blocks aborted during a step are free once it completes
            state = await loop.call(lambda e: (e.pool.num_free, len(e.scheduler.running)))
            if state[0] == loop.engine.pool.num_blocks:
                break
            await asyncio.sleep(0.01)
        return state

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == (loop.engine.pool.num_blocks, 0)
    assert loop._thread.is_alive()


def test_a_dead_engine_thread_fails_every_call_and_reports_its_death(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deaths: list[BaseException] = []
    died = threading.Event()
    loop = EngineLoop(Engine(CONFIG), on_death=lambda e: (deaths.append(e), died.set()))
    loop.start()

    def broken(*args: object) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(loop.engine, "step", broken)
    monkeypatch.setattr(loop.engine, "abort_all", broken)  # the step's recovery fails too

    async def scenario() -> None:
        params = SamplingParams(max_tokens=4)
        await loop.call(lambda e: e.add_request("r", [3, 4, 5], params))
        assert await asyncio.to_thread(died.wait, 10)
        with pytest.raises(EngineDied):
            await loop.call(lambda e: None)
        loop.post(lambda e: e.abort("r"))  # cleanup on a dead engine is a no-op, not an error

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [str(e) for e in deaths] == ["device lost"]
    loop._thread.join(5)
    assert not loop._thread.is_alive()
