"""Decode side of the NCCL transport (control protocol: nccl_frames).

Two threads per prefill connection:

    connection thread  reads the frames that arrived (one recv a burst); for all the burst's DATA
                       frames at once, posts an ncclRecv each on the link's recv stream (only
                       recvs: they go back to back) into staging buffers the link reuses
                       (nccl_staging), in groups of at most RECV_GROUP_BYTES (a handoff's last
                       layer alone, so that after the last byte only it waits for its checksum);
                       then enqueues the groups' checksums on the check stream (one table up for
                       the burst, then per group one launch after its recvs and its partials
                       down), and hands the layers whose CKSUM came to the verify thread. It
                       never waits for the GPU, and a burst costs a few host calls per group.
    verify thread      takes every layer whose CKSUM frame came, waits once per group for its
                       checksums, compares, hands the layers to on_layer on the scatter stream,
                       and gives their staging buffers back after one event.

    recv stream:     | recv g0 | recv g1 | recv g2 | ...
    check stream:              | sum g0 |  | sum g1 |  | sum g2 |
    verify thread:                      compare, scatter g0 (scatter stream), ...

Few threads on purpose: they share the GIL with each other and with the engine, and every
handover between Python threads costs a wake-up, so the per-layer work is batched per burst
instead of being passed along a pipeline of threads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from shared.handoff import nccl
from shared.handoff.listener import Expected, ListeningReceiver
from shared.handoff.nccl_device import HIGH_PRIORITY, Device, Event
from shared.handoff.nccl_frames import (
    SCHEME,
    Frame,
    FrameReader,
    Kind,
    message,
    read_frame,
    read_payload,
)
from shared.handoff.nccl_link import Rendezvous
from shared.handoff.nccl_pair import Fabric, NcclFabric, PairComm, connect_pair
from shared.handoff.nccl_staging import StagingPool
from shared.handoff.timeline import WHOLE, Timeline
from shared.handoff.transport import HandoffError
from shared.handoff.wire import JOIN_TIMEOUT_S, ProtocolError

log = logging.getLogger(__name__)

# The recvs of one group complete together (one NCCL kernel) and are checksummed together (one
# launch): small enough that the first layers' checksums run while later layers are on the
# wire, large enough that small layers share the host's work.
RECV_GROUP_BYTES = 64 << 20


@dataclass(eq=False)
class _Expected(Expected):
    """A handoff the NCCL receiver accepts: layers arrive (DATA) before they are delivered."""

    arrived: set[int] = field(default_factory=set)  # layers whose DATA came
    link: _Link | None = None  # the connection its frames arrive on

    def rejects(self, frame: Frame) -> str:
        """Why the layers a DATA frame announces do not fit ('' if they all do)."""
        if self.closed:
            return "handoff cancelled or failed"
        for layer in range(frame.layer, frame.layer + frame.count):
            if error := self.mismatch(layer, frame.num_layers, frame.nbytes, self.arrived):
                return error
        return ""


@dataclass(frozen=True, slots=True)
class _Data:
    """A DATA frame, and the handoff that accepted its layers (None: rejected, NACKed)."""

    frame: Frame
    state: _Expected | None
    last: bool  # holds the last of its handoff's layers to arrive

    @property
    def message_bytes(self) -> int:
        return self.frame.nbytes * self.frame.count


@dataclass(eq=False, slots=True)
class _Staged:
    """One message's staging buffer, shared by the landings of its layers: it goes back to the
    pool once every layer is done with it, after all their last readers."""

    buf: torch.Tensor
    remaining: int  # layers not done with it yet
    released: list[Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, released: Event) -> list[Event] | None:
        """One layer is done once `released` completes; all the events once every layer is."""
        with self.lock:
            self.released.append(released)
            self.remaining -= 1
            return self.released if self.remaining == 0 else None


@dataclass(eq=False, slots=True)
class _Sums:
    """The checksums of one recv group's accepted layers: enqueued by the connection thread
    when it posts the group's recvs, folded by the verify thread."""

    layers: list[tuple[bytes, int]]  # (handoff id, layer) of each row of partials
    received: Event  # on the recv stream, after the group's recvs
    ready: Event | None = None  # on the check stream, after the checksums and their copy down
    partials: torch.Tensor | None = None  # [len(layers), P] int64 on the host (group_sums)
    error: str = ""  # the checksums could not be enqueued
    values: list[int] | None = None  # the checksums: the verify thread folds them once ready

    def settled(self) -> bool:
        """Whether the verify thread can go on with the group without waiting: its checksums
        computed (or failed)."""
        return self.values is not None or self.ready is None or self.ready.query()

    @property
    def released(self) -> Event:
        """Completes after the group's last reader so far (its recvs, then its checksums)."""
        return self.ready if self.ready is not None else self.received


