"""Every gRPC method of a running mesh (`kvmesh up` with a prefill, a decode and an aggregated
worker, synthetic tiny model, real Redis) fed random and mutated messages over loopback: valid
requests with one to three fields set at random (ids out of the vocabulary, NaN and infinite
floats, huge counts, unicode and empty strings, nested messages), messages of random fields, and
bytes that are no message at all. Each call ends with a status a client understands (OK or a
precise error; for bytes that do not parse, gRPC's own parse error) and never UNKNOWN from a
handler (an exception escaping it); no process dies or restarts, and a correct request is
served afterwards.

Counts: KVMESH_FUZZ_INPUTS (10,000 by default) for the gateway's Generate, and as many again
over the workers' methods together (they sit behind the gateway, mutual TLS in production);
a nightly run sets KVMESH_FUZZ_INPUTS=200000."""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from meshproc import Mesh, generate, snapshot

from kvmesh.protos import gateway_pb2, worker_pb2
from kvmesh.shared.control.redis_server import RedisServer

INPUTS = int(os.environ.get("KVMESH_FUZZ_INPUTS", "10000"))
# a call's deadline: a Decode of a reserved handoff whose KV never comes waits for it this long
CALL_TIMEOUT_S = 2.0
Code = grpc.StatusCode
# a client's answer: OK or an error that says what was wrong with its request, or that the mesh
# is busy; UNKNOWN (a handler raised) never
UNDERSTOOD = {Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.NOT_FOUND,
              Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.UNAVAILABLE, Code.ABORTED,
              Code.DEADLINE_EXCEEDED, Code.ALREADY_EXISTS}  # fmt: skip
T = FieldDescriptor
_INTS = {T.TYPE_INT32: 31, T.TYPE_INT64: 63, T.TYPE_UINT32: 32, T.TYPE_UINT64: 64}
_TEXT = "aZ 09.,\n\t<>{}\\\"'é日本🙂\u200b\x00"
# endpoints a mutated handoff may name: none, a closed port, and words that are none (a random
# string never names a host to resolve: there is no network in CI)
_ENDPOINTS = ["", "tcp://127.0.0.1:1", "ipc://nowhere", "nccl://x", "garbage", "tcp://:0"]


def _value(rng: random.Random, field: FieldDescriptor, depth: int) -> Any:
    t = field.type
    if t in _INTS:
        bits, signed = _INTS[t], t in (T.TYPE_INT32, T.TYPE_INT64)
        top = (1 << bits) - 1
        value = rng.choice([0, 1, 2, 3, 16, 511, 512, top, rng.getrandbits(bits), top >> 1])
        return value - (1 << bits) if signed and value > top >> 1 else value
    if t in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        return rng.choice([0.0, 0.5, 1.0, -1.0, 2.0, math.nan, math.inf, -math.inf, 1e30,
                           rng.uniform(-5, 5)])  # fmt: skip
    if t == T.TYPE_BOOL:
        return rng.random() < 0.5
    if t == T.TYPE_STRING:
        if "endpoint" in field.name or "address" in field.name:
            return rng.choice(_ENDPOINTS)
        n = rng.choice([0, 1, 5, 30, 2000])
        return "".join(rng.choice(_TEXT) for _ in range(n))
    if t == T.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 16, 100]))
    if t == T.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    raise TypeError(f"no generator for field type {t} ({field.full_name})")


def _set(rng: random.Random, msg: Message, field: FieldDescriptor, depth: int) -> None:
    """Give one field of msg a random value (a repeated one, a random list)."""
    if field.type == T.TYPE_MESSAGE:
        if depth > 2:
            return
        items = [getattr(msg, field.name)] if not _repeated(field) else []
        if _repeated(field):
            items = [getattr(msg, field.name).add() for _ in range(rng.randrange(4))]
        for item in items:
            _randomize(rng, item, depth + 1)
        return
    try:
        if _repeated(field):
            n = rng.choice([0, 1, 3, 10, 700])
            getattr(msg, field.name)[:] = [_value(rng, field, depth) for _ in range(n)]
        else:
            setattr(msg, field.name, _value(rng, field, depth))
    except ValueError:  # protobuf refuses it (a lone surrogate): the wire never carries it
        pass


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _randomize(rng: random.Random, msg: Message, depth: int = 0) -> None:
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.6:
            _set(rng, msg, field, depth)


def _mutated(rng: random.Random, template: Message) -> tuple[bytes, bool]:
    """One input and whether it is raw bytes: the template with 1-3 fields at random, a message
    of random fields, or random bytes (which may not parse: INTERNAL is their answer)."""
    shape = rng.random()
    if shape < 0.1:
        return rng.randbytes(rng.randrange(64)), True
    msg = type(template)()
    if shape < 0.7:
        msg.CopyFrom(template)
        fields = list(msg.DESCRIPTOR.fields)
        for field in rng.sample(fields, min(len(fields), rng.randrange(1, 4))):
            _set(rng, msg, field, 0)
    else:
        _randomize(rng, msg)
    return msg.SerializeToString(), False


def _sampling() -> worker_pb2.Sampling:
    return worker_pb2.Sampling(max_tokens=2, seed=7)


