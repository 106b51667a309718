"""The NCCL transport on a CPU host: its control protocol (handshake, layer order, checksums,
NACK, peer death, the pair cache) runs over an in-process loopback payload path; a pair's unique
id travels over real gRPC on loopback (Decode.OpenKVLink, the rendezvous). The binding's own
tests: test_binding.py; the choice of transport: ../test_auto.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import socket
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import Any

import grpc
import pytest
import torch
from handoff_peer import decode_after, expect_prompts, greedy, push_prefill, wait_for

from kvmesh.shared.handoff.auto import MultiKVReceiver, split_endpoints
from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl import pair as nccl_pair
from kvmesh.shared.handoff.nccl import receiver as nccl_receiver
from kvmesh.shared.handoff.nccl import sender as nccl_sender
from kvmesh.shared.handoff.nccl.channel import NcclSendChannel, send_layer_group, send_layer_runs
from kvmesh.shared.handoff.nccl.frames import (
    NO_ID,
    NcclFrameKind,
    message,
    pack,
    parse_nccl_endpoint,
    read_frame,
    read_payload,
)
from kvmesh.shared.handoff.nccl.link import (
    GrpcLinkOpener,
    LinkRefused,
    Rendezvous,
    offer_link,
    serve_links,
)
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender
from kvmesh.shared.handoff.nccl.staging import StagingPool, size_class
from kvmesh.shared.handoff.nccl.streams import DeviceStreams, Event, latest
from kvmesh.shared.handoff.tcp.receiver import SocketKVReceiver
from kvmesh.shared.handoff.timeline import WHOLE, Timeline, by_layer
from kvmesh.shared.handoff.transport import HandoffError, HandoffResult

SHAPE = (2, 3, 16, 2, 8)  # [2 (k, v), n_blocks, block_size, kv_heads, head_dim]
CPU = torch.device("cpu")


# ---- the NCCL transport over a loopback payload path ---------------------------------------


class LoopbackComm:
    """A PairComm whose sends land in a queue the peer's recvs read, in order. A recv blocks
    until its send comes, or fails once either rank was aborted (NCCL's recv kernel would wait
    on the GPU until the receiver aborts its communicator)."""

    def __init__(self, fabric: LoopbackFabric, unique_id: bytes, rank: int) -> None:
        self.fabric, self.rank, self.unique_id = fabric, rank, unique_id
        self.pipe = fabric.pipe(unique_id)
        self.closed = self.aborted = False

    def init(self) -> None:
        pass

    def send(self, data: torch.Tensor, peer: int, stream: object) -> None:
        self.pipe.put(data.reshape(-1).view(torch.uint8).clone())  # NCCL moves the bytes
        self.fabric.opened.sends += 1
        self.fabric.sent.append(data.numel() * data.element_size())
        self.fabric.on_send(data)

    def recv(self, data: torch.Tensor, peer: int, stream: object) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                got = self.pipe.get(timeout=0.01)
                break
            except queue.Empty:
                pair = [c for c in self.fabric.comms if c.unique_id == self.unique_id]
                if any(c.aborted for c in pair) or time.monotonic() > deadline:
                    raise nccl.NcclError("ncclRecv", 6, "the pair was aborted") from None
        data.copy_(self.fabric.corrupt(got))
        self.fabric.opened.group.append(data.numel())

    def check(self) -> None:
        pass

    def abort(self) -> None:
        self.closed = self.aborted = True


class LocalLinks:
    """A LinkOpener for receivers in this process: hands a pair's unique id straight to the
    receiver behind the pair's endpoint, as Decode.OpenKVLink does over gRPC (tested over real
    gRPC at the end of this file)."""

    def __init__(self) -> None:
        self.receivers: dict[str, object] = {}
        self.opened: list[str] = []  # link ids, in order

    def add(self, endpoint: str, receiver: object) -> str:
        self.receivers[endpoint] = receiver
        return endpoint

    def __call__(
        self, decode_address: str, endpoint: str, link_id: str, unique_id: bytes, timeout: float
    ) -> None:
        self.opened.append(link_id)
        try:
            offer_link(self.receivers.get(endpoint), link_id, unique_id)
        except LinkRefused as exc:
            raise HandoffError(f"OpenKVLink refused: {exc}") from exc


class LoopbackFabric:
    def __init__(self) -> None:
        self.links = LocalLinks()  # the receivers of this fabric, by endpoint
        self._pipes: dict[bytes, queue.Queue[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.comms: list[LoopbackComm] = []
        self.corrupt: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        self.on_send: Callable[[torch.Tensor], None] = lambda t: None  # after each send
        self.recv_groups: list[list[int]] = []  # bytes of each recv, per group of recvs
        self.send_groups: list[int] = []  # sends per group of sends
        self.sent: list[int] = []  # bytes of each send
        self.opened = threading.local()  # .group, .sends: this thread's open group's ops

    def unique_id(self) -> bytes:
        return os.urandom(nccl.UNIQUE_ID_BYTES)

    def pipe(self, unique_id: bytes) -> queue.Queue[torch.Tensor]:
        with self._lock:
            return self._pipes.setdefault(unique_id, queue.Queue())

    def communicator(self, unique_id: bytes, rank: int) -> LoopbackComm:
        comm = LoopbackComm(self, unique_id, rank)
        self.comms.append(comm)
        return comm

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        self.opened.group, self.opened.sends = [], 0
        yield
        if self.opened.group:
            self.recv_groups.append(self.opened.group)
        if self.opened.sends:
            self.send_groups.append(self.opened.sends)


@pytest.fixture
def fabric() -> LoopbackFabric:
    return LoopbackFabric()


@pytest.fixture
def receiver(fabric: LoopbackFabric) -> Iterator[NcclKVReceiver]:
    rx = NcclKVReceiver(CPU, fabric=fabric)
    rx.endpoint = fabric.links.add(rx.start(), rx)  # type: ignore[attr-defined]
    yield rx
    rx.close()


@pytest.fixture
def sender(fabric: LoopbackFabric) -> Iterator[NcclKVSender]:
    tx = NcclKVSender(CPU, fabric=fabric, links=fabric.links)
    yield tx
    tx.close()


def collect(store: dict[int, torch.Tensor]) -> Callable[[int, torch.Tensor], None]:
    return lambda layer, payload: store.__setitem__(layer, payload.clone())


def layers(n: int, shape: tuple[int, ...] = SHAPE) -> list[torch.Tensor]:
    return [torch.randn(shape).to(torch.bfloat16) for _ in range(n)]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def open_handoff(
    receiver: NcclKVReceiver, sender: NcclKVSender, num_layers: int, layer_nbytes: int
) -> tuple[str, Future[HandoffResult], NcclSendChannel, dict[int, torch.Tensor]]:
    """A new handoff the receiver expects, its layers collected into a store, and the sender's
    channel for it: (handoff id, the receiver's future, the channel, the store)."""
    store: dict[int, torch.Tensor] = {}
    hid = str(uuid.uuid4())
    future = receiver.expect(hid, num_layers, layer_nbytes, collect(store))
    return hid, future, sender.open(receiver.endpoint, hid, num_layers), store


def test_a_batch_of_handoffs_arrives_bit_identical(receiver, sender, fabric) -> None:
    shapes = [SHAPE, (2, 1, 16, 2, 8), (2, 7, 16, 2, 8)]  # a mixed batch
    data = {str(uuid.uuid4()): layers(4, s) for s in shapes}
    stores: dict[str, dict[int, torch.Tensor]] = {hid: {} for hid in data}
    futures = {
        hid: receiver.expect(hid, 4, nbytes(kv[0]), collect(stores[hid]))
        for hid, kv in data.items()
    }
    channels = {hid: sender.open(receiver.endpoint, hid, 4) for hid in data}
    for layer in range(4):
        assert send_layer_group(layer, [(channels[h], kv[layer]) for h, kv in data.items()]) == []
    for hid, kv in data.items():
        stats = channels[hid].finish(10)
        result = futures[hid].result(10)
        assert result.ok and result.nbytes == stats.nbytes == 4 * nbytes(kv[0])
        for layer in range(4):
            assert torch.equal(stores[hid][layer], kv[layer].view(torch.uint8).reshape(-1))
    assert sender.peers == [receiver.endpoint]
    assert len(fabric.comms) == 2  # one pair, both ranks, reused by every handoff


def test_a_corrupt_layer_is_nacked_and_never_delivered(receiver, sender, fabric) -> None:
    kv = layers(3)
    hid, future, channel, store = open_handoff(receiver, sender, 3, nbytes(kv[0]))
    bad = kv[1].view(torch.uint8).reshape(-1)

    def flip(t: torch.Tensor) -> torch.Tensor:  # layer 1's bytes, nothing else
        if not torch.equal(t, bad):
            return t
        t = t.clone()
        t[5] ^= 1
        return t

    fabric.corrupt = flip
    for layer in range(3):
        channel.send_layer(layer, kv[layer])
    with pytest.raises(HandoffError, match="checksum mismatch on layer 1"):
        channel.finish(10)
    result = future.result(10)
    assert not result.ok and "checksum mismatch on layer 1" in result.error
    assert 1 not in store and 2 not in store  # layer 0 may have been delivered before
    fabric.corrupt = lambda t: t
    assert_pair_still_works(receiver, sender)


def test_an_unexpected_handoff_is_rejected_and_the_pair_stays_in_order(receiver, sender) -> None:
    channel = sender.open(receiver.endpoint, str(uuid.uuid4()), 2)
    channel.send_layer(0, layers(1)[0])
    assert wait_for(lambda: channel.failed)
    with pytest.raises(HandoffError, match="not expected"):
        channel.send_layer(1, layers(1)[0])
    assert_pair_still_works(receiver, sender)


def test_a_wrong_size_is_rejected(receiver, sender) -> None:
    hid, future, channel, _ = open_handoff(receiver, sender, 1, 999)
    channel.send_layer(0, layers(1)[0])
    with pytest.raises(HandoffError, match="bytes != expected 999"):
        channel.finish(10)
    assert "bytes != expected 999" in future.result(10).error


def test_finish_leaves_the_per_layer_times_until_they_are_read(
    receiver, sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finish() returns once the ACK came; the per-layer send times (a CUDA event query and
    elapsed time per send on a GPU) are worked out when the caller first reads them."""
    timed: list[Event] = []
    seconds_until = Event.seconds_until

    def spy(self: Event, later: Event) -> float:
        timed.append(self)
        return seconds_until(self, later)

    monkeypatch.setattr(Event, "seconds_until", spy)
    kv = layers(3)
    _, future, channel, _ = open_handoff(receiver, sender, 3, nbytes(kv[0]))
    for layer in range(3):
        channel.send_layer(layer, kv[layer])
    stats = channel.finish(10)
    assert future.result(10).ok and stats.nbytes == 3 * nbytes(kv[0])
    assert timed == []
    assert len(stats.layer_seconds) == 3 and all(s >= 0 for s in stats.layer_seconds)
    assert timed and stats.layer_seconds is stats.layer_seconds  # worked out once


def test_sender_abort_fails_the_receiving_side(receiver, sender) -> None:
    hid, future, channel, _ = open_handoff(receiver, sender, 2, nbytes(layers(1)[0]))
    channel.send_layer(0, layers(1)[0])
    channel.abort("prefill cancelled")
    result = future.result(10)
    assert not result.ok and "aborted by sender: prefill cancelled" in result.error
    assert_pair_still_works(receiver, sender)


def test_a_dead_receiver_fails_the_handoff_and_tears_the_pair_down(fabric, sender) -> None:
    rx = NcclKVReceiver(CPU, fabric=fabric)
    endpoint = fabric.links.add(rx.start(), rx)
    hid = str(uuid.uuid4())
    rx.expect(hid, 4, nbytes(layers(1)[0]), collect({}))
    channel = sender.open(endpoint, hid, 4)
    channel.send_layer(0, layers(1)[0])
    rx.close()  # the decode worker goes away mid-handoff
    assert wait_for(lambda: channel.failed)
    with pytest.raises(HandoffError, match="connection to .* lost"):
        channel.send_layer(1, layers(1)[0])
    assert wait_for(lambda: sender.peers == [])
    assert wait_for(lambda: all(c.aborted for c in fabric.comms))  # both ranks torn down


def slow_last_layer(store: dict[int, torch.Tensor], last: int, seconds: float):
    """An on_layer that collects, taking `seconds` over layer `last` (so its ACK comes late)."""
    keep = collect(store)

    def on_layer(layer: int, payload: torch.Tensor) -> None:
        if layer == last:
            time.sleep(seconds)
        keep(layer, payload)

    return on_layer


@pytest.mark.parametrize("waiting", [2, 8])
def test_finish_reads_its_own_ack_and_waiters_share_the_reading(
    receiver, sender, waiting: int
) -> None:  # fmt: skip
    """A thread in finish() reads the receiver's replies itself (its ACK wakes it with no
    hand-over from the pair's reader thread); with several waiting on one pair, whichever reads
    settles the others' handoffs too, and all complete."""
    kv = layers(3)
    assert_pair_still_works(receiver, sender)
    peer = sender.pairs.get(receiver.endpoint, lambda e: pytest.fail("the pair exists"))
    readers: dict[bytes, str] = {}
    on_reply = peer.on_reply

    def record(handoff_id: bytes, kind: str, text: str) -> None:
        readers[handoff_id] = threading.current_thread().name
        on_reply(handoff_id, kind, text)

    peer.on_reply = record  # type: ignore[method-assign]
    opened = []
    for _ in range(waiting):
        store: dict[int, torch.Tensor] = {}
        hid = str(uuid.uuid4())
        future = receiver.expect(hid, 3, nbytes(kv[0]), slow_last_layer(store, 2, 0.15))
        opened.append((future, sender.open(receiver.endpoint, hid, 3), store))
    for _, channel, _ in opened:
        for layer in range(3):
            channel.send_layer(layer, kv[layer])
    done: dict[str, bool] = {}

    def finish(name: str, channel: NcclSendChannel) -> None:
        threading.current_thread().name = name
        channel.finish(10)
        done[name] = True

    waiters = [threading.Thread(target=finish, args=(f"waiter-{i}", channel))
               for i, (_, channel, _) in enumerate(opened)]  # fmt: skip
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(10)
    assert done == {f"waiter-{i}": True for i in range(waiting)}
    for future, channel, store in opened:
        assert future.result(10).ok
        assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(3))
        assert readers[channel.key].startswith("waiter-")  # not the reader thread


def test_finish_polls_for_its_ack_then_sleeps(receiver, sender, monkeypatch) -> None:
    """finish() polls the control connection (select with no timeout) for REPLY_POLL_S, so an ACK
    that comes soon wakes nobody; after that it sleeps in select until a reply or its deadline."""
    monkeypatch.setattr(nccl_pair, "REPLY_POLL_S", 0.05)
    calls: list[tuple[float, float]] = []  # (when, timeout) of finish()'s selects on the pair
    real_select = nccl_pair.select.select

    def spy(rlist: list, wlist: list, xlist: list, timeout: float | None = None) -> tuple:
        if threading.current_thread().name == "finisher":
            calls.append((time.monotonic(), -1.0 if timeout is None else timeout))
        return real_select(rlist, wlist, xlist, timeout)

    monkeypatch.setattr(nccl_pair.select, "select", spy)
    kv = layers(2)
    store: dict[int, torch.Tensor] = {}
    hid = str(uuid.uuid4())
    future = receiver.expect(hid, 2, nbytes(kv[0]), slow_last_layer(store, 1, 0.3))
    channel = sender.open(receiver.endpoint, hid, 2)
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    finisher = threading.Thread(target=channel.finish, args=(10,), name="finisher")
    finisher.start()
    finisher.join(10)
    assert future.result(10).ok and len(store) == 2
    polls = [when for when, timeout in calls if timeout == 0]
    sleeps = [(when, timeout) for when, timeout in calls if timeout != 0]
    assert len(polls) > 10 and sleeps, (len(polls), sleeps)
    assert polls[-1] - polls[0] < 0.2  # the polling window (0.05 s), not until the ACK (0.3 s)
    assert all(timeout > 5 for _, timeout in sleeps)  # until the deadline, not a spin
    assert sleeps[0][0] >= polls[-1]


def test_a_finish_that_times_out_gives_the_reading_back(receiver, sender) -> None:
    """A finish() that gives up while it reads the replies hands the reading back to the pair's
    reader thread, which goes on settling handoffs nobody waits for (here a NACK)."""
    kv = layers(2)
    store: dict[int, torch.Tensor] = {}
    hid = str(uuid.uuid4())
    receiver.expect(hid, 2, nbytes(kv[0]), slow_last_layer(store, 1, 1.0))
    channel = sender.open(receiver.endpoint, hid, 2)
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    with pytest.raises(HandoffError, match="no ACK within"):
        channel.finish(0.2)
    unexpected = sender.open(receiver.endpoint, str(uuid.uuid4()), 2)
    unexpected.send_layer(0, kv[0])  # not expected: the receiver NACKs it
    assert wait_for(lambda: unexpected.failed)
    assert_pair_still_works(receiver, sender)


def test_one_call_takes_the_channels_of_one_sender(receiver, sender, fabric) -> None:
    """send_layer_group and send_layer_runs launch on one sender: channels of two are refused."""
    other = NcclKVSender(CPU, fabric=fabric, links=fabric.links)
    try:
        kv = layers(2)
        ours = [open_handoff(receiver, tx, 2, nbytes(kv[0]))[2] for tx in (sender, other)]
        with pytest.raises(ValueError, match="send_layer_group takes the channels of one"):
            send_layer_group(0, [(channel, kv[0]) for channel in ours])
        theirs = [open_handoff(receiver, tx, 2, nbytes(kv[0]))[2] for tx in (sender, other)]
        with pytest.raises(ValueError, match="send_layer_runs takes the channels of one"):
            send_layer_runs([(channel, 0, torch.stack(kv)) for channel in theirs])
    finally:
        other.close()


def test_the_pair_cache_evicts_the_least_recently_used_idle_pair(fabric) -> None:
    tx = NcclKVSender(CPU, fabric=fabric, max_peers=1, links=fabric.links)
    a, b = NcclKVReceiver(CPU, fabric=fabric), NcclKVReceiver(CPU, fabric=fabric)
    ea, eb = fabric.links.add(a.start(), a), fabric.links.add(b.start(), b)
    try:
        for endpoint, rx in ((ea, a), (eb, b)):
            assert_pair_still_works(rx, tx, endpoint)
        assert tx.peers == [eb]
        first_pair = fabric.comms[:2]
        assert wait_for(lambda: all(c.aborted for c in first_pair))
        assert wait_for(lambda: a.num_links == 0)  # the receiver dropped its side too
        assert_pair_still_works(a, tx, ea)  # a new pair, made on demand
        assert tx.peers == [ea]
    finally:
        tx.close()
        a.close()
        b.close()


def test_multi_receiver_takes_either_transport(fabric, sender) -> None:
    multi = MultiKVReceiver([NcclKVReceiver(CPU, fabric=fabric), SocketKVReceiver()])
    endpoints = split_endpoints(multi.start())
    fabric.links.add(endpoints["nccl"], multi)  # OpenKVLink reaches the NCCL one through it
    try:
        kv = layers(2)
        store: dict[int, torch.Tensor] = {}
        hid = str(uuid.uuid4())
        future = multi.expect(hid, 2, nbytes(kv[0]), collect(store))
        channel = sender.open(endpoints["nccl"], hid, 2)
        for layer in range(2):
            channel.send_layer(layer, kv[layer])
        channel.finish(10)
        result: HandoffResult = future.result(10)
        assert result.ok and torch.equal(store[1], kv[1].view(torch.uint8).reshape(-1))
    finally:
        multi.close()


# ---- staging buffers and recv groups -------------------------------------------------------


def test_staging_size_classes_waste_under_an_eighth_or_4_kib() -> None:
    for nbytes in [0, 1, 4096, 5000, 65536, (8 << 20) - 1, 8 << 20, (8 << 20) + 1, 130 << 20]:
        size = size_class(nbytes)
        assert size >= max(nbytes, 1) and size % 4096 == 0
        assert size - nbytes <= max(nbytes / 8, 4096)
        assert size_class(size) == size
    assert size_class(8 << 20) == 8 << 20 and size_class((1 << 20) - 1000) == 1 << 20


def test_the_staging_pool_reuses_buffers_of_a_size_class_oldest_first() -> None:
    mib = 1 << 20
    pool = StagingPool(DeviceStreams(CPU), None, [None, None], max_free_bytes=2 * mib + 8192)
    a, b, c = pool.take(mib), pool.take(mib), pool.take(5000)
    assert (a.numel(), c.numel(), a.dtype) == (mib, 5000, torch.uint8)
    for buf in (a, b, c):
        pool.give(buf, Event(None))
    a2 = pool.take(mib - 1000)  # the class of a and b: the oldest, a
    assert a2.numel() == mib - 1000 and a2.data_ptr() == a.data_ptr()
    assert pool.take(mib).data_ptr() == b.data_ptr()
    c2 = pool.take(6000)  # 5000 and 6000 bytes: one 8 KiB class
    assert c2.data_ptr() == c.data_ptr() and pool.allocated == 3
    d = pool.take(mib)  # none free in the class: a new one
    assert pool.allocated == 4
    for buf in (a2, b, c2, d):  # d does not fit under max_free_bytes any more: dropped
        pool.give(buf, Event(None))
    assert {pool.take(mib).data_ptr() for _ in range(2)} == {a.data_ptr(), b.data_ptr()}
    assert pool.allocated == 4
    pool.take(mib)
    assert pool.allocated == 5


def test_a_wait_for_many_events_is_one_per_stream_on_its_latest() -> None:
    def event(stream: int, order: int) -> Event:
        e = Event.__new__(Event)  # as if recorded on CUDA stream `stream`, order-th overall
        e.cuda, e.stream, e.order, e.wall = object(), stream, order, 0.0  # type: ignore[assignment]
        return e

    events = [event(7, 3), event(9, 1), event(7, 5), event(9, 0), event(7, 4), Event(None)]
    assert {(e.stream, e.order) for e in latest(events)} == {(7, 5), (9, 1)}
    assert latest([Event(None)]) == []  # CPU events are always complete


def test_staging_buffers_are_reused_from_handoff_to_handoff(receiver, sender) -> None:
    for _ in range(6):
        assert_pair_still_works(receiver, sender)
    # two layers per handoff, one handoff at a time: never more than two buffers in use, and
    # two for the rounds' checksums
    assert 1 <= receiver.staging_allocations <= 4


def test_layers_of_a_handoff_aborted_mid_launch_free_their_staging(
    receiver, sender, fabric
) -> None:
    for _ in range(6):
        hid = str(uuid.uuid4())
        kv = layers(3)
        future = receiver.expect(hid, 3, nbytes(kv[0]), collect({}))
        channel = sender.open(receiver.endpoint, hid, 3)
        # the sender gives up between the round's checksums and the layer's send
        fabric.on_send = lambda data, channel=channel: channel.abort("gave up mid-launch")
        channel.send_layer(0, kv[0])
        result = future.result(10)
        assert not result.ok and "gave up mid-launch" in result.error
        fabric.on_send = lambda data: None
        assert_pair_still_works(receiver, sender)
        assert wait_for(lambda: receiver.staging_lent == 0)  # no buffer stayed with a dead handoff
    assert receiver.staging_allocations <= 6  # reused: a message's and a round's sums at a time


def test_a_handoff_aborted_before_its_last_layer_frees_its_staging_at_once(
    receiver, sender
) -> None:
    """Layers sent before an abort wait for the checksums of their batch; the abort sends them,
    so the receiver frees their staging with no more traffic on the pair."""
    kv = layers(4)
    hid, future, channel, _ = open_handoff(receiver, sender, 4, nbytes(kv[0]))
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    assert wait_for(lambda: receiver.staging_lent == 2)  # both landed, no checksums yet
    time.sleep(0.05)
    assert receiver.staging_lent == 2 and not future.done()
    channel.abort("the prefill was cancelled")
    result = future.result(10)
    assert not result.ok and "the prefill was cancelled" in result.error
    assert wait_for(lambda: receiver.staging_lent == 0)
    assert_pair_still_works(receiver, sender)


def test_a_burst_of_layers_is_received_in_bounded_groups(
    receiver, sender, fabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer_bytes = nbytes(layers(1)[0])
    monkeypatch.setattr(nccl_receiver, "RECV_GROUP_BYTES", 3 * layer_bytes)
    monkeypatch.setattr(nccl_receiver, "CHECK_BYTES", 3 * layer_bytes)
    calls: list[int] = []  # the layers of each checksum launch
    group_sums = receiver.dev.group_sums

    def count(groups: list[tuple[list[tuple[torch.Tensor, int]], Event | None, Any]]) -> Any:
        calls.extend(sum(n for _, n in runs) for runs, _, _ in groups if runs)
        return group_sums(groups)

    receiver.dev.group_sums = count  # type: ignore[method-assign]
    data = {str(uuid.uuid4()): layers(2) for _ in range(7)}
    stores: dict[str, dict[int, torch.Tensor]] = {hid: {} for hid in data}
    futures = {hid: receiver.expect(hid, 2, layer_bytes, collect(stores[hid])) for hid in data}
    channels = {hid: sender.open(receiver.endpoint, hid, 2) for hid in data}
    for layer in range(2):  # one launch, one write of 7 DATA frames: one burst
        assert send_layer_group(layer, [(channels[h], kv[layer]) for h, kv in data.items()]) == []
    for hid, kv in data.items():
        channels[hid].finish(10)
        assert futures[hid].result(10).ok
        assert all(torch.equal(stores[hid][i], kv[i].view(torch.uint8).reshape(-1)) for i in (0, 1))
    # after the pair's 1-byte probe; the checksums (8 bytes a layer) of both rounds' layers come
    # once the second round, with the handoffs' last layers, was sent: at the end of its group
    sums = [[n for n in group if n < layer_bytes] for group in fabric.recv_groups[1:]]
    assert [n for group in sums for n in group] == [14 * 8]
    groups = [[n for n in group if n >= layer_bytes] for group in fabric.recv_groups[1:]]
    assert sum(map(len, groups)) == 14
    assert all(sum(group) <= 3 * layer_bytes for group in groups)
    # layers that arrived together share a launch; a handoff's last layer is alone, so that
    # after the last byte only it waits for its checksum
    assert [len(group) for group in groups] == [3, 3, 1] + [1] * 7
    assert [len(group) for group in sums] == [0] * 9 + [1]
    # one checksum launch per unit of consecutive groups of up to CHECK_BYTES, the handoffs'
    # last layers apart from the layers before them
    assert calls == [3, 3, 1, 3, 3, 1]


def count_checksum_launches(sender: NcclKVSender) -> list[int]:
    """The number of layers of each checksum launch the sender makes from now on."""
    launches: list[int] = []
    layer_sums = sender.dev.layer_sums

    def count(runs: list[tuple[torch.Tensor, int]], programs: int) -> torch.Tensor:
        launches.append(sum(n for _, n in runs))
        return layer_sums(runs, programs)

    sender.dev.layer_sums = count  # type: ignore[method-assign]
    return launches


def test_layers_queued_together_go_in_one_round(receiver, sender, fabric) -> None:
    """Layers queued while the sender thread is busy: one group of sends for all of them, then
    (the handoff's last layer is among them) the checksums of all eight (one launch, one
    send)."""
    launches = count_checksum_launches(sender)
    kv = layers(8)
    hid, future, channel, store = open_handoff(receiver, sender, 8, nbytes(kv[0]))
    send_behind_a_held_send(fabric, channel, kv)  # once the pair exists (its setup sends a probe)
    channel.finish(10)
    assert future.result(10).ok
    assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(8))
    assert fabric.send_groups[1:] == [1, 7, 1]  # after the pair's 1-byte probe
    assert launches == [8]


def send_behind_a_held_send(
    fabric: LoopbackFabric, channel: NcclSendChannel, kv: list[torch.Tensor]
) -> None:  # fmt: skip
    """Send layer 0, hold the sender thread in that send while the other layers are queued, then
    let it go on: layers 1.. reach the thread together, as layers the engine queues while the
    thread is busy."""
    busy, go = threading.Event(), threading.Event()

    def hold(data: torch.Tensor) -> None:
        if not busy.is_set():
            busy.set()
            go.wait(10)

    fabric.on_send = hold
    channel.send_layer(0, kv[0])
    assert busy.wait(10)
    for layer in range(1, len(kv)):
        channel.send_layer(layer, kv[layer])
    go.set()


def test_adjacent_layers_queued_together_go_as_one_message(receiver, sender, fabric) -> None:
    """Layers of one handoff that lie back to back in memory (slices of one buffer, as KVPusher
    gathers them) and are launched together go as one NCCL message; the handoff's last layer
    alone. Every layer arrives bit-identical, and the message's staging buffer is reused."""
    for _ in range(3):
        buf = torch.randn(6, *SHAPE).to(torch.bfloat16)
        kv = list(buf.unbind(0))  # contiguous slices, back to back
        hid, future, channel, store = open_handoff(receiver, sender, 6, nbytes(kv[0]))
        fabric.send_groups.clear()
        fabric.recv_groups.clear()
        send_behind_a_held_send(fabric, channel, kv)
        channel.finish(10)
        assert future.result(10).ok
        assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(6))
        # layer 0; then layers 1-4 as one, 5 alone; then the checksums of all six
        assert fabric.send_groups == [1, 2, 1]
        one = nbytes(kv[0])
        assert [n for group in fabric.recv_groups for n in group] == [one, 4 * one, one, 6 * 8]
        fabric.on_send = lambda data: None
    # reused: a few per size class (the checksums' share the layers'), however many rounds
    assert receiver.staging_allocations <= 5


