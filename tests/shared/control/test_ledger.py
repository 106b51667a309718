"""Ledger against a real valkey server: fencing, transitions, leases, reaping, snapshot."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from kvmesh.shared.control.ledger import Ledger, WorkerInfo
from kvmesh.shared.control.redis_server import RedisServer

Body = Callable[[Ledger], Awaitable[None]]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def run(redis_url: str) -> Callable[..., None]:
    """Run an async test body with a Ledger under a fresh key prefix."""

    def runner(body: Body, heartbeat_ttl_s: float = 3.0) -> None:
        async def main() -> None:
            client = aioredis.Redis.from_url(redis_url)
            try:
                prefix = f"t{uuid.uuid4().hex[:8]}:"
                await body(Ledger(client, prefix=prefix, heartbeat_ttl_s=heartbeat_ttl_s))
            finally:
                await client.aclose()

        asyncio.run(main())

    return runner


def worker(worker_id: str, role: str = "decode") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"{worker_id}:50051",
        kv_endpoint=f"tcp://{worker_id}:6000",
        model="tiny",
        free_blocks=100,
        total_blocks=128,
    )


def hid() -> str:
    return str(uuid.uuid4())


def test_register_and_workers_filtering(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        assert await ledger.register(worker("d1")) == 1
        assert await ledger.register(worker("p1", "prefill")) == 1
        assert await ledger.register(worker("d1")) == 2  # restart: new generation
        assert [w.worker_id for w in await ledger.workers()] == ["d1", "p1"]
        (d1,) = await ledger.workers("decode")
        assert d1 == WorkerInfo(
            worker_id="d1",
            role="decode",
            address="d1:50051",
            kv_endpoint="tcp://d1:6000",
            model="tiny",
            generation=2,
            free_blocks=100,
            total_blocks=128,
        )
        assert await ledger.heartbeat(
            "d1", 2, free_blocks=7, total_blocks=128, queue_depth=3, running=5
        )
        (d1,) = await ledger.workers("decode")
        assert (d1.free_blocks, d1.queue_depth, d1.running) == (7, 3, 5)
        assert await ledger.workers("aggregated") == []

    run(body)


def test_worker_record_expires_without_heartbeat(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        await ledger.register(worker("d1"))
        g2 = await ledger.register(worker("d2"))
        for _ in range(4):
            await asyncio.sleep(0.1)
            assert await ledger.heartbeat("d2", g2, 1, 2, 0, 0)
        assert [w.worker_id for w in await ledger.workers()] == ["d2"]
        assert not await ledger.heartbeat("d1", 1, 1, 2, 0, 0)  # expired: fenced

    run(body, heartbeat_ttl_s=0.25)


def test_stale_generation_is_fenced(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        old = await ledger.register(worker("d1"))
        h = hid()
        assert await ledger.reserve("d1", old, h, 4, peer="p1", lease_s=30)
        new = await ledger.register(worker("d1"))
        assert not await ledger.heartbeat("d1", old, 0, 0, 0, 0)
        assert not await ledger.reserve("d1", old, hid(), 4, peer="p1", lease_s=30)
        assert not await ledger.transition("d1", old, h, "owned")
        assert not await ledger.release("d1", old, h)
        assert not await ledger.deregister("d1", old)
        # The new incarnation does not inherit the old one's set ...
        assert not await ledger.transition("d1", new, h, "owned")
        assert not await ledger.release("d1", new, h)
        # ... which the reaper reclaims at once, lease or not.
        assert await ledger.reap() == [("d1", h)]
        assert (await ledger.workers())[0].generation == new

    run(body)


def test_reserve_commit_release_and_illegal_transitions(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        d = await ledger.register(worker("d1"))
        p = await ledger.register(worker("p1", "prefill"))
        h = hid()
        assert await ledger.reserve("d1", d, h, 4, peer="p1", lease_s=30)
        assert not await ledger.reserve("d1", d, h, 4, peer="p1", lease_s=30)  # id exists
        assert await ledger.reserve("p1", p, h, 4, peer="d1", lease_s=30, state="sending")
        assert not await ledger.transition("p1", p, h, "owned")  # not p1's destination set
        assert await ledger.transition("d1", d, h, "owned")
        assert not await ledger.transition("d1", d, h, "owned")  # already owned
        with pytest.raises(ValueError):
            await ledger.transition("d1", d, h, "reserved")
        with pytest.raises(ValueError):
            await ledger.reserve("d1", d, hid(), 1, peer="p1", lease_s=30, state="owned")
        assert not await ledger.release("d1", d, hid())  # unknown handoff
        assert await ledger.release("p1", p, h)
        assert not await ledger.release("p1", p, h)
        sets = (await ledger.snapshot())["block_sets"]
        assert [(s["handoff_id"], s["state"]) for s in sets["d1"]] == [(h, "owned")]
        assert "p1" not in sets
        assert await ledger.release("d1", d, h)
        assert (await ledger.snapshot())["block_sets"] == {}

    run(body)


def test_concurrent_reserve_of_one_id_has_one_winner(
    run: Callable[..., None], redis_url: str
) -> None:
    async def body(ledger: Ledger) -> None:
        gens = [await ledger.register(worker(f"d{i}")) for i in range(16)]
        h = hid()
        # Each contender on its own connection, so the scripts really race in the server.
        clients = [aioredis.Redis.from_url(redis_url) for _ in gens]
        ledgers = [Ledger(c, prefix=ledger.prefix) for c in clients]
        wins = await asyncio.gather(
            *(
                lg.reserve(f"d{i}", g, h, 2, "p1", 30)
                for i, (lg, g) in enumerate(zip(ledgers, gens, strict=True))
            )
        )
        await asyncio.gather(*(c.aclose() for c in clients))
        assert sum(wins) == 1
        winner = f"d{wins.index(True)}"
        assert list((await ledger.snapshot())["block_sets"]) == [winner]

    run(body)


def test_lease_expiry_is_reaped_within_the_lease(run: Callable[..., None]) -> None:
    lease_s = 0.5

    async def body(ledger: Ledger) -> None:
        await ledger.register(worker("d1"))  # the TTL keeps the record; nothing renews leases
        h = hid()
        start = time.monotonic()
        assert await ledger.reserve("d1", 1, h, 8, peer="p1", lease_s=lease_s)
        assert await ledger.reap() == []
        while not (reclaimed := await ledger.reap()):
            assert time.monotonic() - start < lease_s + 0.5, "lease not reaped"
            await asyncio.sleep(0.02)
        assert reclaimed == [("d1", h)]
        assert time.monotonic() - start >= lease_s - 0.05  # not before the lease ran out
        assert not await ledger.release("d1", 1, h)
        snap = await ledger.snapshot()
        assert snap["block_sets"] == {} and snap["in_flight"] == []

    run(body)


def test_heartbeat_renews_leases(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        g = await ledger.register(worker("d1"))
        h1, h2 = hid(), hid()
        assert await ledger.reserve("d1", g, h1, 8, peer="p1", lease_s=0.5)
        assert await ledger.reserve("d1", g, h2, 8, peer="p1", lease_s=0.5)
        assert await ledger.transition("d1", g, h2, "owned")
        for _ in range(10):  # 1 s: twice the lease, renewed every 0.1 s
            assert await ledger.heartbeat("d1", g, 1, 2, 0, 0)
            assert await ledger.reap() == []
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.6)  # heartbeats stop: the owner "crashed"
        assert sorted(await ledger.reap()) == sorted([("d1", h1), ("d1", h2)])

    run(body)


def test_sets_of_a_dead_owner_are_reaped_before_their_lease(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        g1 = await ledger.register(worker("d1"))
        g2 = await ledger.register(worker("d2"))
        h1, h2 = hid(), hid()
        assert await ledger.reserve("d1", g1, h1, 8, peer="p1", lease_s=60)
        assert await ledger.reserve("d2", g2, h2, 8, peer="p1", lease_s=60)
        for _ in range(5):  # d2 heartbeats, d1 has crashed: its record expires (TTL 0.25 s)
            await asyncio.sleep(0.1)
            assert await ledger.heartbeat("d2", g2, 1, 2, 0, 0)
        assert await ledger.reap() == [("d1", h1)]
        assert [w.worker_id for w in await ledger.workers()] == ["d2"]
        assert list((await ledger.snapshot())["block_sets"]) == ["d2"]

    run(body, heartbeat_ttl_s=0.25)


def test_deregister_releases_everything(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        g = await ledger.register(worker("d1"))
        assert await ledger.reserve("d1", g, hid(), 8, peer="p1", lease_s=60)
        assert await ledger.deregister("d1", g)
        snap = await ledger.snapshot()
        assert snap["workers"] == [] and snap["block_sets"] == {}
        assert not await ledger.heartbeat("d1", g, 0, 0, 0, 0)
        assert await ledger.reap() == []

    run(body)


def test_snapshot_contents(run: Callable[..., None]) -> None:
    async def body(ledger: Ledger) -> None:
        d = await ledger.register(worker("d1"))
        p = await ledger.register(worker("p1", "prefill"))
        await ledger.heartbeat("d1", d, free_blocks=90, total_blocks=128, queue_depth=1, running=2)
        h_owned, h_flight = hid(), hid()
        assert await ledger.reserve("d1", d, h_owned, 3, peer="p1", lease_s=10)
        assert await ledger.transition("d1", d, h_owned, "owned")
        assert await ledger.reserve("d1", d, h_flight, 5, peer="p1", lease_s=10)
        assert await ledger.reserve("p1", p, h_flight, 5, peer="d1", lease_s=10, state="sending")
        await asyncio.sleep(0.05)
        snap = await ledger.snapshot()
        assert [w["worker_id"] for w in snap["workers"]] == ["d1", "p1"]
        d1 = snap["workers"][0]
        assert (d1["role"], d1["generation"], d1["free_blocks"], d1["running"]) == (
            "decode",
            1,
            90,
            2,
        )
        assert 0 < d1["ttl_s"] <= 3.0
        assert snap["in_flight"] == [h_flight]
        d1_sets = {s["handoff_id"]: s for s in snap["block_sets"]["d1"]}
        assert (d1_sets[h_owned]["state"], d1_sets[h_owned]["blocks"]) == ("owned", 3)
        assert (d1_sets[h_flight]["state"], d1_sets[h_flight]["peer"]) == ("reserved", "p1")
        (p1_set,) = snap["block_sets"]["p1"]
        assert (p1_set["state"], p1_set["blocks"], p1_set["peer"]) == ("sending", 5, "d1")
        for s in [*d1_sets.values(), p1_set]:
            assert 0.04 <= s["age_s"] < 5 and 5 < s["lease_left_s"] <= 10

    run(body)
