"""A cancel never wedges the mesh: 20 clients hang up before or right after their first token
(prompts of 100 to 1,000 tokens) on `kvmesh up --prefill 1 --decode 1` with a real Redis server;
then the same workers serve 4 of 4 requests with the tokens they gave before the hang-ups (the
mesh's tokens are checked against the single-process engine in test_mesh), and every KV block is
free everywhere."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from meshproc import Mesh, Result, generate, snapshot, wait_until_idle
from reference import long_text

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.engine.tokenizer import Tokenizer, load_tokenizer
from kvmesh.shared.model.fetch import default_model_path

Code = grpc.StatusCode
# a wedged mesh never sends it (the issue: 12 of 20 had none after 60 s); the rest leaves room for
# a loaded machine, where these prompts take ~40 s to compute
FIRST_TOKEN_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with RedisServer() as server:
        mesh = Mesh.start(server.url, "--prefill", "1", "--decode", "1")
        yield mesh
        mesh.proc.interrupt()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@dataclass(frozen=True)
class Hangup:
    """When a client hangs up: `after_first` (right after its first token, `delay_s` later) or
    `delay_s` after it sent the request, whether or not a token came (before the first token,
    mostly: during admission, reservation, prefill or the handoff)."""

    after_first: bool
    delay_s: float


@dataclass
class Seen:
    tokens: int = 0
    first_token_s: float | None = None
    code: Code | None = None  # an error before the hang-up


async def _hang_up(address: str, request: gateway_pb2.GenerateRequest, how: Hangup) -> Seen:
    seen = Seen()
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120)

        async def read() -> None:
            try:
                async for msg in call:
                    seen.tokens += len(msg.token_ids)
                    if seen.first_token_s is None:
                        seen.first_token_s = time.monotonic() - started
                        if how.after_first:
                            await asyncio.sleep(how.delay_s)
                            call.cancel()
                            return
            except grpc.aio.AioRpcError as e:
                if e.code() != Code.CANCELLED:
                    seen.code = e.code()
            except asyncio.CancelledError:  # how grpc ends a call cancelled before its headers
                pass

        reader = asyncio.create_task(read())
        if how.after_first:
            try:
                await asyncio.wait_for(reader, FIRST_TOKEN_TIMEOUT_S + how.delay_s)
            except TimeoutError:  # no first token: the assertion on first_token_s says so
                call.cancel()
        else:
            await asyncio.sleep(how.delay_s)
            call.cancel()
            await reader
    return seen


def _hangups(tokenizer: Tokenizer) -> list[tuple[gateway_pb2.GenerateRequest, Hangup]]:
    """20 prompts of 100..1,000 tokens. 6 clients hang up right after their first token (at once
    or a few ms later: while decode starts); 14 before it, from at once (admission, reservation)
    to seconds later (prefill computing, or the handoff)."""
    text = tokenizer.encode(long_text(900))
    rng = random.Random(25)
    lengths = [100 + round(i * 900 / 19) for i in range(20)]  # 100, 147, ..., 1000
    first = {0, 2, 4, 6, 8, 19}  # 2,447 prompt tokens to compute before they hang up
    delays = [0.0, 0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 1.6, 2.0, 2.5, 3.0]
    rng.shuffle(delays)
    out = []
    for i, n in enumerate(lengths):
        start = rng.randrange(len(text) - n)
        prompt = [*tokenizer.encode(f"Client {i}:"), *text[start : start + n]][:n]
        request = gateway_pb2.GenerateRequest(
            request_id=f"hangup-{i}", prompt_token_ids=prompt, max_tokens=16, ignore_eos=True
        )
        if i in first:
            how = Hangup(after_first=True, delay_s=rng.choice([0.0, 0.005, 0.02]))
        else:
            how = Hangup(after_first=False, delay_s=delays.pop())
        out.append((request, how))
    rng.shuffle(out)  # the order they reach the gateway in
    return out


def test_20_hang_ups_at_or_before_the_first_token_leave_every_process_serving(
    mesh: Mesh, tokenizer: Tokenizer
) -> None:
    hangups = _hangups(tokenizer)
    later = [
        gateway_pb2.GenerateRequest(
            prompt=f"Story {i}: " + long_text(20 + 10 * i), max_tokens=8, ignore_eos=True
        )
        for i in range(4)
    ]

    async def serve_later() -> list[Result]:
        return await asyncio.gather(*(generate(mesh.address, r, timeout=60) for r in later))

    async def scenario() -> tuple[list[Result], list[Seen], list[Result], list[str], list[str]]:
        before = await serve_later()
        workers = sorted(w["worker_id"] for w in (await snapshot(mesh.redis_url))["workers"])
        seen = await asyncio.gather(*(_hang_up(mesh.address, r, h) for r, h in hangups))
        after = await serve_later()
        still = sorted(w["worker_id"] for w in (await snapshot(mesh.redis_url))["workers"])
        return before, seen, after, workers, still

    before, seen, after, workers, still = asyncio.run(scenario())
    output = "\n".join(mesh.proc.lines)
    for bad in ("Traceback", "InvalidStateError", "engine thread died", "restarting"):
        assert bad not in output, output[-4000:]
    assert len(workers) == 2 and still == workers  # the same two processes, still registered
    for (request, how), s in zip(hangups, seen, strict=True):
        assert s.code is None, (request.request_id, s)
        if how.after_first:  # each got its first token, in time
            assert s.first_token_s is not None, (request.request_id, seen)
    for r, want, got in zip(later, before, after, strict=True):
        assert want.code == Code.OK and len(want.tokens) == 8, (r.prompt, want)
        assert got.code == Code.OK, (r.prompt, got.code, got.details)
        assert (got.tokens, got.text, got.usage) == (want.tokens, want.text, want.usage)
    states, snap = asyncio.run(wait_until_idle(mesh.redis_url, timeout=10))
    assert len(states) == 2 and all(s.integrity_ok for s in states), states
    assert all(s.free_blocks == s.total_blocks and s.reservations == 0 for s in states), states
    assert not snap["block_sets"] and not snap["in_flight"], snap
