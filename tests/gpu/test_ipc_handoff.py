"""The IPC KV handoff between two processes on one card: decode here on cuda:0 (its engine's KV
cache exported by CUDA IPC), prefill in a spawned process on the same cuda:0 that maps that
cache and writes the reserved blocks with device copies (commands over a pipe).

    . tests/gpu/device_env.sh && python -P -m pytest tests/gpu/test_ipc_handoff.py

* the prefill picks IPC, never NCCL, for a decode worker on its own card;
* a batch of handoffs (fp32 and bf16 caches, 1 to 300 blocks) arrives bit-identical;
* a layer whose copy went wrong is NACKed, never delivered, and the connection goes on;
* greedy tokens of prefill engine -> KVPusher -> IPC -> decode engine equal the aggregated
  engine's;
* a prefill process killed mid-handoff leaves the decode healthy: the handoff fails, its blocks
  are free, and a new prefill process writes the same blocks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from kvmesh.kernels.block_copy import gather_blocks
from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.handoff.auto import AutoKVSender, MultiKVReceiver, make_receiver, split_endpoints
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.transport import HandoffError, HandoffResult

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

DEVICE = "cuda:0"  # both processes, also on a machine with several cards
MODEL = "synthetic:smollm2-135m"
WAIT_S = 60.0


def config(dtype: str = "float32") -> dict[str, Any]:
    return dict(model=MODEL, device=DEVICE, dtype=dtype, block_size=16, num_blocks=512,
                max_num_batched_tokens=2048, max_num_seqs=64)  # fmt: skip


# ---- the prefill process ---------------------------------------------------------------------


def make_layers(seed: int, num_layers: int, shape: tuple[int, ...], dtype: str) -> list:
    """A handoff's KV, on the host: the same for the same seed in any process."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(getattr(torch, dtype)) for _ in range(num_layers)]


def prefill_main(conn: Connection) -> None:
    torch.cuda.set_device(DEVICE)
    from kvmesh.shared.handoff.ipc import sender as ipc_sender

    writes = {"count": 0, "corrupt": -1}  # corrupts the write of that number, from 0
    scatter = ipc_sender.scatter_blocks

    def faulty_scatter(kv_layer: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
        scatter(kv_layer, ids, src)
        if writes["count"] == writes["corrupt"]:  # a copy that went wrong on the way
            kv_layer[0, ids[:1]] += 1
        writes["count"] += 1

    ipc_sender.scatter_blocks = faulty_scatter  # type: ignore[assignment]
    tx = AutoKVSender(torch.device(DEVICE))
    while True:
        op, args = conn.recv()
        if op == "quit":
            tx.close()
            conn.send("bye")
            return
        if op == "transport_for":
            conn.send(tx.transport_for(args["kv_endpoint"]))
        elif op == "handoff":
            conn.send(_handoff(tx, conn, writes, **args))
        elif op == "prefill":
            conn.send(_prefill(tx, **args))


def _handoff(
    tx: AutoKVSender, conn: Connection, writes: dict[str, int], kv_endpoint: str, hid: str,
    shape: tuple[int, ...], num_layers: int, seed: int, dtype: str, corrupt: int | None = None,
    pause_before: int | None = None,
) -> tuple[str, str, str]:  # fmt: skip
    try:
        channel = tx.open(kv_endpoint, hid, num_layers)
    except HandoffError as exc:
        return "open failed", "", str(exc)
    transport = getattr(channel, "transport", "socket")
    if corrupt is not None:
        writes["corrupt"] = writes["count"] + corrupt
    for layer, data in enumerate(make_layers(seed, num_layers, shape, dtype)):
        if layer == pause_before:
            torch.cuda.synchronize()
            conn.send(("paused", transport, ""))
            conn.recv()
        try:
            channel.send_layer(layer, data.to(DEVICE))
        except HandoffError as exc:
            return "send failed", transport, str(exc)
    try:
        channel.finish(WAIT_S)
    except HandoffError as exc:
        return "failed", transport, str(exc)
    return "acked", transport, ""


def _prefill(tx: AutoKVSender, kv_endpoint: str, prompts: dict[str, list[int]]) -> dict:
    engine = Engine(EngineConfig(role=Role.PREFILL, **config()))
    pusher = KVPusher(engine)
    engine.export_hook = pusher
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    channels = {}
    for hid, prompt in prompts.items():
        channels[hid] = tx.open(kv_endpoint, hid, engine.model_config.num_layers)
        pusher.register(hid, channels[hid])
        engine.add_request(hid, prompt, params)
    first = {}
    while engine.has_work:
        for out in engine.step():
            first[out.request_id] = out.new_token_ids[0]
    for channel in channels.values():
        channel.finish(WAIT_S)
    transports = {getattr(c, "transport", "socket") for c in channels.values()}
    return {"first": first, "transports": transports}


class PrefillProcess:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def call(self, op: str, **args: Any) -> Any:
        self.conn.send((op, args))
        return self.recv()

    def recv(self) -> Any:
        assert self.conn.poll(300), "the prefill process did not answer"
        return self.conn.recv()

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("quit", {}))
            self.conn.poll(30)
            self.proc.join(30)