@dataclass(frozen=True, slots=True)
class _Posted:
    """A recv group whose recvs are posted."""

    group: list[_Data]
    bufs: list[torch.Tensor]  # the staging buffers the recvs write, one per DATA frame
    sums: _Sums  # of the accepted ones


@dataclass(eq=False, slots=True)
class _Landing:
    """A layer received into a staging buffer, waiting for its CKSUM frame."""

    state: _Expected
    layer: int
    buf: torch.Tensor  # [nbytes] uint8 on the device (a view of staged.buf), written by a recv
    staged: _Staged  # its message's staging buffer
    sums: _Sums  # its recv group's checksums
    index: int  # its row in sums


def _layers_of(frame: Frame) -> list[tuple[bytes, int]]:
    """(handoff id, layer) of each layer a DATA frame announces."""
    return [(frame.handoff_id, frame.layer + i) for i in range(frame.count)]


def _recv_groups(datas: list[_Data]) -> list[list[_Data]]:
    """Consecutive DATA frames in groups of at most RECV_GROUP_BYTES (a larger message alone); a
    handoff's last layer alone."""
    groups: list[list[_Data]] = []
    size = 0
    for data in datas:
        nbytes = data.message_bytes
        if not groups or size + nbytes > RECV_GROUP_BYTES or data.last or groups[-1][-1].last:
            groups.append([])
            size = 0
        groups[-1].append(data)
        size += nbytes
    return groups


class _Link:
    """Decode side of one prefill's control connection and communicator."""

    def __init__(self, conn: socket.socket, dev: Device, staging_bytes: int) -> None:
        self.conn = conn
        self.comm: PairComm | None = None
        self.recv_stream = dev.stream(HIGH_PRIORITY)  # only recvs: they go back to back
        self.check_stream = dev.stream(HIGH_PRIORITY)  # checksums, off the recv stream
        self.scatter_stream = dev.stream(HIGH_PRIORITY)
        readers = [self.check_stream, self.scatter_stream]
        self.staging = StagingPool(dev, self.recv_stream, readers, staging_bytes)
        self.landings: dict[tuple[bytes, int], _Landing] = {}  # only the connection's thread
        # (landing, the CKSUM frame's value) of layers whose CKSUM came, a list per burst
        self.verify: queue.SimpleQueue[list[tuple[_Landing, int]] | None] = queue.SimpleQueue()
        self._write_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            self.conn.sendall(data)


