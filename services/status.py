"""`kvmesh status`: the registry's view of the mesh, read from Redis."""

from __future__ import annotations

import redis.asyncio as redis

from kvmesh.shared.control.connect import check_redis
from kvmesh.shared.control.ledger import Ledger


async def print_status(redis_url: str) -> int:
    await check_redis(redis_url)
    client = redis.from_url(redis_url)
    try:
        snap = await Ledger(client).snapshot()
    finally:
        await client.aclose()
    workers = snap["workers"]
    print(f"{len(workers)} workers")
    header = f"{'worker':40} {'role':10} {'address':22} {'free/total blocks':>18}"
    print(f"{header} {'run':>4} {'queue':>5}")
    for w in workers:
        blocks = f"{w['free_blocks']}/{w['total_blocks']}"
        print(
            f"{w['worker_id']:40} {w['role']:10} {w['address']:22} {blocks:>18} "
            f"{w['running']:>4} {w['queue_depth']:>5}"
        )
    sets = snap["block_sets"]
    owned = sum(len(v) for v in sets.values())
    print(f"\n{owned} block sets, {len(snap['in_flight'])} handoffs in flight")
    for owner, entries in sets.items():
        for e in entries:
            print(
                f"  {owner}: {e['handoff_id']} {e['state']} {e['blocks']} blocks, "
                f"age {e['age_s']:.1f}s, lease {e['lease_left_s']:.1f}s"
            )
    return 0
