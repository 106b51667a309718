"""The gateway's routing policy over a real Redis registry: decode by free KV then load, prefill
by shortest expected wait, failed workers skipped for a while."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from kvmesh.services.gateway.directory import Directory
from kvmesh.shared.control.ledger import Ledger, WorkerInfo
from kvmesh.shared.control.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def _worker(wid: str, role: str, free: int = 0, total: int = 100, queue: int = 0,
            running: int = 0, model: str = "m") -> WorkerInfo:  # fmt: skip
    return WorkerInfo(worker_id=wid, role=role, address=f"127.0.0.1:{abs(hash(wid)) % 50000 + 1}",
                      kv_endpoint="", model=model, free_blocks=free, total_blocks=total,
                      queue_depth=queue, running=running)  # fmt: skip


async def _directory(redis_url: str, workers: list[WorkerInfo]) -> tuple[Directory, Ledger]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    ledger = Ledger(client, heartbeat_ttl_s=30)
    for w in workers:
        generation = await ledger.register(w)
        await ledger.heartbeat(w.worker_id, generation, w.free_blocks, w.total_blocks,
                               w.queue_depth, w.running)  # fmt: skip
    directory = Directory(ledger)
    await directory.refresh()
    return directory, ledger


def _picks(directory: Directory, n: int, blocks: int) -> list[str]:
    """The targets of n requests in a row, each reserving `blocks` (as this gateway notes)."""
    picks = []
    for _ in range(n):
        worker = directory.pick_target("m", set())
        assert worker is not None
        picks.append(worker.info.worker_id)
        directory.note_reserved(worker.info.worker_id, blocks)
    return picks


def test_decode_goes_to_the_most_free_kv_then_the_least_loaded(redis_url: str) -> None:
    async def scenario() -> list[str]:
        directory, _ = await _directory(redis_url, [
            _worker("d-busy", "decode", free=90, running=30),
            _worker("d-idle", "decode", free=90, running=2),
            _worker("d-full", "decode", free=10, running=0),
            _worker("d-other-model", "decode", free=100, model="other"),
            _worker("p", "prefill"),
        ])  # fmt: skip
        picks = _picks(directory, 3, blocks=45)
        await directory.close()
        return picks

    # d-idle first (same free KV, fewer running), then d-busy once d-idle's KV was taken,
    # then d-idle again (45 free vs d-busy's 45 free: fewer running wins)
    assert asyncio.run(scenario()) == ["d-idle", "d-busy", "d-idle"]


def test_prefill_goes_to_the_shortest_expected_wait(redis_url: str) -> None:
    async def scenario() -> list[str]:
        directory, _ = await _directory(redis_url, [
            _worker("p-queued", "prefill", queue=5),
            _worker("p-free", "prefill", queue=0),
        ])  # fmt: skip
        first = directory.pick_prefill("m", set())
        assert first is not None
        for _ in range(6):  # this gateway's own prefills in flight count as queue
            directory.outstanding[first.info.worker_id] += 1
        second = directory.pick_prefill("m", set())
        assert second is not None
        await directory.close()
        return [first.info.worker_id, second.info.worker_id]

    assert asyncio.run(scenario()) == ["p-free", "p-queued"]


def test_failed_and_excluded_workers_are_skipped(redis_url: str) -> None:
    async def scenario() -> tuple[str | None, str | None, str | None]:
        directory, _ = await _directory(redis_url, [
            _worker("d1", "decode", free=90), _worker("d2", "decode", free=50),
            _worker("p", "prefill"),
        ])  # fmt: skip
        directory.mark_suspect("d1")
        a = directory.pick_target("m", set())
        b = directory.pick_target("m", {"d2"})
        c = directory.pick_target("unknown-model", set())
        await directory.close()
        return (a.info.worker_id if a else None, b.info.worker_id if b else None,
                c.info.worker_id if c else None)  # fmt: skip

    assert asyncio.run(scenario()) == ("d2", None, None)


def test_requests_go_to_an_aggregated_worker_or_a_pair_by_free_kv(redis_url: str) -> None:
    async def scenario() -> list[str | None]:
        directory, _ = await _directory(redis_url, [
            _worker("a", "aggregated", free=90, queue=3), _worker("d", "decode", free=80),
            _worker("p", "prefill"),
        ])  # fmt: skip
        picks = _picks(directory, 3, blocks=15)
        # without a prefill worker no pair can serve: only the aggregated worker remains
        lone = directory.pick_target("m", {"p"})
        none = directory.pick_target("m", {"p", "a"})
        stubs = {type(w.stub).__name__ for w in (directory.pick_target("m", set()), lone) if w}
        await directory.close()
        return [*picks, lone.info.worker_id if lone else None, none, *sorted(stubs)]

    # a (90 free), then d (80 vs 75), then a (75 vs 65); the stubs match the roles
    assert asyncio.run(scenario()) == ["a", "d", "a", "a", None, "AggregatedStub", "DecodeStub"]
