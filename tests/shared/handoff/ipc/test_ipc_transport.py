"""The IPC KV transport on a CPU host, between real processes: the decode engine (its KV cache in
a shared memory file) and the receiver run here; prefill senders run in spawned processes that
map that cache and write the reserved blocks themselves, over real loopback sockets."""

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

from kvmesh.kernels.block_copy import gather_blocks_ref
from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.engine.shared_memory import shared_file
from kvmesh.shared.handoff.auto import AutoKVSender, MultiKVReceiver, make_receiver, split_endpoints
from kvmesh.shared.handoff.ipc import IpcKVReceiver
from kvmesh.shared.handoff.ipc import receiver as ipc_receiver
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.locality import Place, here, tag
from kvmesh.shared.handoff.tcp import SocketKVReceiver
from kvmesh.shared.handoff.transport import HandoffError, HandoffResult

CPU = torch.device("cpu")
CONFIG: dict[str, Any] = dict(
    model="synthetic:tiny", block_size=4, num_blocks=48, max_num_batched_tokens=64
)
WAIT_S = 30.0


# ---- the sender process ----------------------------------------------------------------------


def make_layers(seed: int, num_layers: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The KV a sender pushes for one handoff: the same for the same seed, in any process."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(num_layers)]


def sender_main(conn: Connection) -> None:
    """A prefill process: runs the test's commands with an AutoKVSender (IPC where it can)."""
    torch.set_num_threads(1)
    from kvmesh.shared.handoff.ipc import sender as ipc_sender

    writes = {"count": 0, "corrupt": -1}  # corrupts the write of that number, counting from 0
    scatter = ipc_sender.scatter_blocks_ref

    def faulty_scatter(kv_layer: torch.Tensor, ids: torch.Tensor, src: torch.Tensor) -> None:
        scatter(kv_layer, ids, src)
        if writes["count"] == writes["corrupt"]:  # a copy that went wrong on the way
            kv_layer[0, int(ids[0])].view(-1)[0] += 1.0
        writes["count"] += 1

    ipc_sender.scatter_blocks_ref = faulty_scatter  # type: ignore[assignment]
    tx = AutoKVSender(CPU)
    while True:
        op, args = conn.recv()
        if op == "quit":
            tx.close()
            conn.send("bye")
            return
        if op == "handoff":
            conn.send(_handoff(tx, conn, writes, **args))
        elif op == "prefill":
            conn.send(_prefill(tx, **args))


def _handoff(
    tx: AutoKVSender, conn: Connection, writes: dict[str, int], kv_endpoint: str, hid: str,
    shape: tuple[int, ...], num_layers: int, seed: int, corrupt: int | None = None,
    pause_before: int | None = None,
) -> tuple[str, str, str]:  # fmt: skip
    """Push one handoff: (outcome, transport, error). `corrupt`: that layer's copy goes wrong;
    `pause_before`: report 'paused' before that layer, then wait for the test's word."""
    try:
        channel = tx.open(kv_endpoint, hid, num_layers)
    except HandoffError as exc:
        return "open failed", "", str(exc)
    transport = getattr(channel, "transport", "socket")
    if corrupt is not None:
        writes["corrupt"] = writes["count"] + corrupt
    for layer, data in enumerate(make_layers(seed, num_layers, shape)):
        if layer == pause_before:
            conn.send(("paused", transport, ""))
            conn.recv()
        try:
            channel.send_layer(layer, data)
        except HandoffError as exc:
            return "send failed", transport, str(exc)
    try:
        channel.finish(WAIT_S)
    except HandoffError as exc:
        return "failed", transport, str(exc)
    return "acked", transport, ""


def _prefill(tx: AutoKVSender, kv_endpoint: str, prompts: dict[str, list[int]]) -> dict:
    """Prefill the prompts on an engine of this process, pushing their KV: first tokens."""
    engine = Engine(EngineConfig(role=Role.PREFILL, **CONFIG))
    pusher = KVPusher(engine)
    engine.export_hook = pusher
    params = SamplingParams(max_tokens=6, ignore_eos=True)
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
    return {"first": first, "transports": transports, "free": engine.pool.num_free}


class SenderProcess:
    """A spawned prefill process and its command pipe."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=sender_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def call(self, op: str, **args: Any) -> Any:
        self.conn.send((op, args))
        return self.recv()

    def recv(self) -> Any:
        assert self.conn.poll(60), "the sender process did not answer"
        return self.conn.recv()

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("quit", {}))
            self.conn.poll(10)
            self.proc.join(10)


# ---- the decode side -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sender() -> Iterator[SenderProcess]:
    proc = SenderProcess()
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


class Handoff:
    """A handoff the decode engine reserved blocks for and the receiver expects."""

    def __init__(self, decode: Engine, rx: Any, num_tokens: int, seed: int) -> None:
        self.decode, self.hid, self.seed = decode, str(uuid.uuid4()), seed
        blocks = decode.reserve(self.hid, num_tokens)
        assert blocks is not None
        self.blocks = blocks
        self.shape = (2, len(blocks), *decode.kv_cache.shape[3:])
        self.num_layers = decode.model_config.num_layers
        nbytes = layer_nbytes(decode, len(blocks))
        self.future: Future[HandoffResult] = rx.expect(
            self.hid, self.num_layers, nbytes, scatter_into(decode, blocks)
        )

    def args(self, kv_endpoint: str, **extra: Any) -> dict[str, Any]:
        return dict(kv_endpoint=kv_endpoint, hid=self.hid, shape=self.shape,
                    num_layers=self.num_layers, seed=self.seed, **extra)  # fmt: skip

    def layer(self, layer: int) -> torch.Tensor:
        """What the decode cache holds in this handoff's blocks of `layer`."""
        ids = torch.tensor(self.blocks)
        return gather_blocks_ref(self.decode.kv_cache[layer], ids)

    def arrived_intact(self) -> bool:
        sent = make_layers(self.seed, self.num_layers, self.shape)
        return all(torch.equal(self.layer(i), sent[i]) for i in range(self.num_layers))

    def release(self) -> None:
        """What decode does with a handoff that will not be decoded: its blocks go back."""
        assert self.decode.abort(self.hid)


def wait_for(condition: Any, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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
    assert wait_for(lambda: torch.equal(h.layer(0), make_layers(5, h.num_layers, h.shape)[0]))
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
    victim = SenderProcess()
    try:
        h = Handoff(decode, receiver, 20, seed=8)
        victim.conn.send(("handoff", h.args(endpoint, pause_before=1)))
        assert victim.recv() == ("paused", "ipc", "")
        assert wait_for(lambda: torch.equal(h.layer(0), make_layers(8, h.num_layers, h.shape)[0]))
        victim.kill()
        result = h.future.result(WAIT_S)
        assert not result.ok and result.error == "sender disconnected mid-handoff"
        h.release()
        assert decode.pool.num_free == decode.pool.num_blocks
    finally:
        victim.close()
    # the receiver serves the next sender, into the blocks the dead one had
    other = SenderProcess()
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
    aggregated = Engine(EngineConfig(**CONFIG))
    expected: dict[str, list[int]] = {hid: [] for hid in prompts}
    for hid, prompt in prompts.items():
        aggregated.add_request(hid, prompt, params)
    while aggregated.has_work:
        for out in aggregated.step():
            expected[out.request_id] += out.new_token_ids

    endpoint = receiver.start()
    layers = decode.model_config.num_layers
    futures = {}
    for hid, prompt in prompts.items():
        blocks = decode.reserve(hid, len(prompt))
        assert blocks is not None
        nbytes = layer_nbytes(decode, len(blocks))
        futures[hid] = receiver.expect(hid, layers, nbytes, scatter_into(decode, blocks))
    done = sender.call("prefill", kv_endpoint=endpoint, prompts=prompts)
    assert done["transports"] == {"ipc"}
    assert done["free"] == CONFIG["num_blocks"]
    for hid, prompt in prompts.items():
        assert futures[hid].result(WAIT_S).ok
        decode.commit(hid, prompt, done["first"][hid], params)
    got = {hid: [done["first"][hid]] for hid in prompts}
    while decode.has_work:
        for out in decode.step():
            got[out.request_id] += out.new_token_ids
    assert got == expected


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