def test_a_corrupt_layer_inside_a_message_fails_its_handoff(receiver, sender, fabric) -> None:
    buf = torch.randn(4, *SHAPE).to(torch.bfloat16)
    kv = list(buf.unbind(0))
    one = nbytes(kv[0])

    def corrupt(got: torch.Tensor) -> torch.Tensor:
        if got.numel() == 2 * one:  # the message of layers 1 and 2: flip a byte of layer 2
            got = got.clone()
            got[one + 5] ^= 0xFF
        return got

    hid, future, channel, store = open_handoff(receiver, sender, 4, one)
    fabric.corrupt = corrupt
    send_behind_a_held_send(fabric, channel, kv)
    result = future.result(10)
    assert not result.ok and "checksum mismatch on layer 2" in result.error
    assert 2 not in store
    with pytest.raises(HandoffError):
        channel.finish(10)
    fabric.corrupt, fabric.on_send = (lambda t: t), (lambda data: None)
    assert_pair_still_works(receiver, sender)


def test_layers_that_exist_go_in_one_round_when_queued_in_one_call(
    receiver, sender, fabric
) -> None:
    """send_layer_runs: every layer of two handoffs (each in one buffer, as KVPusher lays them
    out) in one call: one group of sends of each handoff's layers as few messages (its last
    layer alone), then their checksums (one launch, one send)."""
    launches = count_checksum_launches(sender)
    assert_pair_still_works(receiver, sender)  # the pair exists before the counts start
    launches.clear()
    fabric.send_groups.clear()
    fabric.recv_groups.clear()
    data = {str(uuid.uuid4()): torch.randn(5, *SHAPE).to(torch.bfloat16) for _ in range(2)}
    one = nbytes(layers(1)[0])
    stores: dict[str, dict[int, torch.Tensor]] = {hid: {} for hid in data}
    futures = {hid: receiver.expect(hid, 5, one, collect(stores[hid])) for hid in data}
    channels = {hid: sender.open(receiver.endpoint, hid, 5) for hid in data}
    assert send_layer_runs([(channels[h], 0, kv) for h, kv in data.items()]) == []
    for hid, kv in data.items():
        channels[hid].finish(10)
        assert futures[hid].result(10).ok
        assert all(torch.equal(stores[hid][i], kv[i].view(torch.uint8).reshape(-1))
                   for i in range(5))  # fmt: skip
    assert launches == [10]
    assert fabric.send_groups == [4, 1]  # 2 x (layers 0-3, layer 4), then the checksums
    received = [n for group in fabric.recv_groups for n in group]
    assert received == [4 * one, one, 4 * one, one, 10 * 8]


