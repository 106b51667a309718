"""A gateway stopped with SIGTERM while streams are open exits promptly, every time: one pool of
real workers (Redis, a prefill and a decode worker on loopback), and a lone gateway process
started and stopped 20 times in a row, each time with streams in flight that outlast its drain."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshproc import Proc, kvmesh

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc
from kvmesh.shared.control.redis_server import RedisServer

MODEL = "synthetic:tiny"
STOPS = 20
STREAMS = 4
DRAIN_S = 1.0  # the streams run far longer: the drain must cut them
EXIT_S = 5.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        workers = [kvmesh(role, "--model", MODEL, "--port", "0", "--host", "127.0.0.1",
                          redis_url=server.url) for role in ("prefill", "decode")]  # fmt: skip
        try:
            for worker in workers:
                worker.wait_for(" ready ", timeout=300)
            yield server.url
        finally:
            for worker in workers:
                worker.stop(signal.SIGTERM)


async def stream(address: str, started: asyncio.Event) -> tuple[grpc.StatusCode, int]:
    """A long generation; sets `started` at its first token; returns (status, tokens)."""
    request = gateway_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7, 8], max_tokens=4000,
                                          ignore_eos=True)  # fmt: skip
    tokens = 0
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            async for msg in gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=60):
                tokens += len(msg.token_ids)
                started.set()
        except grpc.aio.AioRpcError as e:
            return e.code(), tokens
    return grpc.StatusCode.OK, tokens


async def stop_while_streaming(gateway: Proc, address: str) -> tuple[float, list]:
    """SIGTERM once every stream has a token; returns (seconds to exit, the streams' ends)."""
    started = [asyncio.Event() for _ in range(STREAMS)]
    streams = [asyncio.create_task(stream(address, s)) for s in started]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), timeout=60)
    signalled = time.monotonic()
    gateway.proc.send_signal(signal.SIGTERM)
    while gateway.proc.poll() is None and time.monotonic() - signalled < 2 * EXIT_S:
        await asyncio.sleep(0.02)
    took = time.monotonic() - signalled
    return took, await asyncio.gather(*streams)


def test_sigterm_with_streams_open_exits_within_5s_20_times(redis_url: str, tmp_path: Path):
    env = {"KVMESH_CACHE": str(tmp_path)}  # a synthetic model and an empty cache: no tokenizer
    for i in range(STOPS):
        gateway = kvmesh("gateway", "--model", MODEL, "--port", "0", "--host", "127.0.0.1",
                         "--drain-timeout-s", str(DRAIN_S), redis_url=redis_url,
                         extra_env=env)  # fmt: skip
        try:
            address = gateway.wait_for("gateway ready", timeout=120).split()[-1]
            took, ends = asyncio.run(stop_while_streaming(gateway, address))
            log = "\n".join(gateway.lines[-20:])
            assert gateway.proc.returncode == 0 and took < EXIT_S, (i, took, log)
            # cut at the drain's end, after streaming: no stream hung, none finished early
            assert all(code == grpc.StatusCode.UNAVAILABLE and n > 0 for code, n in ends), ends
        finally:
            gateway.stop(signal.SIGKILL)