class NcclKVReceiver(ListeningReceiver[_Expected]):
    """Decode side of the NCCL transport (implements transport.KVReceiver).

    Listens for control connections on `bind_host:port`; advertises nccl://advertise_host:port.
    Layers land in staging buffers on the device (never in memory that was not reserved), are
    checksummed on the GPU, verified, then handed to on_layer on this receiver's scatter stream,
    with the staging buffer ([layer_nbytes] uint8 on the device) as the payload. Each link keeps
    up to `staging_bytes` of free staging buffers for the next layers. `timeline`, if set,
    records when each layer passes each point (a diagnostic). A new pair's unique id comes over
    gRPC (offer_link, from Decode.OpenKVLink), its HELLO names the link (nccl_link).
    """

    def __init__(
        self, device: torch.device | str, bind_host: str = "127.0.0.1", port: int = 0,
        advertise_host: str | None = None, fabric: Fabric | None = None,
        setup_timeout: float = 60.0, max_layer_bytes: int = 1 << 34,
        staging_bytes: int = 2 << 30,
    ) -> None:  # fmt: skip
        super().__init__(bind_host, port, advertise_host, _Expected, "nccl", SCHEME)
        self.dev = Device(torch.device(device))
        self.dev.warm_up()
        self.fabric = fabric or NcclFabric()
        self.setup_timeout = setup_timeout
        self.links = Rendezvous(setup_timeout)
        self.max_layer_bytes = max_layer_bytes
        self.staging_bytes = staging_bytes
        self.timeline: Timeline | None = None
        self._links: set[_Link] = set()  # guarded by _lock

    @property
    def num_links(self) -> int:
        with self._lock:
            return len(self._conns)

    def offer_link(self, link_id: str, unique_id: bytes) -> None:
        """A new pair's NCCL unique id, from Decode.OpenKVLink; nccl_link.LinkRefused if refused."""
        self.links.offer(link_id, unique_id)

    def close(self) -> None:
        self.links.close()
        super().close()

    @property
    def staging_allocations(self) -> int:
        """Staging buffers the live links allocated so far: constant in steady state."""
        with self._lock:
            return sum(link.staging.allocated for link in self._links)

    def _serve(self, conn: socket.socket) -> None:
        self.dev.bind_thread()
        link = _Link(conn, self.dev, self.staging_bytes)
        with self._lock:
            self._links.add(link)
        verifier = threading.Thread(target=self._verify_loop, args=(link,), name="nccl-verify")
        verifier.daemon = True
        try:
            self._handshake(link)
            verifier.start()
            reader = FrameReader(conn)
            while burst := reader.burst():
                self._on_burst(link, burst)
        except (OSError, ConnectionError, HandoffError, RuntimeError) as exc:
            log.info("KV control connection dropped: %s", exc)
        finally:
            self._drop(link, verifier)

    def _handshake(self, link: _Link) -> None:
        hello = read_frame(link.conn)
        if hello is None or hello.kind != Kind.HELLO:
            raise ProtocolError("expected HELLO")
        link_id = read_payload(link.conn, hello).decode(errors="replace")
        try:
            unique_id = self.links.take(link_id)  # sent over gRPC, before or after the HELLO
            link.comm = connect_pair(self.fabric, self.dev, unique_id, 1, self.setup_timeout)
        except HandoffError as exc:
            link.send(message(Kind.NACK, text=str(exc)))
            raise
        link.send(message(Kind.READY))

    def _drop(self, link: _Link, verifier: threading.Thread) -> None:
        with self._lock:
            self._links.discard(link)
        self._disconnected(link.conn, lambda s: s.link is link)
        if link.comm is not None:
            with contextlib.suppress(nccl.NcclError):
                link.comm.abort()  # ends recvs still waiting on the dead peer
        link.verify.put(None)
        if verifier.is_alive():
            verifier.join(JOIN_TIMEOUT_S)
        link.landings.clear()
        link.staging.clear()
        link.conn.close()

    # -- the connection's thread

    def _on_burst(self, link: _Link, burst: list[tuple[Frame, bytes]]) -> None:
        """Frames that arrived together, in order; then recvs and checksums for all their DATA
        frames; then the layers whose CKSUM came go to the verify thread."""
        datas: list[_Data] = []
        checks: list[Frame] = []
        for frame, payload in burst:
            if frame.kind == Kind.DATA:
                datas.append(self._accept(link, frame))
            elif frame.kind == Kind.CKSUM:  # its DATA came first: its landing is made below
                checks.append(frame)
            elif frame.kind == Kind.ABORT:
                state = self._get(frame.handoff_id)
                if state is not None:
                    reason = payload.decode(errors="replace")
                    self._fail(state, f"aborted by sender: {reason}")
            else:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")
        if (timeline := self.timeline) is not None:
            timeline.mark_all("data", [key for d in datas for key in _layers_of(d.frame)])
            timeline.mark_all("cksum", [(f.handoff_id, f.layer) for f in checks])
        if datas:
            self._receive(link, datas)
        verify = []
        for frame in checks:
            landing = link.landings.pop((frame.handoff_id, frame.layer), None)
            if landing is not None:
                verify.append((landing, frame.value))
        if verify:
            link.verify.put(verify)
        self._sweep(link)

    def _accept(self, link: _Link, frame: Frame) -> _Data:
        """A DATA frame with the handoff its layers belong to, or None (rejected: NACKed)."""
        state = self._get(frame.handoff_id)
        error = "handoff not expected (reserve first)"
        last = False
        if state is not None:
            with state.lock:
                state.started = state.started or time.perf_counter()
                error = state.rejects(frame)
                state.arrived.update(range(frame.layer, frame.layer + frame.count))
                state.link = link
                last = len(state.arrived) == state.num_layers
        if state is None or error:
            self._reject(link, frame.handoff_id, state, error)
            return _Data(frame, None, False)
        return _Data(frame, state, last)

    def _receive(self, link: _Link, datas: list[_Data]) -> None:
        """A recv for every DATA frame (also rejected ones: NCCL's order must hold), in groups
        (_recv_groups); then each group's checksums, to run once it landed; each group's
        accepted layers wait for their CKSUM frames (landings)."""
        if any(d.frame.nbytes > self.max_layer_bytes for d in datas):
            raise ProtocolError(f"a layer of more than {self.max_layer_bytes} bytes")
        if any(not 1 <= d.frame.count <= d.frame.num_layers for d in datas):
            raise ProtocolError("a DATA frame of no layers, or of more than its handoff has")
        assert link.comm is not None
        posted: list[_Posted] = []
        for group in _recv_groups(datas):  # first every recv: the wire goes on meanwhile
            bufs = link.staging.take_all([d.message_bytes for d in group])
            with self.fabric.group():
                for buf in bufs:
                    link.comm.recv(buf, 0, link.recv_stream)
            posted.append(_Posted(group, bufs, _Sums([], Event(link.recv_stream))))
        if (timeline := self.timeline) is not None:
            timeline.mark_all("posted", [key for d in datas for key in _layers_of(d.frame)])
        for p in posted:  # a CKSUM frame read next finds its landing, checksummed or not yet
            for d, buf in zip(p.group, p.bufs, strict=True):
                if d.state is None:
                    continue
                staged, size = _Staged(buf, d.frame.count), d.frame.nbytes
                for i, key in enumerate(_layers_of(d.frame)):
                    view = buf[i * size : (i + 1) * size]
                    layer = _Landing(d.state, key[1], view, staged, p.sums, len(p.sums.layers))
                    link.landings[key] = layer
                    p.sums.layers.append(key)
        self._checksum(link, posted)
        if timeline is not None:  # a diagnostic: it waits on its own thread
            for p in posted:
                if p.sums.layers:
                    self._watch(timeline, link, "landed", p.sums.received, p.sums.layers)
                    self._watch(timeline, link, "summed", p.sums.released, p.sums.layers)

    def _sweep(self, link: _Link) -> None:
        """Give back the buffers of layers whose handoff closed before their CKSUM came (the
        sender stops checksumming a handoff once it failed), after their checksums' reads."""
        for key in [key for key, landing in link.landings.items() if landing.state.closed]:
            landing = link.landings.pop(key)
            self._give(link, landing, landing.sums.released)

    def _checksum(self, link: _Link, posted: list[_Posted]) -> None:
        """Enqueue the checksums of each posted group's accepted layers on the check stream
        (each after its group's recvs), and give rejected layers' buffers back once they
        landed. Never waits for the GPU; if the launch fails, the groups' handoffs fail."""
        checked = []
        for p in posted:
            pairs = list(zip(p.group, p.bufs, strict=True))
            rejected = [buf for d, buf in pairs if d.state is None]
            if rejected:  # the recvs still land (NCCL's order must hold), then free
                link.staging.give_all(rejected, p.sums.received)
            if p.sums.layers:  # each accepted layer, in sums.layers' order
                views = [link.landings[key].buf for key in p.sums.layers]
                checked.append((p.sums, views))
        if not checked:
            return
        try:
            with self.dev.on(link.check_stream):
                sums = self.dev.group_sums([(bufs, s.received) for s, bufs in checked])
        except Exception as exc:  # the verify thread fails the groups' handoffs
            log.exception("KV checksum launch failed")
            for s, _ in checked:
                s.error = f"checksum failed: {exc}"
            return
        for (s, _), (partials, ready) in zip(checked, sums, strict=True):
            s.partials, s.ready = partials, ready
        if (timeline := self.timeline) is not None:
            timeline.mark_all("enqueued", [key for s, _ in checked for key in s.layers])

    def _watch(
        self, timeline: Timeline, link: _Link, point: str, event: Event,
        layers: list[tuple[bytes, int]],
    ) -> None:  # fmt: skip
        """Mark `layers` at `point` once `event` completed (on a watcher thread)."""

        def wait() -> None:
            self.dev.bind_thread()
            event.synchronize()

        timeline.watch(point, id(link), wait, layers)

    # -- the verify thread

    def _verify_loop(self, link: _Link) -> None:
        self.dev.bind_thread()
        while (items := link.verify.get()) is not None:
            closing = False
            while True:  # every layer whose CKSUM came by now
                try:
                    more = link.verify.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                items += more
            self._verify(link, items)
            if closing:
                return

    def _verify(self, link: _Link, items: list[tuple[_Landing, int]]) -> None:
        """Deliver each landed layer whose checksum is its CKSUM frame's value, in order; their
        staging buffers go back to the pool (after their last reader) before the handoffs they
        complete are settled."""
        delivered: list[_Landing] = []  # layers whose staging the scatter stream reads
        completed: list[_Expected] = []
        timeline = self.timeline
        with self.dev.on(link.scatter_stream):  # where on_layer scatters
            for landing, expected in items:
                sums = landing.sums
                if not sums.settled():  # what is delivered so far goes on meanwhile
                    self._release(link, delivered, completed)
                    delivered, completed = [], []
                state = landing.state
                if sums.error:
                    self._give(link, landing, sums.released)
                    self._reject(link, state.key, state, sums.error)
                    continue
                if sums.values is None:
                    self._wait(sums)
                assert sums.values is not None
                if sums.values[landing.index] != expected:
                    self._give(link, landing, sums.released)
                    error = f"checksum mismatch on layer {landing.layer}"
                    self._reject(link, state.key, state, error)
                    continue
                with state.lock:
                    if state.closed:
                        self._give(link, landing, sums.released)
                        continue
                    error = state.deliver(landing.layer, landing.buf)
                    delivered.append(landing)
                    if not error and len(state.layers) == state.num_layers:
                        completed.append(state)
                if timeline is not None:
                    timeline.mark("delivered", state.key, landing.layer)
                if error:
                    self._reject(link, state.key, state, error)
            self._release(link, delivered, completed)

    def _wait(self, sums: _Sums) -> None:
        """Wait for a recv group's checksums and fold them."""
        assert sums.ready is not None and sums.partials is not None
        sums.ready.synchronize()
        sums.values = self.dev.checksums(sums.partials)

    def _release(self, link: _Link, delivered: list[_Landing], completed: list[_Expected]) -> None:
        """Give delivered layers' staging buffers back after their scatters, and complete the
        handoffs they finished once the scatters landed (decode reads the blocks next)."""
        if not delivered:
            return
        released = Event(link.scatter_stream)
        for landing in delivered:
            self._give(link, landing, released)
        if completed:
            released.synchronize()
            for state in completed:
                self._complete(link, state)

    @staticmethod
    def _give(link: _Link, landing: _Landing, released: Event) -> None:
        """The layer is done with its staging once `released` completes; its message's buffer
        goes back to the pool when all the message's layers are."""
        if (events := landing.staged.done(released)) is not None:
            link.staging.give(landing.staged.buf, events)

    def _complete(self, link: _Link, state: _Expected) -> None:
        if self._close(state, ok=True):
            if (timeline := self.timeline) is not None:
                timeline.mark("ack", state.key, WHOLE)
            link.send(message(Kind.ACK, state.key))

    def _reject(self, link: _Link, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        link.send(message(Kind.NACK, key, error))