def test_a_handoffs_tail_is_verified_message_by_message(
    receiver, sender, fabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handoff that exists goes as messages that halve towards its end, each large enough
    followed by its checksums (the receiver verifies it while the next is on the wire); the
    checksums of batches of up to LAUNCH_RATIO times the first's bytes share a launch."""
    one = nbytes(layers(1)[0])
    monkeypatch.setattr(nccl_sender, "MESSAGE_BYTES", 4 * one)
    monkeypatch.setattr(nccl_sender, "BATCH_BYTES", 2 * one)
    monkeypatch.setattr(nccl_sender, "TAIL_BYTES", 2 * one)
    launches = count_checksum_launches(sender)
    assert_pair_still_works(receiver, sender)  # the pair exists before the counts start
    launches.clear()
    fabric.send_groups.clear()
    fabric.recv_groups.clear()
    kv = torch.randn(8, *SHAPE).to(torch.bfloat16)
    hid, future, channel, store = open_handoff(receiver, sender, 8, one)
    assert send_layer_runs([(channel, 0, kv)]) == []
    channel.finish(10)
    assert future.result(10).ok
    assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(8))
    assert launches == [8]  # 4 x the first batch's bytes: the whole round
    # layers 0-3, their sums; 4-5, their sums; 6 and the last layer alone, their sums
    assert fabric.send_groups == [1, 1, 1, 1, 2, 1]
    assert fabric.recv_groups == [[4 * one, 4 * 8], [2 * one, 2 * 8], [one], [one, 2 * 8]]


