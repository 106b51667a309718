"""The NCCL KV handoff between two processes on two GPUs: prefill here on cuda:0, decode in a
spawned process on cuda:1 (commands over a pipe, KV over NCCL; each pair's NCCL unique id over
gRPC: the decode process serves Decode.OpenKVLink with nccl/link.serve_links).

    python -m pytest tests/gpu/test_nccl_handoff.py      # on a machine with 2 GPUs

* a mixed batch of layers (sizes, dtypes, odd byte counts) arrives bit-identical, twice (the
  second time through reused staging buffers);
* greedy tokens of a disaggregated run (prefill engine -> NCCL -> decode engine) equal those of
  an aggregated run, fp32 synthetic model;
* a decode process killed mid-handoff leaves the prefill healthy: the handoff fails, the pair's
  communicator is aborted and leaves the cache, the blocks are free, and the next decode works.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import threading
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.nccl.channel import send_layer_group
from kvmesh.shared.handoff.nccl.link import serve_links
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender
from kvmesh.shared.handoff.transport import HandoffError
from kvmesh.shared.model.loader import load_model

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices (run on a 2-GPU machine)", allow_module_level=True)

MODEL = "synthetic:llama3.2-1b"
PREFILL_DEV, DECODE_DEV = torch.device("cuda:0"), torch.device("cuda:1")


# ---- the decode process ----------------------------------------------------------------------


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def decode_main(conn: Connection, engine_kwargs: dict[str, Any] | None) -> None:
    """Serve commands from the test: raw handoffs (hashes of what arrived) or engine decode."""
    torch.cuda.set_device(DECODE_DEV)
    engine = None
    if engine_kwargs is not None:
        engine = Engine(EngineConfig(role=Role.DECODE, device=str(DECODE_DEV), **engine_kwargs))
    rx = NcclKVReceiver(DECODE_DEV)
    endpoint = rx.start()
    links, address = serve_links(rx)  # Decode.OpenKVLink: new pairs' unique ids
    conn.send((endpoint, address))
    futures: dict[str, Any] = {}
    hashes: dict[str, dict[int, str]] = {}
    while True:
        op, args = conn.recv()
        if op == "quit":
            links.stop(None)
            rx.close()
            conn.send("bye")
            return
        if op == "expect_raw":
            hid, layers, nbytes, die_on = args
            hashes[hid] = {}

            def on_layer(layer: int, payload: torch.Tensor, hid: str = hid, die_on: int = die_on):
                if layer == die_on:
                    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-handoff
                hashes[hid][layer] = sha(payload)

            futures[hid] = rx.expect(hid, layers, nbytes, on_layer)
            conn.send(True)
        elif op == "result_raw":
            result = futures.pop(args).result(60)
            conn.send((result.ok, result.error, hashes.pop(args)))
        elif op == "staging_allocations":
            conn.send(rx.staging_allocations)
        elif op == "reserve":
            assert engine is not None
            hid, n_tokens = args
            blocks = engine.reserve(hid, n_tokens)
            assert blocks is not None
            nbytes = layer_nbytes(engine, len(blocks))
            layers = engine.model_config.num_layers
            futures[hid] = rx.expect(hid, layers, nbytes, scatter_into(engine, blocks))
            conn.send(True)
        elif op == "decode":
            assert engine is not None
            conn.send(decode_batch(engine, futures, args))


def decode_batch(engine: Engine, futures: dict[str, Any], requests: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for hid, prompt, first, max_tokens in requests:
        result = futures.pop(hid).result(60)
        if not result.ok:
            out[hid] = result.error
            engine.abort(hid)
            continue
        engine.commit(hid, prompt, first, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        out[hid] = [first]
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    engine.check_integrity()
    return out


class DecodeProcess:
    def __init__(self, engine_kwargs: dict[str, Any] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=decode_main, args=(child, engine_kwargs), daemon=True)
        self.proc.start()
        self.endpoint, self.address = self.call_raw(timeout=300)  # KV, gRPC (OpenKVLink)

    def call_raw(self, timeout: float = 120) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("decode process did not answer")
        return self.conn.recv()

    def call(self, op: str, args: Any = None, timeout: float = 120) -> Any:
        self.conn.send((op, args))
        return self.call_raw(timeout)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("quit", None))
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.fixture(scope="module")
def sender() -> Iterator[NcclKVSender]:
    torch.cuda.set_device(PREFILL_DEV)
    tx = NcclKVSender(PREFILL_DEV)
    yield tx
    tx.close()


# ---- tests -----------------------------------------------------------------------------------


def test_a_mixed_batch_arrives_bit_identical(sender: NcclKVSender) -> None:
    peer = DecodeProcess()
    try:
        gen = torch.Generator(device=PREFILL_DEV).manual_seed(0)
        # [2, n_blocks, block_size, kv_heads, head_dim] of several sizes and dtypes; odd byte
        # counts exercise the checksum's tail
        specs = [((2, 1, 16, 8, 128), torch.bfloat16), ((2, 37, 16, 8, 128), torch.bfloat16),
                 ((2, 5, 16, 2, 64), torch.float32), ((2, 3, 3, 1, 7), torch.bfloat16),
                 ((2, 256, 16, 8, 128), torch.float16)]  # fmt: skip
        layers = 6
        allocated = []
        for _ in range(2):  # the second round reuses the receiver's staging buffers
            data = {
                str(uuid.uuid4()): [
                    torch.randn(shape, device=PREFILL_DEV, generator=gen).to(dtype)
                    for _ in range(layers)
                ]
                for shape, dtype in specs
            }
            send_and_check(peer, sender, data, layers)
            allocated.append(peer.call("staging_allocations"))
        # every buffer came back before its handoff's ACK: in the second round, at least the
        # first layer of each size found one free
        assert allocated[1] - allocated[0] <= (layers - 1) * len(specs)
    finally:
        peer.stop()


def send_and_check(
    peer: DecodeProcess, sender: NcclKVSender, data: dict[str, list[torch.Tensor]], layers: int
) -> None:
    """One handoff per entry of `data`, sent as a batch; every layer arrives bit-identical."""
    for hid, kv in data.items():
        assert peer.call("expect_raw", (hid, layers, kv[0].numel() * kv[0].element_size(), -1))
    channels = {hid: sender.open(peer.endpoint, hid, layers, peer.address) for hid in data}
    for layer in range(layers):  # one grouped launch per layer for the whole batch
        assert send_layer_group(layer, [(channels[h], kv[layer]) for h, kv in data.items()]) == []
    for hid, kv in data.items():
        stats = channels[hid].finish(60)
        ok, error, hashes = peer.call("result_raw", hid)
        assert ok, error
        assert hashes == {layer: sha(kv[layer]) for layer in range(layers)}
        assert stats.nbytes == layers * kv[0].numel() * kv[0].element_size()


def _prefill(
    engine: Engine, pusher: KVPusher, sender: NcclKVSender, peer: DecodeProcess,
    prompts: dict[str, list[int]],
) -> tuple[dict[str, int], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Prefill a batch, pushing its KV; returns first tokens, per-handoff outcome, channels."""
    layers = engine.model_config.num_layers
    channels = {hid: sender.open(peer.endpoint, hid, layers, peer.address) for hid in prompts}
    for hid, prompt in prompts.items():
        pusher.register(hid, channels[hid])
        engine.add_request(hid, prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    first: dict[str, int] = {}
    while engine.has_work:
        for o in engine.step():
            first[o.request_id] = o.new_token_ids[0]
    outcome: dict[str, Any] = {}
    for hid, channel in channels.items():
        pusher.unregister(hid)
        try:
            outcome[hid] = channel.finish(60)
        except HandoffError as exc:
            outcome[hid] = exc
    return first, outcome, channels


def _aggregated(loaded: Any, config: dict[str, Any], prompts: dict[str, list[int]], n: int) -> dict:
    engine = Engine(EngineConfig(role=Role.AGGREGATED, device=str(PREFILL_DEV), **config), loaded)
    for hid, prompt in prompts.items():
        engine.add_request(hid, prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    out: dict[str, list[int]] = {hid: [] for hid in prompts}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


CONFIG: dict[str, Any] = dict(model=MODEL, dtype="float32", num_blocks=1024,
                              max_num_batched_tokens=2048, max_num_seqs=16, seed=3)  # fmt: skip


def test_disaggregated_greedy_tokens_equal_aggregated(sender: NcclKVSender) -> None:
    new_tokens = 16
    rng = random.Random(0)
    prompts = {str(uuid.uuid4()): [rng.randrange(3, 30000) for _ in range(n)]
               for n in (1, 9, 33, 200, 700)}  # fmt: skip
    loaded = load_model(MODEL, torch.float32, PREFILL_DEV, seed=3)
    expected = _aggregated(loaded, CONFIG, prompts, new_tokens)
    peer = DecodeProcess(CONFIG)
    try:
        engine = Engine(EngineConfig(role=Role.PREFILL, device=str(PREFILL_DEV), **CONFIG), loaded)
        pusher = KVPusher(engine)
        engine.export_hook = pusher
        for hid, prompt in prompts.items():
            assert peer.call("reserve", (hid, len(prompt)))
        first, outcome, _ = _prefill(engine, pusher, sender, peer, prompts)
        assert all(not isinstance(o, Exception) for o in outcome.values()), outcome
        got = peer.call("decode", [(h, p, first[h], new_tokens) for h, p in prompts.items()])
        assert got == expected
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        peer.stop()


def test_a_decode_killed_mid_handoff_leaves_the_prefill_healthy(sender: NcclKVSender) -> None:
    loaded = load_model(MODEL, torch.float32, PREFILL_DEV, seed=3)
    engine = Engine(EngineConfig(role=Role.PREFILL, device=str(PREFILL_DEV), **CONFIG), loaded)
    pusher = KVPusher(engine)
    engine.export_hook = pusher
    prompt = {str(uuid.uuid4()): list(range(5, 1505))}
    nbytes = layer_nbytes(engine, -(-1500 // engine.config.block_size))
    layers = engine.model_config.num_layers

    doomed = DecodeProcess()
    try:
        hid = next(iter(prompt))
        assert doomed.call("expect_raw", (hid, layers, nbytes, 3))  # dies on layer 3
        _, outcome, channels = _prefill(engine, pusher, sender, doomed, prompt)
        assert isinstance(outcome[hid], HandoffError), outcome
        doomed.proc.join(30)
        assert doomed.proc.exitcode == -signal.SIGKILL
    finally:
        doomed.stop()
    pair = channels[hid].peer
    assert pair.dead and pair.comm.closed  # the communicator was aborted...
    assert doomed.endpoint not in sender.peers  # ...the pair left the cache...
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks  # ...and the blocks are free
    synced = threading.Thread(target=torch.cuda.synchronize, args=(PREFILL_DEV,), daemon=True)
    synced.start()
    synced.join(30)
    assert not synced.is_alive()  # nothing on this GPU still waits on the dead peer

    healthy = DecodeProcess()  # the prefill goes on with another decode worker
    try:
        prompt = {str(uuid.uuid4()): list(range(7, 707))}
        hid = next(iter(prompt))
        nbytes = layer_nbytes(engine, -(-700 // engine.config.block_size))
        assert healthy.call("expect_raw", (hid, layers, nbytes, -1))
        _, outcome, _ = _prefill(engine, pusher, sender, healthy, prompt)
        assert not isinstance(outcome[hid], Exception), outcome
        ok, error, _ = healthy.call("result_raw", hid)
        assert ok, error
    finally:
        healthy.stop()
