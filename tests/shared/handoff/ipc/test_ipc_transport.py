"""The IPC KV transport on a CPU host, between real processes: the decode engine (its KV cache in
a shared memory file) and the receiver run here; prefill senders run in spawned processes that
map that cache and write the reserved blocks themselves, over real loopback sockets."""

from __future__ import annotations

import time
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
    make_layers,
    wait_for,
)

from kvmesh.kernels.block_copy import gather_blocks_ref
from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.engine.shared_memory import shared_file
from kvmesh.shared.handoff.auto import AutoKVSender, MultiKVReceiver, make_receiver, split_endpoints
from kvmesh.shared.handoff.ipc import IpcKVReceiver
from kvmesh.shared.handoff.ipc import receiver as ipc_receiver
from kvmesh.shared.handoff.kv_io import layer_nbytes
from kvmesh.shared.handoff.locality import Place, here, tag
from kvmesh.shared.handoff.tcp import SocketKVReceiver
from kvmesh.shared.handoff.transport import HandoffError

CPU = torch.device("cpu")
CONFIG: dict[str, Any] = dict(
    model="synthetic:tiny", block_size=4, num_blocks=48, max_num_batched_tokens=64
)
WAIT_S = 30.0


def sender_process() -> PeerProcess:
    """A spawned prefill process on the host (IPC through the decode's shared memory file)."""
    return PeerProcess("cpu", CONFIG, WAIT_S, answer_s=2 * WAIT_S)


@pytest.fixture(scope="module")
def sender() -> Iterator[PeerProcess]:
    proc = sender_process()
    yield proc
    proc.close()


@pytest.fixture
def decode() -> Iterator[Engine]:
    engine = Engine(EngineConfig(role=Role.DECODE, **CONFIG))
    yield engine
    engine.check_integrity()


@pytest.fixture
def receiver(decode: Engine) -> Iterator[MultiKVReceiver]:
    rx = make_receiver(CPU, "127.0.0.1", kv_cache=decode.kv_cache)
    assert isinstance(rx, MultiKVReceiver)
    yield rx
    rx.close()


# ---- tests -----------------------------------------------------------------------------------


def test_a_decode_engine_keeps_its_kv_cache_in_shared_memory(decode: Engine) -> None:
    assert shared_file(decode.kv_cache) is not None
    assert shared_file(decode.kv_cache[1]) is not None  # a view: the same file
    prefill = Engine(EngineConfig(role=Role.PREFILL, **CONFIG))
    assert shared_file(prefill.kv_cache) is None


def test_a_batch_of_handoffs_arrives_bit_identical(receiver, decode, sender) -> None:
    endpoint = receiver.start()
    assert split_endpoints(endpoint).keys() == {"ipc", "tcp"}
    handoffs = [Handoff(decode, receiver, n, seed) for seed, n in enumerate((1, 7, 16, 29))]
    for h in handoffs:
        assert sender.call("handoff", **h.args(endpoint)) == ("acked", "ipc", "")
    for h in handoffs:
        result = h.future.result(WAIT_S)
        assert result.ok, result.error
        assert result.nbytes == h.num_layers * layer_nbytes(decode, len(h.blocks))
        assert h.arrived_intact()
        h.release()
    assert decode.pool.num_free == decode.pool.num_blocks


def test_a_corrupt_layer_is_nacked_and_never_delivered(receiver, decode, sender) -> None:
    endpoint = receiver.start()
    h = Handoff(decode, receiver, 9, seed=11)
    outcome, transport, error = sender.call("handoff", **h.args(endpoint, corrupt=1))
    assert (outcome, transport) == ("failed", "ipc")
    assert "checksum mismatch on layer 1" in error
    result = h.future.result(WAIT_S)
    assert not result.ok and "checksum mismatch on layer 1" in result.error
    h.release()
    # the receiver goes on: the next handoff on the same connection arrives intact
    good = Handoff(decode, receiver, 9, seed=12)
    assert sender.call("handoff", **good.args(endpoint)) == ("acked", "ipc", "")
    assert good.future.result(WAIT_S).ok and good.arrived_intact()
    good.release()


def test_an_unexpected_handoff_is_rejected_and_nothing_is_written(decode, sender) -> None:
    rx = IpcKVReceiver(decode.kv_cache)
    endpoint = tag(rx.start(), here(CPU))  # IPC only: no other transport to fall back to
    try:
        before = decode.kv_cache.clone()
        shape = (2, 3, *decode.kv_cache.shape[3:])
        args = dict(kv_endpoint=endpoint, hid=str(uuid.uuid4()), shape=shape, num_layers=2, seed=3)
        outcome, _, error = sender.call("handoff", **args)
        assert outcome == "open failed" and "handoff not expected" in error
        assert torch.equal(decode.kv_cache, before)
    finally:
        rx.close()


def test_cancel_waits_until_the_sender_stopped_writing(receiver, decode, sender) -> None:
    endpoint = receiver.start()
    h = Handoff(decode, receiver, 12, seed=5)
    sender.conn.send(("handoff", h.args(endpoint, pause_before=1)))
    assert sender.recv() == ("paused", "ipc", "")
    assert wait_for(lambda: torch.equal(h.layer(0), h.sent()[0]), WAIT_S)
    start = time.monotonic()
    receiver.cancel(h.hid)
    assert time.monotonic() - start < ipc_receiver.FENCE_TIMEOUT_S  # its ABORT came
    assert h.future.result(0).error == "cancelled"
    sender.conn.send("go")
    outcome, _, error = sender.recv()
    assert outcome == "send failed" and "rejected" in error
    assert not h.layer(1).any()  # layer 1 was never written
    h.release()