def test_runs_to_two_peers_have_each_batch_checksummed_once(
    fabric, sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call with a run to each of two decode workers: each peer's batches get their
    checksums, each batch once, also where a launch's bytes end between the peers'."""
    one = nbytes(layers(1)[0])
    monkeypatch.setattr(nccl_sender, "MESSAGE_BYTES", 4 * one)
    monkeypatch.setattr(nccl_sender, "BATCH_BYTES", 2 * one)
    monkeypatch.setattr(nccl_sender, "TAIL_BYTES", 2 * one)
    monkeypatch.setattr(nccl_sender, "LAUNCH_RATIO", 1)
    launches = count_checksum_launches(sender)
    a, b = NcclKVReceiver(CPU, fabric=fabric), NcclKVReceiver(CPU, fabric=fabric)
    try:
        for rx in (a, b):
            rx.endpoint = fabric.links.add(rx.start(), rx)  # type: ignore[attr-defined]
            assert_pair_still_works(rx, sender)  # the pairs exist before the counts start
        launches.clear()
        kv = {rx: torch.randn(8, *SHAPE).to(torch.bfloat16) for rx in (a, b)}
        opened = {rx: open_handoff(rx, sender, 8, one) for rx in (a, b)}
        assert send_layer_runs([(opened[rx][2], 0, kv[rx]) for rx in (a, b)]) == []
        for rx in (a, b):
            hid, future, channel, store = opened[rx]
            channel.finish(10)
            assert future.result(10).ok
            assert all(torch.equal(store[i], kv[rx][i].view(torch.uint8).reshape(-1))
                       for i in range(8))  # fmt: skip
        # each peer: layers 0-3 | 4-5 | 6, 7, one batch each; a launch stops at 4 layers' bytes
        assert launches == [4, 4, 4, 4]
    finally:
        a.close()
        b.close()


def test_layers_that_exist_launch_on_the_callers_thread_unless_the_sender_is_busy(
    receiver, sender
) -> None:
    """send_layer_runs launches on the calling thread when nothing is queued before it (no
    hand-over to the sender thread); while a launch is going on, it queues behind it."""
    threads: list[str] = []
    launch_jobs = sender._launch_jobs

    def record(jobs: list[Any]) -> bool:
        threads.append(threading.current_thread().name)
        return launch_jobs(jobs)

    sender._launch_jobs = record  # type: ignore[method-assign]
    kv = torch.randn(3, *SHAPE).to(torch.bfloat16)
    for busy in (False, True):
        hid, future, channel, store = open_handoff(receiver, sender, 3, nbytes(kv[0]))
        if busy:  # as if another thread were launching: the runs wait for its turn to end
            with sender._turn:
                sender._launching = True
        assert send_layer_runs([(channel, 0, kv)]) == []
        if busy:
            time.sleep(0.2)
            assert not future.done()
            sender._end_turn()
        channel.finish(10)
        assert future.result(10).ok
        assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(3))
    assert threads == [threading.current_thread().name, "nccl-send"]


def test_a_corrupt_checksum_on_the_wire_fails_its_handoff(receiver, sender, fabric) -> None:
    """The sender's checksums travel on the communicator too: if they arrive altered, the
    layers they cover are not delivered."""
    kv = layers(2)
    one = nbytes(kv[0])

    def corrupt(got: torch.Tensor) -> torch.Tensor:
        if got.numel() == 2 * 8:  # the checksums of the handoff's two layers
            got = got.clone()
            got[0] ^= 0x01
        return got

    assert_pair_still_works(receiver, sender)
    hid, future, channel, store = open_handoff(receiver, sender, 2, one)
    fabric.corrupt = corrupt
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    result = future.result(10)
    assert not result.ok and "checksum mismatch on layer 0" in result.error
    assert store == {}
    fabric.corrupt = lambda t: t
    assert_pair_still_works(receiver, sender)


@pytest.mark.parametrize(
    ("what", "frames"),
    [
        (
            "SUMS of more layers than came",
            [(NcclFrameKind.DATA, 0, 2, 16, 1), (NcclFrameKind.SUMS, 0, 2, 16, 1)],
        ),
        (
            "SUMS of fewer layers than came",
            [(NcclFrameKind.DATA, 0, 2, 16, 2), (NcclFrameKind.SUMS, 0, 1, 8, 1)],
        ),
        (
            "SUMS of the wrong size",
            [(NcclFrameKind.DATA, 0, 2, 16, 1), (NcclFrameKind.SUMS, 0, 1, 16, 1)],
        ),
        ("SUMS of no layers", [(NcclFrameKind.SUMS, 0, 0, 0, 1)]),
        (
            "SUMS of too many partial sums",
            [(NcclFrameKind.DATA, 0, 2, 16, 1), (NcclFrameKind.SUMS, 0, 1, 8 << 20, 1 << 20)],
        ),
    ],
)
def test_frames_that_break_the_rounds_drop_the_connection(
    fabric: LoopbackFabric, what: str, frames: list[tuple[NcclFrameKind, int, int, int, int]]
) -> None:
    """A SUMS frame covers the layers of the DATA frames before it, with the bytes it announces: a
    sender that breaks that is not speaking this protocol, and its connection (and pair) is
    dropped (after the NACK of a DATA frame for a handoff nobody expects)."""
    rx = NcclKVReceiver(CPU, fabric=fabric)
    endpoint = rx.start()
    link_id, unique_id = str(uuid.uuid4()), fabric.unique_id()
    rx.offer_link(link_id, unique_id)
    key = uuid.UUID(str(uuid.uuid4())).bytes
    try:
        with hello(endpoint, link_id) as sock:
            rank0 = fabric.communicator(unique_id, 0)
            with fabric.group():
                rank0.send(torch.zeros(1, dtype=torch.uint8), 1, None)  # the probe
            frame = read_frame(sock)
            assert frame is not None and frame.kind == NcclFrameKind.READY
            sock.sendall(b"".join(
                pack(kind, NO_ID if kind == NcclFrameKind.SUMS else key, layer, num_layers, nbytes,
                     value=value)
                for kind, layer, num_layers, nbytes, value in frames
            ))  # fmt: skip
            while (frame := read_frame(sock)) is not None:  # closed
                assert frame.kind == NcclFrameKind.NACK, what
                read_payload(sock, frame)
            assert wait_for(lambda: rx.num_links == 0)
    finally:
        rx.close()


def test_coalescing_takes_only_runs_back_to_back_in_memory() -> None:
    """Runs break between handoffs, at a gap in the layers or in memory, at the size cap, and
    before a handoff's last layer."""
    a = types.SimpleNamespace(num_layers=8)
    b = types.SimpleNamespace(num_layers=8)
    buf = torch.zeros(8, 64, dtype=torch.uint8)
    other = torch.zeros(8, 64, dtype=torch.uint8)

    def sent(channel: object, layer: int, data: torch.Tensor) -> nccl_sender._Sent:
        return nccl_sender._Sent(channel, layer, data, Event(None))  # type: ignore[arg-type]

    sends = [
        sent(a, 0, buf[0]), sent(b, 0, other[0]), sent(a, 1, buf[1]), sent(a, 2, buf[2]),
        sent(a, 3, other[3]),  # not after layer 2 in memory
        sent(a, 4, other[4]), sent(a, 6, other[6]),  # a gap in the layers
        sent(a, 7, other[7]),  # the last layer: alone
        sent(b, 1, other[1]),
    ]  # fmt: skip
    runs = [(m.channel, m.first, m.count, m.data.numel()) for m in nccl_sender.coalesce(sends)]
    assert runs == [
        (a, 0, 3, 192), (a, 3, 2, 128), (a, 6, 1, 64), (a, 7, 1, 64), (b, 0, 2, 128),
    ]  # fmt: skip
    # the span is the layers' bytes, in place
    message = nccl_sender.coalesce(sends)[0]
    assert message.data.data_ptr() == buf[0].data_ptr()
    capped = nccl_sender.coalesce([sent(a, i, buf[i]) for i in range(6)], max_bytes=128)
    assert [(m.first, m.count) for m in capped] == [(0, 2), (2, 2), (4, 2)]


def test_a_run_of_layers_splits_into_messages_of_bounded_size() -> None:
    """A run goes as messages of at most max_bytes (at least one layer each), in place, the
    handoff's last layer alone; a run that ends before the last layer has no lone layer."""
    a = types.SimpleNamespace(num_layers=8)
    buf = torch.zeros(8, 64, dtype=torch.uint8)

    def parts(first: int, count: int, max_bytes: int) -> list[tuple[int, int, int]]:
        run = buf[first : first + count]
        messages = nccl_sender.split(a, first, run, Event(None), max_bytes)  # type: ignore[arg-type]
        assert all(m.data.data_ptr() == buf[m.first].data_ptr() for m in messages)
        return [(m.first, m.count, m.data.nbytes) for m in messages]

    assert parts(0, 8, 192) == [(0, 3, 192), (3, 3, 192), (6, 1, 64), (7, 1, 64)]
    assert parts(0, 8, 1 << 20) == [(0, 7, 448), (7, 1, 64)]
    assert parts(2, 4, 1 << 20) == [(2, 4, 256)]  # not the last layer: one message
    assert parts(5, 3, 10) == [(5, 1, 64), (6, 1, 64), (7, 1, 64)]  # a layer over the cap
    assert parts(7, 1, 1 << 20) == [(7, 1, 64)]


def test_a_run_that_ends_its_handoff_ends_in_halving_messages() -> None:
    """The messages before the last layer halve in size down to tail_bytes (no larger than
    max_bytes), so that each is verified while the next is on the wire."""
    mib = 1 << 20

    def sizes(count: int, layer_mib: int, ends: bool = True) -> list[int]:
        return nccl_sender.message_sizes(count, layer_mib * mib, ends, 256 * mib, 32 * mib)

    assert sizes(32, 16) == [16, 8, 4, 2, 1, 1]  # halving down to 2 x 16 MiB
    assert sizes(32, 4) == [16, 8, 7, 1]  # 4 x 4 MiB is below 32 MiB: the rest at once
    assert sizes(32, 64) == [4] * 7 + [2, 1, 1]  # 256 MiB at most
    assert sizes(32, 256) == [1] * 32
    assert sizes(32, 1) == [31, 1]
    assert sizes(32, 16, ends=False) == [16, 16]  # not the handoff's end: full messages
    assert sizes(1, 16) == [1]
    for count, layer_mib in itertools.product(range(1, 40), (1, 3, 16, 50, 300)):
        got = sizes(count, layer_mib)
        assert sum(got) == count and got[-1] == 1
        assert all(n == 1 or n * layer_mib <= 256 for n in got)


class GatedQueue:
    """A sender's job queue whose blocking get (the sender thread idle) waits for `gate`: layers
    queued meanwhile are all there when the thread wakes, as when the engine's thread holds the
    GIL while it queues a burst."""

    def __init__(self) -> None:
        self.inner: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.gate = threading.Event()

    def put(self, job: object) -> None:
        self.inner.put(job)

    def get(self) -> object:
        assert self.gate.wait(10)
        return self.inner.get()

    def get_nowait(self) -> object:
        return self.inner.get_nowait()

    def empty(self) -> bool:
        return self.inner.empty()


def test_a_burst_that_finds_the_sender_idle_goes_out_in_two_rounds(
    receiver, fabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first of layers queued one by one while the sender thread was idle goes out alone,
    after one layer's host work; the rest in one round (one group), then the checksums of all
    eight (one launch: the handoff's last layer closes the batch)."""
    jobs = GatedQueue()
    gated_queue = types.SimpleNamespace(SimpleQueue=lambda: jobs, Empty=queue.Empty)
    monkeypatch.setattr(nccl_sender, "queue", gated_queue)
    sender = NcclKVSender(CPU, fabric=fabric, links=fabric.links)
    try:
        launches = count_checksum_launches(sender)
        kv = layers(8)
        hid, future, channel, store = open_handoff(receiver, sender, 8, nbytes(kv[0]))
        for layer in range(8):  # all queued before the idle sender thread wakes
            channel.send_layer(layer, kv[layer])
        jobs.gate.set()
        channel.finish(10)
        assert future.result(10).ok
        assert all(torch.equal(store[i], kv[i].view(torch.uint8).reshape(-1)) for i in range(8))
        assert fabric.send_groups[1:] == [1, 7, 1]  # after the pair's 1-byte probe
        assert launches == [8]
        # once the backlog was sent, a burst queued while the thread is busy is one round
        fabric.sent.clear()
        assert_pair_still_works(receiver, sender)
        assert [n for n in fabric.sent if n >= nbytes(kv[0])] == [nbytes(kv[0])] * 2
    finally:
        jobs.gate.set()
        sender.close()


def test_a_checksum_that_cannot_be_enqueued_fails_its_handoff_and_the_pair_goes_on(
    receiver, sender
) -> None:
    group_sums = receiver.dev.group_sums
    failures = [RuntimeError("no memory for the checksum table")]

    def fail_once(groups: list[tuple[list[tuple[torch.Tensor, int]], Event | None, Any]]) -> Any:
        if failures:
            raise failures.pop()
        return group_sums(groups)

    receiver.dev.group_sums = fail_once  # type: ignore[method-assign]
    kv = layers(2)
    hid, future, channel, store = open_handoff(receiver, sender, 2, nbytes(kv[0]))
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    result = future.result(10)
    assert not result.ok and "no memory for the checksum table" in result.error
    assert 0 not in store  # the layer of the failed launch was never delivered
    with pytest.raises(HandoffError):
        channel.finish(10)
    assert_pair_still_works(receiver, sender)


def test_the_timeline_marks_every_point_of_every_layer(receiver, sender) -> None:
    sender.timeline, receiver.timeline = Timeline(), Timeline()
    kv = layers(3)
    hid, future, channel, _ = open_handoff(receiver, sender, 3, nbytes(kv[0]))
    for layer in range(3):
        channel.send_layer(layer, kv[layer])
    channel.finish(10)
    assert future.result(10).ok
    assert wait_for(lambda: any(p == "ack" for p, *_ in receiver.timeline.marks))
    receiver.timeline.close()  # its watchers marked the GPU milestones they were given
    key = uuid.UUID(hid).bytes
    marks = by_layer(sender.timeline.marks + receiver.timeline.marks, key)
    chains = [  # (landed and summed come from watcher threads: after posted, in no set order)
        ["queued", "launched"],  # the sender's
        ["queued", "data", "posted", "delivered"],  # the data's way
        ["posted", "landed"],
        ["posted", "enqueued", "summed"],  # connection, verify, watcher thread
    ]
    for layer in range(3):
        for chain in chains:
            at = [marks[point][layer] for point in chain]
            assert at == sorted(at), dict(zip(chain, at, strict=True))
    assert marks["delivered"][2] <= marks["ack"][WHOLE] <= marks["acked"][WHOLE]


def assert_pair_still_works(
    receiver: NcclKVReceiver, sender: NcclKVSender, endpoint: str | None = None,
    decode_address: str = "",
) -> None:  # fmt: skip
    kv = layers(2)
    store: dict[int, torch.Tensor] = {}
    hid = str(uuid.uuid4())
    future = receiver.expect(hid, 2, nbytes(kv[0]), collect(store))
    endpoint = endpoint or receiver.endpoint  # type: ignore[attr-defined]
    channel = sender.open(endpoint, hid, 2, decode_address)
    for layer in range(2):
        channel.send_layer(layer, kv[layer])
    channel.finish(10)
    assert future.result(10).ok
    assert torch.equal(store[0], kv[0].view(torch.uint8).reshape(-1))


def test_disaggregated_engines_over_the_loopback_match_aggregated(fabric, sender) -> None:
    """KVPusher (grouped sends of a batch) -> NCCL transport -> scatter_into -> decode engine."""
    from kvmesh.shared.engine.engine import Engine, EngineConfig, Role
    from kvmesh.shared.engine.sequence import SamplingParams

    config: dict[str, Any] = dict(
        model="synthetic:tiny", block_size=4, num_blocks=64, max_num_batched_tokens=64
    )
    prompts = {str(uuid.uuid4()): [3 + (7 * i + j) % 50 for j in range(n)]
               for i, n in enumerate((1, 5, 13))}  # fmt: skip
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = greedy(config, prompts, params)
    prefill = Engine(EngineConfig(role=Role.PREFILL, **config))
    decode = Engine(EngineConfig(role=Role.DECODE, **config))
    rx = NcclKVReceiver(CPU, fabric=fabric)
    endpoint = fabric.links.add(rx.start(), rx)
    try:
        futures = expect_prompts(decode, rx, prompts)
        first, _ = push_prefill(prefill, partial(sender.open, endpoint), prompts, params, 10)
        assert decode_after(decode, prompts, first, futures, params, 10) == expected
        assert prefill.pool.num_free == prefill.pool.num_blocks
    finally:
        rx.close()


# ---- a pair's unique id over gRPC (Decode.OpenKVLink), real servers on loopback ---------------


class DecodeServer:
    """The decode service's real gRPC server (shared.rpc.create_server, grpc.aio) on its own
    event loop thread, around a receiver; only OpenKVLink is called, so the servicer's engine
    parts are left out."""

    def __init__(self, receiver: object) -> None:
        from kvmesh.protos import worker_pb2_grpc
        from kvmesh.services.decode import DecodeServicer
        from kvmesh.services.rpc import create_server

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        servicer = DecodeServicer(None, receiver, "", None, "test", None, 60.0)  # type: ignore[arg-type]
        spec = (worker_pb2_grpc.add_DecodeServicer_to_server, servicer, "kvmesh.worker.v1.Decode")

        async def start() -> tuple[grpc.aio.Server, int]:
            server, port, _ = create_server("127.0.0.1:0", [spec])
            await server.start()
            return server, port

        self.server, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.address = f"127.0.0.1:{port}"

    def open_link(self, link_id: str, unique_id: bytes) -> None:
        """Decode.OpenKVLink from a plain client; grpc.RpcError if refused."""
        from kvmesh.protos import worker_pb2, worker_pb2_grpc

        request = worker_pb2.OpenKVLinkRequest(link_id=link_id, nccl_unique_id=unique_id)
        with grpc.insecure_channel(self.address) as channel:
            worker_pb2_grpc.DecodeStub(channel).OpenKVLink(request, timeout=10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def decode_server(receiver: object) -> Iterator[DecodeServer]:
    server = DecodeServer(receiver)
    try:
        yield server
    finally:
        server.close()


def hello(endpoint: str, link_id: str) -> socket.socket:
    """A control connection to `endpoint` that sent HELLO(link_id)."""
    sock = socket.create_connection(parse_nccl_endpoint(endpoint), timeout=10)
    sock.sendall(message(NcclFrameKind.HELLO, text=link_id))
    return sock


def test_a_pair_is_set_up_with_its_unique_id_over_grpc(fabric: LoopbackFabric) -> None:
    """The production path end to end: GrpcLinkOpener -> Decode.OpenKVLink (the decode
    service's servicer) -> MultiKVReceiver -> the NCCL receiver's rendezvous <- HELLO(link id)."""
    nccl_rx = NcclKVReceiver(CPU, fabric=fabric)
    multi = MultiKVReceiver([nccl_rx, SocketKVReceiver()])
    endpoint = split_endpoints(multi.start())["nccl"]
    tx = NcclKVSender(CPU, fabric=fabric, worker_id="prefill-1")  # links: over gRPC
    try:
        with decode_server(multi) as server:
            for _ in range(2):  # the second handoff reuses the pair: one OpenKVLink only
                kv = layers(2)
                store: dict[int, torch.Tensor] = {}
                hid = str(uuid.uuid4())
                future = multi.expect(hid, 2, nbytes(kv[0]), collect(store))
                channel = tx.open(endpoint, hid, 2, decode_address=server.address)
                for layer in range(2):
                    channel.send_layer(layer, kv[layer])
                channel.finish(10)
                assert future.result(10).ok
                assert torch.equal(store[1], kv[1].view(torch.uint8).reshape(-1))
            assert len(fabric.comms) == 2  # one pair: rank 0 here, rank 1 there...
            assert fabric.comms[0].unique_id == fabric.comms[1].unique_id  # ...on one id
            assert nccl_rx.links.pending == 0
    finally:
        tx.close()
        multi.close()


def test_the_hello_may_arrive_before_the_unique_id(fabric: LoopbackFabric) -> None:
    rx = NcclKVReceiver(CPU, fabric=fabric)
    endpoint = rx.start()
    link_id, unique_id = str(uuid.uuid4()), fabric.unique_id()
    try:
        with decode_server(rx) as server, hello(endpoint, link_id) as sock:
            assert wait_for(lambda: rx.links.pending == 1)  # the HELLO waits for its id
            server.open_link(link_id, unique_id)
            rank0 = fabric.communicator(unique_id, 0)  # what the prefill side does next
            with fabric.group():
                rank0.send(torch.zeros(1, dtype=torch.uint8), 1, None)  # the probe
            frame = read_frame(sock)
            assert frame is not None and frame.kind == NcclFrameKind.READY
            assert [c.unique_id for c in fabric.comms] == [unique_id, unique_id]
            assert rx.links.pending == 0
    finally:
        rx.close()


def test_an_unclaimed_unique_id_expires(fabric: LoopbackFabric) -> None:
    rx = NcclKVReceiver(CPU, fabric=fabric, setup_timeout=0.3)
    endpoint = rx.start()
    link_id = str(uuid.uuid4())
    try:
        with decode_server(rx) as server:
            server.open_link(link_id, fabric.unique_id())
            assert rx.links.pending == 1
            time.sleep(0.5)
            assert rx.links.pending == 0  # dropped after the setup timeout
            with hello(endpoint, link_id) as sock:  # too late: it waits, then is refused
                frame = read_frame(sock)
                assert frame is not None and frame.kind == NcclFrameKind.NACK
                why = read_payload(sock, frame).decode()
                assert "no NCCL unique id for link" in why and "Decode.OpenKVLink" in why
            assert rx.links.pending == 0
            assert fabric.comms == []  # no communicator was made
    finally:
        rx.close()


def test_a_sender_whose_unique_id_never_comes_is_refused(fabric: LoopbackFabric) -> None:
    rx = NcclKVReceiver(CPU, fabric=fabric, setup_timeout=0.3)
    endpoint = rx.start()
    lost = LocalLinks()  # knows no receiver: the id goes nowhere...
    tx = NcclKVSender(CPU, fabric=fabric, links=lambda *args: None, setup_timeout=5)
    try:
        with pytest.raises(HandoffError, match="no NCCL unique id for link"):
            tx.open(endpoint, str(uuid.uuid4()), 1)
        assert tx.peers == []
        # that attempt's connection was NACKed; the receiver's thread drops it in its own time
        deadline = time.monotonic() + 5
        while rx.num_links and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rx.num_links == 0
        tx.links = lost  # ...or is refused at once: no control connection is made
        with pytest.raises(HandoffError, match="OpenKVLink refused: .*no NCCL receiver"):
            tx.open(endpoint, str(uuid.uuid4()), 1)
        assert rx.num_links == 0
    finally:
        tx.close()
        rx.close()


class RendezvousComm(LoopbackComm):
    """A loopback rank whose init blocks until the other rank of its unique id inits too, or
    until it is aborted, as ncclCommInitRank does."""

    def init(self) -> None:
        joined = self.fabric.joined  # type: ignore[attr-defined]
        with joined:
            joined.ranks.setdefault(self.unique_id, set()).add(self.rank)
            joined.notify_all()
            ok = joined.wait_for(
                lambda: len(joined.ranks[self.unique_id]) == 2 or self.aborted, timeout=60
            )
        if not ok or self.aborted:
            raise nccl.NcclError("ncclCommInitRank", 6, "aborted while waiting for the peer")

    def abort(self) -> None:
        super().abort()
        joined = self.fabric.joined  # type: ignore[attr-defined]
        with joined:
            joined.notify_all()


def test_a_nacked_setup_fails_the_sender_at_once(fabric: LoopbackFabric) -> None:
    """When the receiver NACKs the HELLO (here: the unique id never came), the sender's rank,
    blocked in init waiting for a peer that will never join, is aborted at once instead of
    after the sender's whole setup timeout."""
    fabric.joined = threading.Condition()  # type: ignore[attr-defined]
    fabric.joined.ranks = {}  # type: ignore[attr-defined]
    fabric.communicator = lambda uid, rank: RendezvousComm(fabric, uid, rank)  # type: ignore[method-assign]
    rx = NcclKVReceiver(CPU, fabric=fabric, setup_timeout=0.3)
    endpoint = rx.start()
    tx = NcclKVSender(CPU, fabric=fabric, links=lambda *args: None, setup_timeout=30)
    try:
        start = time.monotonic()
        with pytest.raises(HandoffError, match="no NCCL unique id for link"):
            tx.open(endpoint, str(uuid.uuid4()), 1)
        assert time.monotonic() - start < 5  # not the sender's 30 s
        assert tx.peers == []
    finally:
        tx.close()
        rx.close()


def test_open_kv_link_refuses_bad_input_with_precise_statuses(fabric: LoopbackFabric) -> None:
    rx = NcclKVReceiver(CPU, fabric=fabric)
    uid = fabric.unique_id()
    try:
        with decode_server(rx) as server:
            cases = [
                ("not-a-uuid", uid, grpc.StatusCode.INVALID_ARGUMENT, "UUID"),
                (str(uuid.uuid4()), b"short", grpc.StatusCode.INVALID_ARGUMENT, "128 bytes"),
            ]
            for link_id, unique_id, code, text in cases:
                with pytest.raises(grpc.RpcError) as info:
                    server.open_link(link_id, unique_id)
                assert info.value.code() == code and text in info.value.details()
            link_id = str(uuid.uuid4())
            server.open_link(link_id, uid)
            server.open_link(link_id, uid)  # a retried call is fine
            with pytest.raises(grpc.RpcError) as info:
                server.open_link(link_id, fabric.unique_id())  # another id for the link
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert rx.links.pending == 1
        with decode_server(SocketKVReceiver()) as server:  # a CPU decode worker
            with pytest.raises(grpc.RpcError) as info:
                server.open_link(str(uuid.uuid4()), uid)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no NCCL receiver" in info.value.details()
            # the sender maps the status into a HandoffError that names it
            opener = GrpcLinkOpener("prefill-1")
            with pytest.raises(HandoffError, match="OpenKVLink on .* failed .*FAILED_PRECOND"):
                opener(server.address, "nccl://x:1", str(uuid.uuid4()), uid, 5.0)
        with pytest.raises(HandoffError, match="needs the decode worker's gRPC address"):
            opener("", "nccl://x:1", str(uuid.uuid4()), uid, 5.0)
        with pytest.raises(HandoffError, match="UNAVAILABLE"):  # nobody listens there
            opener(f"127.0.0.1:{free_port()}", "nccl://x:1", str(uuid.uuid4()), uid, 2.0)
    finally:
        rx.close()


def test_the_rendezvous_is_bounded() -> None:
    links = Rendezvous(timeout=10, max_pending=2)
    for _ in range(2):
        links.offer(str(uuid.uuid4()), bytes(nccl.UNIQUE_ID_BYTES))
    with pytest.raises(LinkRefused) as info:
        links.offer(str(uuid.uuid4()), bytes(nccl.UNIQUE_ID_BYTES))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(HandoffError, match="already pending"):
        links.take(str(uuid.uuid4()))
    links.close()
    assert links.pending == 0


def test_serve_links_sets_up_pairs_for_a_receiver_without_a_decode_service(
    fabric: LoopbackFabric,
) -> None:
    """What the GPU tests and bench_handoff run in their decode process."""
    rx = NcclKVReceiver(CPU, fabric=fabric)
    endpoint = rx.start()
    server, address = serve_links(rx)
    tx = NcclKVSender(CPU, fabric=fabric)
    try:
        assert_pair_still_works(rx, tx, endpoint, decode_address=address)
    finally:
        tx.close()
        server.stop(None)
        rx.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