# (service method, streaming response, a valid request to mutate)
WORKER_METHODS: dict[str, list[tuple[str, bool, Message]]] = {
    "prefill": [
        ("/kvmesh.worker.v1.Prefill/Prefill", False, worker_pb2.PrefillRequest(
            request_id="r", prompt_token_ids=[1, 2, 3], sampling=_sampling(),
            handoff_id="00000000-0000-0000-0000-000000000001")),
        ("/kvmesh.worker.v1.Prefill/Model", False, worker_pb2.ModelRequest()),
    ],
    "decode": [
        ("/kvmesh.worker.v1.Decode/Reserve", False, worker_pb2.ReserveRequest(
            request_id="r", handoff_id="00000000-0000-0000-0000-000000000002",
            prompt_token_ids=[1, 2, 3], sampling=_sampling())),
        ("/kvmesh.worker.v1.Decode/Decode", True, worker_pb2.DecodeRequest(
            request_id="r", handoff_id="00000000-0000-0000-0000-000000000002",
            prompt_token_ids=[1, 2, 3], first_token=5, sampling=_sampling())),
        ("/kvmesh.worker.v1.Decode/Release", False, worker_pb2.ReleaseRequest(
            handoff_id="00000000-0000-0000-0000-000000000002")),
        ("/kvmesh.worker.v1.Decode/OpenKVLink", False, worker_pb2.OpenKVLinkRequest()),
        ("/kvmesh.worker.v1.Decode/Inspect", False, worker_pb2.InspectRequest()),
    ],
    "aggregated": [
        ("/kvmesh.worker.v1.Aggregated/Generate", True, worker_pb2.AggregatedRequest(
            request_id="r", prompt_token_ids=[1, 2, 3], sampling=_sampling())),
    ],
}  # fmt: skip


async def _call(
    channel: grpc.aio.Channel, method: str, streaming: bool, data: bytes
) -> tuple[Code, str]:  # fmt: skip
    ident = dict(request_serializer=None, response_deserializer=None)
    try:
        if streaming:
            async for _ in channel.unary_stream(method, **ident)(data, timeout=CALL_TIMEOUT_S):
                pass
        else:
            await channel.unary_unary(method, **ident)(data, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def _unparsed(code: Code, details: str) -> bool:
    """gRPC's own answer to bytes that are no message of the method's type: grpc.aio's server
    says UNKNOWN, naming the parse error (no handler ran)."""
    return code in (Code.INTERNAL, Code.UNKNOWN) and "Error parsing message" in details


Call = tuple[str, bool, tuple[bytes, bool]]  # (method, streaming, (input, raw bytes))


async def _fuzz(address: str, calls: Iterator[Call], width: int = 64) -> Counter[Code]:
    """Run the calls `width` at a time on one channel; the count of each status."""
    codes: Counter[Code] = Counter()
    unknown: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:

        async def worker() -> None:
            for method, streaming, (data, raw) in calls:
                code, details = await _call(channel, method, streaming, data)
                codes[code] += 1
                if code not in UNDERSTOOD and not (raw and _unparsed(code, details)):
                    unknown.append(f"{method} {code.name} {details[:200]} {data[:80]!r}")

        await asyncio.gather(*(worker() for _ in range(width)))
    assert not unknown, unknown[:5]
    return codes


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with RedisServer() as server:
        mesh = Mesh.start(server.url, "--model", "synthetic:tiny", "--prefill", "1", "--decode",
                          "1", "--aggregated", "1")  # fmt: skip
        yield mesh
        mesh.proc.interrupt()


def _workers(mesh: Mesh) -> dict[str, tuple[str, int]]:
    """role -> (address, generation) of each registered worker."""
    return {w["role"]: (w["address"], w["generation"])
            for w in asyncio.run(snapshot(mesh.redis_url))["workers"]}  # fmt: skip


def test_the_gateway_and_every_worker_method_survive_fuzzed_messages(mesh: Mesh) -> None:
    before = _workers(mesh)
    assert set(before) == {"prefill", "decode", "aggregated"}
    rng = random.Random(20261208)
    # one token: a valid mutation is served by the prefill alone (the decode path is fuzzed
    # through the workers' methods), so 10,000 fit the CI budget
    template = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_tokens=1)
    gateway_calls = iter([("/kvmesh.v1.Gateway/Generate", True, _mutated(rng, template))
                          for _ in range(INPUTS)])  # fmt: skip
    codes = asyncio.run(_fuzz(mesh.address, gateway_calls))
    assert codes[Code.OK] > 0 and codes[Code.INVALID_ARGUMENT] > 0, codes  # both paths ran
    for role, methods in WORKER_METHODS.items():
        n = INPUTS // sum(len(m) for m in WORKER_METHODS.values())
        calls = iter([(method, streaming, _mutated(rng, tmpl))
                      for method, streaming, tmpl in methods for _ in range(n)])  # fmt: skip
        asyncio.run(_fuzz(before[role][0], calls))
    assert mesh.proc.proc.poll() is None
    assert _workers(mesh) == before  # none died, none restarted, none was fenced
    after = asyncio.run(generate(mesh.address, gateway_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7], max_tokens=4)))  # fmt: skip
    assert after.code == Code.OK and len(after.tokens) == 4
