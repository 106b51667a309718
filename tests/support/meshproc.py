"""Real mesh processes for tests: `kvmesh up` or single services as subprocesses, and clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.shared.control.ledger import Ledger


class Proc:
    """A kvmesh subprocess whose output is kept (and echoed on failure); waits for a marker line.

    It exits when this process dies (KVMESH_PARENT_PID): the command line asks for that itself,
    since a preexec_fn would run Python between fork and exec in this gRPC-busy process."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, env={**env, "KVMESH_PARENT_PID": str(os.getpid())}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self._seen = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    def wait_for(self, marker: str, timeout: float) -> str:
        """The first output line containing marker."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if marker in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-40:])
                    raise RuntimeError(f"no {marker!r} from {self.proc.args}:\n{tail}")
                self._seen.wait(min(left, 0.5))

    def interrupt(self) -> None:
        """Ctrl-C: the process exits 0 (else AssertionError with its last lines)."""
        assert self.stop(signal.SIGINT) == 0, "\n".join(self.lines[-30:])

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def kvmesh(*args: str, redis_url: str, extra_env: dict[str, str] | None = None) -> Proc:
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return Proc([sys.executable, "-P", "-m", "kvmesh.services.cli", *args], env)


def start_mesh(
    redis_url: str, *args: str, extra_env: dict[str, str] | None = None
) -> tuple[Proc, str]:
    """`kvmesh up ARGS` on a free gateway port; returns (process, gateway address)."""
    mesh = kvmesh("up", "--port", "0", *args, redis_url=redis_url, extra_env=extra_env)
    line = mesh.wait_for("kvmesh is up: gateway at", timeout=300)
    return mesh, line.split("gateway at ", 1)[1].split()[0]


@dataclass
class Mesh:
    """A running `kvmesh up` (start_mesh): its process, gateway address and Redis server."""

    proc: Proc
    address: str
    redis_url: str

    @classmethod
    def start(cls, redis_url: str, *args: str) -> Mesh:
        return cls(*start_mesh(redis_url, *args), redis_url)


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    usage: tuple[int, int] = (0, 0)
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    trailers: dict[str, str] = field(default_factory=dict)
    messages: int = 0


async def generate(
    address: str,
    request: gateway_pb2.GenerateRequest,
    timeout: float | None = 120,
    stop_after: int | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> Result:
    """Stream one Generate call (over TLS with `credentials`); cancels it after `stop_after`
    messages if given."""
    result = Result()
    if credentials is None:
        open_channel = grpc.aio.insecure_channel(address)
    else:
        open_channel = grpc.aio.secure_channel(address, credentials)
    async with open_channel as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Generate(request, timeout=timeout, metadata=metadata)
        try:
            async for msg in call:
                result.messages += 1
                result.tokens += list(msg.token_ids)
                result.text += msg.text
                if msg.finish_reason:
                    result.finish_reason = msg.finish_reason
                    result.usage = (msg.usage.prompt_tokens, msg.usage.completion_tokens)
                if stop_after is not None and result.messages >= stop_after:
                    call.cancel()
                    result.code = grpc.StatusCode.CANCELLED
                    return result
            result.trailers = {k: str(v) for k, v in (await call.trailing_metadata() or ())}
        except grpc.aio.AioRpcError as e:
            result.code, result.details = e.code(), e.details() or ""
    return result


async def snapshot(redis_url: str) -> dict:
    client = aioredis.from_url(redis_url)
    try:
        return await Ledger(client).snapshot()
    finally:
        await client.aclose()


_STUBS = {
    "prefill": worker_pb2_grpc.PrefillStub,
    "decode": worker_pb2_grpc.DecodeStub,
    "aggregated": worker_pb2_grpc.AggregatedStub,
}


async def inspect_all(redis_url: str) -> list[worker_pb2.InspectResponse]:
    """Inspect every registered worker that answers over gRPC."""
    out = []
    for w in (await snapshot(redis_url))["workers"]:
        async with grpc.aio.insecure_channel(w["address"]) as channel:
            stub = _STUBS[w["role"]](channel)
            try:
                out.append(await stub.Inspect(worker_pb2.InspectRequest(), timeout=10))
            except grpc.aio.AioRpcError as e:  # a killed worker until its record expires
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
    return out


async def wait_until_idle(redis_url: str, timeout: float) -> tuple[list, dict]:
    """Poll until no worker holds a block and Redis holds no block set; returns the last view."""
    deadline = time.monotonic() + timeout
    while True:
        states = await inspect_all(redis_url)
        snap = await snapshot(redis_url)
        idle = all(s.free_blocks == s.total_blocks and s.reservations == 0 for s in states)
        if (idle and not snap["block_sets"]) or time.monotonic() > deadline:
            return states, snap
        await asyncio.sleep(0.05)