def test_a_sender_killed_mid_handoff_leaves_the_decode_side_healthy(receiver, decode) -> None:
    endpoint = receiver.start()
    victim = sender_process()
    try:
        h = Handoff(decode, receiver, 20, seed=8)
        victim.conn.send(("handoff", h.args(endpoint, pause_before=1)))
        assert victim.recv() == ("paused", "ipc", "")
        assert wait_for(lambda: torch.equal(h.layer(0), h.sent()[0]), WAIT_S)
        victim.kill()
        result = h.future.result(WAIT_S)
        assert not result.ok and result.error == "sender disconnected mid-handoff"
        h.release()
        assert decode.pool.num_free == decode.pool.num_blocks
    finally:
        victim.close()
    # the receiver serves the next sender, into the blocks the dead one had
    other = sender_process()
    try:
        every_block = decode.pool.num_free * CONFIG["block_size"]
        again = Handoff(decode, receiver, every_block, seed=9)
        assert set(h.blocks) <= set(again.blocks)
        assert other.call("handoff", **again.args(endpoint)) == ("acked", "ipc", "")
        assert again.future.result(WAIT_S).ok and again.arrived_intact()
        again.release()
    finally:
        other.close()


def test_disaggregated_engines_over_ipc_match_aggregated(receiver, decode, sender) -> None:
    """A prefill engine in another process -> KVPusher -> IPC -> this decode engine."""
    prompts = {str(uuid.uuid4()): [3 + (7 * i + j) % 50 for j in range(n)]
               for i, n in enumerate((1, 5, 13, 30))}  # fmt: skip
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = greedy(CONFIG, prompts, params)
    endpoint = receiver.start()
    futures = expect_prompts(decode, receiver, prompts)
    done = sender.call("prefill", kv_endpoint=endpoint, prompts=prompts, max_tokens=6)
    assert done["transports"] == {"ipc"}
    assert done["free"] == CONFIG["num_blocks"]
    assert decode_after(decode, prompts, done["first"], futures, params, WAIT_S) == expected


def test_a_receiver_on_another_host_is_never_sent_ipc(decode) -> None:
    elsewhere = Place("0" * 16, "cpu")
    ipc = IpcKVReceiver(decode.kv_cache)
    rx = MultiKVReceiver([ipc, SocketKVReceiver()], elsewhere)
    endpoint = rx.start()
    tx = AutoKVSender(CPU)
    try:
        assert "host=" + "0" * 16 in endpoint.split(",")[0]
        assert tx.transport_for(endpoint) == "tcp"
        hid = str(uuid.uuid4())
        got = rx.expect(hid, 1, 16, lambda layer, payload: None)
        channel = tx.open(endpoint, hid, 1)
        assert getattr(channel, "transport", "socket") == "socket"
        channel.send_layer(0, torch.arange(4, dtype=torch.int32))
        channel.finish(WAIT_S)
        assert got.result(WAIT_S).ok
        with pytest.raises(HandoffError, match="IPC: the receiver is on another host"):
            tx.open(split_endpoints(endpoint)["ipc"] + "?host=" + "0" * 16 + "&dev=cpu",
                    str(uuid.uuid4()), 1)  # fmt: skip
        assert ipc.num_senders == 0  # never even connected
    finally:
        tx.close()
        rx.close()
    # the same receiver on this host
    local = MultiKVReceiver([IpcKVReceiver(decode.kv_cache)], here(CPU))
    try:
        assert AutoKVSender(CPU).transport_for(local.start()) == "ipc"
    finally:
        local.close()


class SlowBlocks:
    """A receiver callback whose block ids take a while to read: a receiver slow to answer."""

    def __init__(self, block_ids: list[int], delay: float) -> None:
        self._ids, self.delay = block_ids, delay

    @property
    def block_ids(self) -> list[int]:
        time.sleep(self.delay)
        return self._ids

    def __call__(self, layer: int, payload: torch.Tensor) -> None:
        raise AssertionError("the IPC transport writes the blocks itself")


def test_a_begin_given_up_is_aborted_and_its_late_answer_ignored(decode) -> None:
    from kvmesh.shared.handoff.ipc import IpcKVSender

    rx = IpcKVReceiver(decode.kv_cache)
    endpoint = rx.start()
    tx = IpcKVSender(CPU, reply_timeout=0.2)
    try:
        nbytes = layer_nbytes(decode, 2)
        slow = str(uuid.uuid4())
        future = rx.expect(slow, 2, nbytes, SlowBlocks([1, 2], delay=1.0))
        with pytest.raises(HandoffError, match="did not answer BEGIN"):
            tx.open(endpoint, slow, 2)
        result = future.result(WAIT_S)  # the sender's ABORT fenced it: nothing is written
        assert not result.ok and "aborted by sender" in result.error
        # the late BLOCKS (sent before the ABORT was read) left the connection alone
        time.sleep(0.3)
        assert tx.connected(endpoint)
        hid = str(uuid.uuid4())
        done = rx.expect(hid, 2, nbytes, SlowBlocks([3, 4], delay=0.0))
        channel = tx.open(endpoint, hid, 2)
        layers = make_layers(4, 2, (2, 2, *decode.kv_cache.shape[3:]))
        for i, layer in enumerate(layers):
            channel.send_layer(i, layer)
        channel.finish(WAIT_S)
        assert done.result(WAIT_S).ok and rx.num_senders == 1
        ids = torch.tensor([3, 4])
        assert all(torch.equal(gather_blocks_ref(decode.kv_cache[i], ids), x)
                   for i, x in enumerate(layers))  # fmt: skip
    finally:
        tx.close()
        rx.close()