# ---- the decode side (this process) ----------------------------------------------------------


@pytest.fixture(scope="module")
def prefill() -> Iterator[PrefillProcess]:
    proc = PrefillProcess()
    yield proc
    proc.close()


class Decode:
    """A decode engine on DEVICE and the receiver make_receiver gives it (IPC, NCCL, TCP)."""

    def __init__(self, dtype: str = "float32") -> None:
        self.dtype = dtype
        self.engine = Engine(EngineConfig(role=Role.DECODE, **config(dtype)))
        self.rx = make_receiver(self.engine.device, "127.0.0.1", kv_cache=self.engine.kv_cache)
        assert isinstance(self.rx, MultiKVReceiver)
        self.endpoint = self.rx.start()

    def close(self) -> None:
        self.rx.close()
        self.engine.check_integrity()


@pytest.fixture
def decode() -> Iterator[Decode]:
    d = Decode()
    yield d
    d.close()


class Handoff:
    def __init__(self, d: Decode, num_tokens: int, seed: int) -> None:
        self.d, self.hid, self.seed = d, str(uuid.uuid4()), seed
        blocks = d.engine.reserve(self.hid, num_tokens)
        assert blocks is not None
        self.blocks = blocks
        cache = d.engine.kv_cache
        self.shape = (2, len(blocks), *cache.shape[3:])
        self.num_layers = d.engine.model_config.num_layers
        nbytes = layer_nbytes(d.engine, len(blocks))
        self.future: Future[HandoffResult] = d.rx.expect(
            self.hid, self.num_layers, nbytes, scatter_into(d.engine, blocks)
        )

    def args(self, **extra: Any) -> dict[str, Any]:
        return dict(kv_endpoint=self.d.endpoint, hid=self.hid, shape=self.shape, seed=self.seed,
                    num_layers=self.num_layers, dtype=self.d.dtype, **extra)  # fmt: skip

    def layer(self, layer: int) -> torch.Tensor:
        ids = torch.tensor(self.blocks, device=DEVICE)
        return gather_blocks(self.d.engine.kv_cache[layer], ids).cpu()

    def sent(self) -> list[torch.Tensor]:
        return make_layers(self.seed, self.num_layers, self.shape, self.d.dtype)

    def arrived_intact(self) -> bool:
        return all(torch.equal(self.layer(i), x) for i, x in enumerate(self.sent()))


