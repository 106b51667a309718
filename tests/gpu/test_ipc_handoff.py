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

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from handoff_peer import (
    Handoff,
    PeerProcess,
    decode_after,
    expect_prompts,
    greedy,
    wait_for,
)

from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.handoff.auto import MultiKVReceiver, make_receiver, split_endpoints

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

DEVICE = "cuda:0"  # both processes, also on a machine with several cards
MODEL = "synthetic:smollm2-135m"
WAIT_S = 60.0


def config(dtype: str = "float32") -> dict[str, Any]:
    return dict(model=MODEL, device=DEVICE, dtype=dtype, block_size=16, num_blocks=512,
                max_num_batched_tokens=2048, max_num_seqs=64)  # fmt: skip


def prefill_process() -> PeerProcess:
    """A spawned prefill process on DEVICE (IPC through the decode's exported cache)."""
    return PeerProcess(DEVICE, config(), WAIT_S, answer_s=300)


@pytest.fixture(scope="module")
def prefill() -> Iterator[PeerProcess]:
    proc = prefill_process()
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

    def handoff(self, num_tokens: int, seed: int) -> Handoff:
        return Handoff(self.engine, self.rx, num_tokens, seed, self.dtype)

    def close(self) -> None:
        self.rx.close()
        self.engine.check_integrity()


@pytest.fixture
def decode() -> Iterator[Decode]:
    d = Decode()
    yield d
    d.close()


# ---- tests -----------------------------------------------------------------------------------


def test_one_card_takes_ipc_and_never_nccl(decode: Decode, prefill: PeerProcess) -> None:
    endpoints = split_endpoints(decode.endpoint)
    assert "ipc" in endpoints
    assert prefill.call("transport_for", kv_endpoint=decode.endpoint) == "ipc"
    without_ipc = ",".join(p for p in decode.endpoint.split(",") if not p.startswith("ipc://"))
    assert prefill.call("transport_for", kv_endpoint=without_ipc) == "tcp"  # same card: no NCCL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_handoffs_arrives_bit_identical(dtype: str, prefill: PeerProcess) -> None:
    d = Decode(dtype)
    try:
        handoffs = [d.handoff(n, seed) for seed, n in enumerate((1, 17, 300, 1000, 4800))]
        for h in handoffs:
            assert prefill.call("handoff", **h.args(d.endpoint)) == ("acked", "ipc", "")
        for h in handoffs:
            result = h.future.result(WAIT_S)
            assert result.ok, result.error
            assert h.arrived_intact()
            h.release()
    finally:
        d.close()


def test_a_corrupt_layer_is_nacked_and_never_delivered(decode, prefill) -> None:
    h = decode.handoff(100, seed=7)
    outcome, transport, error = prefill.call("handoff", **h.args(decode.endpoint, corrupt=1))
    assert (outcome, transport) == ("failed", "ipc") and "checksum mismatch on layer 1" in error
    result = h.future.result(WAIT_S)
    assert not result.ok and "checksum mismatch on layer 1" in result.error
    h.release()
    good = decode.handoff(100, seed=8)
    assert prefill.call("handoff", **good.args(decode.endpoint)) == ("acked", "ipc", "")
    assert good.future.result(WAIT_S).ok and good.arrived_intact()
    good.release()


def test_disaggregated_greedy_tokens_equal_aggregated(decode, prefill) -> None:
    prompts = {str(uuid.uuid4()): [3 + (7 * i + j) % 4000 for j in range(n)]
               for i, n in enumerate((1, 9, 60, 200, 480, 1000))}  # fmt: skip
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    expected = greedy(config(), prompts, params)
    futures = expect_prompts(decode.engine, decode.rx, prompts)
    done = prefill.call("prefill", kv_endpoint=decode.endpoint, prompts=prompts, max_tokens=16)
    assert done["transports"] == {"ipc"}
    got = decode_after(decode.engine, prompts, done["first"], futures, params, WAIT_S)
    assert got == expected


def test_a_prefill_killed_mid_handoff_leaves_the_decode_healthy(decode: Decode) -> None:
    engine = decode.engine
    victim = prefill_process()
    try:
        h = decode.handoff(2000, seed=21)
        half = h.num_layers // 2
        victim.conn.send(("handoff", h.args(decode.endpoint, pause_before=half)))
        assert victim.recv() == ("paused", "ipc", "")
        assert wait_for(lambda: torch.equal(h.layer(half - 1), h.sent()[half - 1]), WAIT_S)
        victim.kill()
        result = h.future.result(WAIT_S)
        assert not result.ok and result.error == "sender disconnected mid-handoff"
        h.release()
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        victim.close()
    other = prefill_process()  # maps the cache afresh and writes the same blocks
    try:
        again = decode.handoff(engine.pool.num_free * engine.config.block_size, seed=22)
        assert set(h.blocks) <= set(again.blocks)
        assert other.call("handoff", **again.args(decode.endpoint)) == ("acked", "ipc", "")
        assert again.future.result(WAIT_S).ok and again.arrived_intact()
        again.release()
    finally:
        other.close()
