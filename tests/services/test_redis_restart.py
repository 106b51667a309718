"""Redis killed (kill -9) and restarted empty while the mesh streams: every stream completes,
the workers register again and republish the block sets they hold (the engine knows them), the
registry is exact again within seconds, and nothing leaks. Real processes, a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
from meshproc import Mesh, generate, inspect_all, snapshot, wait_until_idle
from reference import long_text

from kvmesh.protos import gateway_pb2
from kvmesh.shared.control.redis_server import RedisServer, RedisServerError

TOKENS = 96


def test_redis_kill_and_empty_restart_under_32_streams() -> None:
    server = RedisServer().start()
    mesh = Mesh.start(server.url, "--prefill", "1", "--decode", "2")
    try:
        requests = [
            gateway_pb2.GenerateRequest(request_id=f"r{i}", prompt=f"Note {i}: " + long_text(12),
                                        max_tokens=TOKENS, ignore_eos=True)
            for i in range(32)
        ]  # fmt: skip

        async def scenario() -> tuple[list, int]:
            tasks = [asyncio.create_task(generate(mesh.address, r, timeout=120)) for r in requests]
            while not any(s.running for s in await inspect_all(server.url)):
                await asyncio.sleep(0.1)
            os.kill(server.pid or 0, signal.SIGKILL)
            server.stop()
            await asyncio.sleep(1.0)  # away a while: heartbeats and releases fail meanwhile
            for attempt in range(20):  # the same port and password, empty; the port may
                try:  # stay bound a moment after the kill
                    server.start()
                    break
                except RedisServerError:
                    if attempt == 19:
                        raise
                    await asyncio.sleep(0.5)
            restarted = time.monotonic()
            republished = 0  # the most decode-side sets seen recorded while streams ran
            while not all(t.done() for t in tasks):
                snap = await snapshot(server.url)
                held = sum(len(v) for k, v in snap["block_sets"].items() if k.startswith("decode"))
                republished = max(republished, held)
                assert time.monotonic() - restarted < 60, snap
                await asyncio.sleep(0.1)
            return [t.result() for t in tasks], republished

        results, republished = asyncio.run(scenario())
        for r, got in zip(requests, results, strict=True):
            assert got.code == grpc.StatusCode.OK, (r.request_id, got.details)
            assert len(got.tokens) == TOKENS, r.request_id
        assert republished > 0  # the workers recorded their running streams again
        states, snap = asyncio.run(wait_until_idle(server.url, timeout=5))
        assert {w["worker_id"] for w in snap["workers"]} == {s.worker_id for s in states}
        assert len(states) == 3 and all(s.integrity_ok for s in states), states
        assert not snap["block_sets"] and all(s.free_blocks == s.total_blocks for s in states)
        after = asyncio.run(
            generate(mesh.address, gateway_pb2.GenerateRequest(prompt="Hi", max_tokens=4))
        )
        assert after.code == grpc.StatusCode.OK and len(after.tokens) == 4
    finally:
        mesh.proc.stop()
        server.stop()