def wait_for(condition: Any, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- tests -----------------------------------------------------------------------------------


def test_one_card_takes_ipc_and_never_nccl(decode: Decode, prefill: PrefillProcess) -> None:
    endpoints = split_endpoints(decode.endpoint)
    assert "ipc" in endpoints
    assert prefill.call("transport_for", kv_endpoint=decode.endpoint) == "ipc"
    without_ipc = ",".join(p for p in decode.endpoint.split(",") if not p.startswith("ipc://"))
    assert prefill.call("transport_for", kv_endpoint=without_ipc) == "tcp"  # same card: no NCCL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_handoffs_arrives_bit_identical(dtype: str, prefill: PrefillProcess) -> None:
    d = Decode(dtype)
    try:
        handoffs = [Handoff(d, n, seed) for seed, n in enumerate((1, 17, 300, 1000, 4800))]
        for h in handoffs:
            assert prefill.call("handoff", **h.args()) == ("acked", "ipc", "")
        for h in handoffs:
            result = h.future.result(WAIT_S)
            assert result.ok, result.error
            assert h.arrived_intact()
            assert d.engine.abort(h.hid)
    finally:
        d.close()


def test_a_corrupt_layer_is_nacked_and_never_delivered(decode, prefill) -> None:
    h = Handoff(decode, 100, seed=7)
    outcome, transport, error = prefill.call("handoff", **h.args(corrupt=1))
    assert (outcome, transport) == ("failed", "ipc") and "checksum mismatch on layer 1" in error
    result = h.future.result(WAIT_S)
    assert not result.ok and "checksum mismatch on layer 1" in result.error
    assert decode.engine.abort(h.hid)
    good = Handoff(decode, 100, seed=8)
    assert prefill.call("handoff", **good.args()) == ("acked", "ipc", "")
    assert good.future.result(WAIT_S).ok and good.arrived_intact()
    assert decode.engine.abort(good.hid)


def test_disaggregated_greedy_tokens_equal_aggregated(decode, prefill) -> None:
    prompts = {str(uuid.uuid4()): [3 + (7 * i + j) % 4000 for j in range(n)]
               for i, n in enumerate((1, 9, 60, 200, 480, 1000))}  # fmt: skip
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    aggregated = Engine(EngineConfig(**config()))
    expected: dict[str, list[int]] = {hid: [] for hid in prompts}
    for hid, prompt in prompts.items():
        aggregated.add_request(hid, prompt, params)
    while aggregated.has_work:
        for out in aggregated.step():
            expected[out.request_id] += out.new_token_ids
    del aggregated

    engine = decode.engine
    futures = {}
    for hid, prompt in prompts.items():
        blocks = engine.reserve(hid, len(prompt))
        assert blocks is not None
        nbytes = layer_nbytes(engine, len(blocks))
        futures[hid] = decode.rx.expect(
            hid, engine.model_config.num_layers, nbytes, scatter_into(engine, blocks)
        )
    done = prefill.call("prefill", kv_endpoint=decode.endpoint, prompts=prompts)
    assert done["transports"] == {"ipc"}
    for hid, prompt in prompts.items():
        assert futures[hid].result(WAIT_S).ok
        engine.commit(hid, prompt, done["first"][hid], params)
    got = {hid: [done["first"][hid]] for hid in prompts}
    while engine.has_work:
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
    assert got == expected


def test_a_prefill_killed_mid_handoff_leaves_the_decode_healthy(decode: Decode) -> None:
    engine = decode.engine
    victim = PrefillProcess()
    try:
        h = Handoff(decode, 2000, seed=21)
        half = h.num_layers // 2
        victim.conn.send(("handoff", h.args(pause_before=half)))
        assert victim.recv() == ("paused", "ipc", "")
        assert wait_for(lambda: torch.equal(h.layer(half - 1), h.sent()[half - 1]))
        victim.kill()
        result = h.future.result(WAIT_S)
        assert not result.ok and result.error == "sender disconnected mid-handoff"
        assert engine.abort(h.hid)
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        victim.close()
    other = PrefillProcess()  # maps the cache afresh and writes the same blocks
    try:
        again = Handoff(decode, engine.pool.num_free * engine.config.block_size, seed=22)
        assert set(h.blocks) <= set(again.blocks)
        assert other.call("handoff", **again.args()) == ("acked", "ipc", "")
        assert again.future.result(WAIT_S).ok and again.arrived_intact()
        assert engine.abort(again.hid)
    finally:
        other.close()
