"""Decode side of the NCCL transport (control protocol: frames).

Two threads per prefill connection:

    connection thread  reads the frames that arrived (one recv a burst) and splits its DATA and
                       SUMS frames into groups of at most RECV_GROUP_BYTES (a SUMS frame's
                       checksums end the group they come in; a handoff's last layer alone, so
                       that after the last byte only it waits for its checksum). For the first
                       group, then for all the others at once: takes staging buffers the link
                       reuses (staging), posts an ncclRecv each on the link's recv stream
                       (only recvs: they go back to back), one NCCL group per group; only then
                       looks up the handoffs the DATA frames name (the data flows meanwhile),
                       and hands the groups whose checksums are all posted to the verify thread.
                       It never waits for the GPU, and a burst costs a few host calls per group.
    verify thread      takes every group handed over so far (and, before each wait for the
                       GPU, those handed over since) and enqueues on the check stream,
                       per unit of consecutive groups (up to CHECK_BYTES; handoffs' last
                       layers apart from the rest) once its last group landed, the
                       copies down of the sender's checksums they hold and the checksums
                       of their layers (one table up for all, then per unit the copies
                       down and one launch, which writes its partial sums straight into
                       pinned host memory); then
                       takes the groups in order, waits (without the GIL) for each one's
                       checksums, compares them with the sender's, hands the layers to on_layer
                       on the scatter stream, and gives their staging buffers back after one
                       event.

    recv stream:     | sums + recv g0 | recv g1 | recv g2 | ...
    check stream:                     | sum g0 |  | sum g1 |  | sum g2 |   (a unit a group)
    verify thread:                             compare, scatter g0 (scatter stream), ...

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

from kvmesh.kernels.checksum import fold
from kvmesh.shared.handoff.listener import Expected, ListeningReceiver
from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl.frames import (
    MAX_SUMS_PROGRAMS,
    SCHEME,
    Frame,
    FrameReader,
    NcclFrameKind,
    message,
    read_frame,
    read_payload,
)
from kvmesh.shared.handoff.nccl.link import Rendezvous
from kvmesh.shared.handoff.nccl.pair import Fabric, NcclFabric, PairComm, connect_pair
from kvmesh.shared.handoff.nccl.staging import StagingPool
from kvmesh.shared.handoff.nccl.streams import HIGH_PRIORITY, DeviceStreams, Event
from kvmesh.shared.handoff.timeline import WHOLE, Timeline
from kvmesh.shared.handoff.transport import HandoffError
from kvmesh.shared.handoff.wire import JOIN_TIMEOUT_S, ProtocolError

log = logging.getLogger(__name__)

# The recvs of one group complete together (one NCCL kernel) and are checksummed together (one
# launch): small enough that the first layers' checksums run while later layers are on the
# wire, large enough that small layers share the host's work.
RECV_GROUP_BYTES = 64 << 20
# Consecutive groups handed over together share one checksum launch (after the last of them
# landed) until they hold this much: a launch and its verification cost the verify thread about
# what this many bytes take on the wire, so smaller groups go together (but a handoff's last
# layer not with the layers before it: after the last byte, only its checksum is left to run).
CHECK_BYTES = 64 << 20
_MAX_ROUND_LAYERS = 1 << 20  # layers a SUMS frame may announce at most


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


@dataclass(eq=False, slots=True)
class _Round:
    """The layers of the DATA frames since the last SUMS frame, and then (their SUMS frame) the
    sender's checksums of them: [count, programs] int64 partial sums, received into a staging
    buffer right after their data, copied down by the check stream; row i is the round's i-th
    layer."""

    taken: int = 0  # rows given to the round's DATA frames so far
    nbytes: int = 0  # of the partial sums on the communicator, once the SUMS frame came
    posted: bool = False  # their recv is posted: the verify thread copies them down
    ready: Event | None = None
    host: torch.Tensor | None = None  # [nbytes] uint8 on the host once `ready` completed
    values: list[int] | None = None  # the checksums, folded by the verify thread

    def expected(self, row: int, count: int) -> list[int] | None:
        """The sender's checksums of rows row.. (`count`; verify thread, once `ready`
        completed); None if their copy could not be enqueued."""
        if self.values is None:
            if self.host is None or self.ready is None:
                return None
            self.ready.synchronize()
            self.values = fold(self.host.view(torch.int64).reshape(self.taken, -1))
        return self.values[row : row + count]


@dataclass(slots=True)
class _Data:
    """A DATA frame, and (once accepted, after its recv is posted) the handoff that accepted its
    layers (None: rejected, NACKed)."""

    frame: Frame
    sums: _Round  # the round whose checksums (they follow it) cover its layers
    row: int  # its first layer's row in them
    state: _Expected | None = None

    @property
    def message_bytes(self) -> int:
        return self.frame.nbytes * self.frame.count

    @property
    def ends_handoff(self) -> bool:
        """Whether it holds its handoff's last layer (the sender sends a handoff's layers in
        order, so that is the last to arrive)."""
        return self.frame.layer + self.frame.count == self.frame.num_layers


@dataclass(eq=False, slots=True)
class _Landing:
    """A message's layers, accepted, received into one staging buffer."""

    state: _Expected
    first: int  # its first layer
    count: int
    buf: torch.Tensor  # [count * layer_nbytes] uint8 on the device, written by a recv
    sums: _Round  # the sender's checksums
    row: int  # its first layer's row in them

    def layer_keys(self) -> list[tuple[bytes, int]]:
        return [(self.state.key, self.first + i) for i in range(self.count)]


@dataclass(eq=False, slots=True)
class _Group:
    """The recvs posted together (one NCCL group): messages, then maybe the checksums of the round
    they end. Its accepted layers are checksummed together and verified together."""

    datas: list[_Data] = field(default_factory=list)
    sums: _Round | None = None  # the round whose checksums this group receives last
    bufs: list[torch.Tensor] = field(default_factory=list)  # its messages' staging, in order
    landings: list[_Landing] = field(default_factory=list)  # its accepted messages, in order
    sums_buf: torch.Tensor | None = None  # the staging the round's checksums land in
    received: Event | None = None  # on the recv stream, after the group's recvs
    ready: Event | None = None  # on the check stream, after its checksums and copies down
    # [its layers, P] int64 partial sums on the host: its rows of its unit's group_sums
    partials: torch.Tensor | None = None
    error: str = ""  # the checksums could not be enqueued

    @property
    def released(self) -> Event:
        """Completes after the group's last reader so far (its recvs, then its checksums)."""
        if self.ready is not None:
            return self.ready
        assert self.received is not None
        return self.received

    @property
    def runs(self) -> list[tuple[torch.Tensor, int]]:
        """Its accepted messages' staging buffers and how many layers each holds."""
        return [(x.buf, x.count) for x in self.landings]

    @property
    def num_layers(self) -> int:
        """Its accepted layers."""
        return sum(x.count for x in self.landings)

    @property
    def nbytes(self) -> int:
        """Its accepted layers' bytes."""
        return sum(x.buf.numel() for x in self.landings)

    @property
    def ends_handoff(self) -> bool:
        """Whether it holds a handoff's last layer (then that message alone: _recv_groups)."""
        return bool(self.datas) and self.datas[-1].ends_handoff

    @property
    def verifiable(self) -> bool:
        """Whether the sender's checksums of all its layers are posted (their SUMS came)."""
        return all(x.sums.posted for x in self.landings)


def _layers_of(frame: Frame) -> list[tuple[bytes, int]]:
    """(handoff id, layer) of each layer a DATA frame announces."""
    return [(frame.handoff_id, frame.layer + i) for i in range(frame.count)]


def _recv_groups(ops: list[_Round | _Data]) -> list[_Group]:
    """The burst's DATA frames, in order, in groups of at most RECV_GROUP_BYTES (a larger message
    alone; a handoff's last layer alone); a round's checksums (SUMS) end the group they come in,
    so that its layers are verified once that group landed."""
    groups: list[_Group] = []
    size = 0
    for op in ops:
        group = groups[-1] if groups and groups[-1].sums is None else None
        if isinstance(op, _Round):
            if group is None:
                group = _Group()
                groups.append(group)
            group.sums = op
            continue
        nbytes = op.message_bytes
        prev = group.datas[-1] if group is not None and group.datas else None
        if group is None or (
            prev is not None
            and (size + nbytes > RECV_GROUP_BYTES or op.ends_handoff or prev.ends_handoff)
        ):
            groups.append(_Group())
            size = 0
        groups[-1].datas.append(op)
        size += nbytes
    return groups


class _Link:
    """Decode side of one prefill's control connection and communicator."""

    def __init__(self, conn: socket.socket, dev: DeviceStreams, staging_bytes: int) -> None:
        self.conn = conn
        self.comm: PairComm | None = None
        self.recv_stream = dev.stream(HIGH_PRIORITY)  # only recvs: they go back to back
        self.check_stream = dev.stream(HIGH_PRIORITY)  # checksums, off the recv stream
        self.scatter_stream = dev.stream(HIGH_PRIORITY)
        readers = [self.check_stream, self.scatter_stream]
        self.staging = StagingPool(dev, self.recv_stream, readers, staging_bytes)
        # only the connection thread: the round the next DATA frames join; the posted groups
        # whose checksums are not all posted yet (their SUMS frame is still to come)
        self.round = _Round()
        self.waiting: list[_Group] = []
        self.verify: queue.SimpleQueue[list[_Group] | None] = queue.SimpleQueue()
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
    gRPC (offer_link, from Decode.OpenKVLink), its HELLO names the link (link).
    """

    def __init__(
        self, device: torch.device | str, bind_host: str = "127.0.0.1", port: int = 0,
        advertise_host: str | None = None, fabric: Fabric | None = None,
        setup_timeout: float = 60.0, max_layer_bytes: int = 1 << 34,
        staging_bytes: int = 2 << 30,
    ) -> None:  # fmt: skip
        super().__init__(bind_host, port, advertise_host, _Expected, "nccl", SCHEME)
        self.dev = DeviceStreams(torch.device(device))
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
        """A new pair's NCCL unique id, from Decode.OpenKVLink; link.LinkRefused if refused."""
        self.links.offer(link_id, unique_id)

    def close(self) -> None:
        self.links.close()
        super().close()

    @property
    def staging_allocations(self) -> int:
        """Staging buffers the live links allocated so far: constant in steady state."""
        with self._lock:
            return sum(link.staging.allocated for link in self._links)

    @property
    def staging_lent(self) -> int:
        """Staging buffers the live links hold for recvs, checksums and scatters right now."""
        with self._lock:
            return sum(link.staging.lent for link in self._links)

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
        if hello is None or hello.kind != NcclFrameKind.HELLO:
            raise ProtocolError("expected HELLO")
        link_id = read_payload(link.conn, hello).decode(errors="replace")
        try:
            unique_id = self.links.take(link_id)  # sent over gRPC, before or after the HELLO
            link.comm = connect_pair(self.fabric, self.dev, unique_id, 1, self.setup_timeout)
        except HandoffError as exc:
            link.send(message(NcclFrameKind.NACK, text=str(exc)))
            raise
        link.send(message(NcclFrameKind.READY))

    def _drop(self, link: _Link, verifier: threading.Thread) -> None:
        with self._lock:
            self._links.discard(link)
        self._disconnected(link.conn, lambda s: s.link is link)
        if link.comm is not None:
            with contextlib.suppress(nccl.NcclError):
                link.comm.abort()  # ends recvs still waiting on the dead peer
        link.waiting.clear()
        link.verify.put(None)
        if verifier.is_alive():
            verifier.join(JOIN_TIMEOUT_S)
        link.staging.clear()
        link.conn.close()

    # -- the connection's thread

    def _on_burst(self, link: _Link, burst: list[tuple[Frame, bytes]]) -> None:
        """Frames that arrived together, in their recv groups (_recv_groups): the first group,
        then all the others, each first posted (whatever the receiver makes of their frames:
        the data flows while it does), then its DATA frames (and the ABORT frames before them)
        taken in order, then handed to the verify thread."""
        ops: list[_Round | _Data] = []
        for frame, _ in burst:
            if frame.kind == NcclFrameKind.DATA:
                ops.append(self._announced(link, frame))
            elif frame.kind == NcclFrameKind.SUMS:
                ops.append(self._close_round(link, frame))
            elif frame.kind != NcclFrameKind.ABORT:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")
        if (timeline := self.timeline) is not None:
            timeline.mark_all("data", [key for d in ops if isinstance(d, _Data)
                                       for key in _layers_of(d.frame)])  # fmt: skip
        groups = _recv_groups(ops)
        datas = iter([op for op in ops if isinstance(op, _Data)])
        frames = iter(burst)
        for part in (groups[:1], groups[1:]):
            if not part:
                continue
            self._post(link, part)
            for _ in range(sum(len(g.datas) for g in part)):  # up to its last DATA frame
                while (item := next(frames))[0].kind != NcclFrameKind.DATA:
                    self._on_abort(*item)
                self._accept(link, next(datas))
            self._hand_over(link, part)
        for item in frames:  # the ABORT frames after the last DATA frame
            self._on_abort(*item)

    def _on_abort(self, frame: Frame, payload: bytes) -> None:
        """A frame between DATA frames: an ABORT fails its handoff (SUMS are posted with their
        group)."""
        if frame.kind == NcclFrameKind.ABORT and (state := self._get(frame.handoff_id)) is not None:
            self._fail(state, f"aborted by sender: {payload.decode(errors='replace')}")

    def _close_round(self, link: _Link, frame: Frame) -> _Round:
        """A SUMS frame: the checksums of the layers of the DATA frames since the last one."""
        count, programs = frame.num_layers, frame.value
        done, link.round = link.round, _Round()
        if count != done.taken:
            raise ProtocolError(f"SUMS frame of {count} layers after {done.taken} in DATA frames")
        if not 1 <= count <= _MAX_ROUND_LAYERS or not 1 <= programs <= MAX_SUMS_PROGRAMS:
            raise ProtocolError(f"SUMS frame of {count} layers x {programs} partial sums")
        if frame.nbytes != 8 * count * programs:
            raise ProtocolError(f"SUMS frame of {frame.nbytes} bytes for {count} x {programs}")
        done.nbytes = frame.nbytes
        return done

    def _announced(self, link: _Link, frame: Frame) -> _Data:
        """A DATA frame with its rows in the round's checksums (ProtocolError if no sender of
        this protocol would send it)."""
        if frame.nbytes > self.max_layer_bytes:
            raise ProtocolError(f"a layer of more than {self.max_layer_bytes} bytes")
        if not 1 <= frame.count <= frame.num_layers:
            raise ProtocolError("a DATA frame of no layers, or of more than its handoff has")
        sums = link.round
        if sums.taken + frame.count > _MAX_ROUND_LAYERS:
            raise ProtocolError(f"more than {_MAX_ROUND_LAYERS} layers with no SUMS frame")
        row = sums.taken
        sums.taken += frame.count
        return _Data(frame, sums, row)

    def _accept(self, link: _Link, data: _Data) -> None:
        """Sets the handoff a DATA frame's layers belong to, if it accepts them all (else
        NACKs)."""
        frame = data.frame
        state = self._get(frame.handoff_id)
        error = "handoff not expected (reserve first)"
        if state is not None:
            with state.lock:
                state.started = state.started or time.perf_counter()
                error = state.rejects(frame)
                state.arrived.update(range(frame.layer, frame.layer + frame.count))
                state.link = link
        if state is None or error:
            self._reject(link, frame.handoff_id, state, error)
        else:
            data.state = state

    def _post(self, link: _Link, groups: list[_Group]) -> None:
        """A recv for every DATA and SUMS frame of `groups` (also those of handoffs it will
        reject: NCCL's order must hold), a group at a time, into staging buffers."""
        assert link.comm is not None
        sizes = [
            [d.message_bytes for d in g.datas] + ([g.sums.nbytes] if g.sums is not None else [])
            for g in groups
        ]
        staged = iter(link.staging.take_all([n for group_sizes in sizes for n in group_sizes]))
        for group, group_sizes in zip(groups, sizes, strict=True):
            group.bufs = [next(staged) for _ in group_sizes]  # its messages', then its sums'
            with self.fabric.group():
                for buf in group.bufs:
                    link.comm.recv(buf, 0, link.recv_stream)
            group.received = Event(link.recv_stream)
            if group.sums is not None:
                group.sums.posted = True
                group.sums_buf = group.bufs.pop()
        if (timeline := self.timeline) is not None:
            timeline.mark_all("posted", [key for g in groups for d in g.datas
                                         for key in _layers_of(d.frame)])  # fmt: skip

    def _hand_over(self, link: _Link, groups: list[_Group]) -> None:
        """The posted groups' accepted messages (the staging of rejected ones goes back once it
        landed); then the groups whose checksums are all posted, in order, to the verify
        thread."""
        for group in groups:
            pairs = list(zip(group.datas, group.bufs, strict=True))
            rejected = [buf for d, buf in pairs if d.state is None]
            if rejected:  # the recvs still land (NCCL's order must hold), then free
                link.staging.give_all(rejected, group.released)
            for d, buf in pairs:
                if d.state is not None:
                    landing = _Landing(d.state, d.frame.layer, d.frame.count, buf, d.sums, d.row)
                    group.landings.append(landing)
        link.waiting += groups  # in order: a group goes once it and all before it can be verified
        n = 0
        while n < len(link.waiting) and link.waiting[n].verifiable:
            n += 1
        if n:
            link.verify.put(link.waiting[:n])
            del link.waiting[:n]

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
        while (groups := link.verify.get()) is not None:
            if self._verify(link, groups):
                return

    @staticmethod
    def _take_more(link: _Link, groups: list[_Group]) -> bool:
        """Add to `groups` every group handed over since; True once the link is closing."""
        while True:
            try:
                more = link.verify.get_nowait()
            except queue.Empty:
                return False
            if more is None:
                return True
            groups += more

    @staticmethod
    def _units(groups: list[_Group]) -> list[list[_Group]]:
        """The groups in units checksummed together: consecutive ones up to CHECK_BYTES, either
        all holding a handoff's last layer or none, so that after a handoff's last byte its
        checksum waits only for that layer's (and those of other handoffs' last layers)."""
        units: list[list[_Group]] = []
        size, ends = CHECK_BYTES, False
        for g in groups:
            if size >= CHECK_BYTES or g.ends_handoff != ends:
                units.append([])
                size, ends = 0, g.ends_handoff
            units[-1].append(g)
            size += g.nbytes
        return units

    def _checksum(self, link: _Link, groups: list[_Group]) -> None:
        """Enqueue on the check stream, per unit of groups (_units) once its last group landed,
        the copies down of the sender's checksums its groups received and the checksums of their
        accepted layers (one table up for all, one launch a unit). Never waits for the GPU; if
        the launch fails, the groups' handoffs fail."""
        work = [g for g in groups if g.runs or g.sums_buf is not None]
        if not work:
            return
        units = self._units(work)
        try:
            with self.dev.on(link.check_stream):
                done = self.dev.group_sums([
                    ([run for g in unit for run in g.runs], unit[-1].received,
                     [g.sums_buf for g in unit if g.sums_buf is not None])
                    for unit in units
                ])  # fmt: skip
        except Exception as exc:  # the groups' handoffs fail below
            log.exception("KV checksum launch failed")
            for g in work:
                g.error = f"checksum failed: {exc}"
                if g.sums_buf is not None:
                    link.staging.give(g.sums_buf, g.released)
            return
        for unit, (partials, downs, ready) in zip(units, done, strict=True):
            row = 0
            hosts = iter(downs)
            for g in unit:  # each its rows of the unit's checksums
                if partials is not None:
                    g.partials = partials[row : row + g.num_layers]
                    row += g.num_layers
                g.ready = ready
                if g.sums is not None and g.sums_buf is not None:
                    g.sums.host, g.sums.ready = next(hosts), ready
                    link.staging.give(g.sums_buf, ready)
        if (timeline := self.timeline) is not None:
            timeline.mark_all(
                "enqueued", [key for g in work for x in g.landings for key in x.layer_keys()]
            )
            for g in work:  # a diagnostic: watcher threads wait
                if g.landings:
                    keys = [key for x in g.landings for key in x.layer_keys()]
                    assert g.received is not None
                    self._watch(timeline, link, "landed", g.received, keys)
                    self._watch(timeline, link, "summed", g.released, keys)

    def _verify(self, link: _Link, groups: list[_Group]) -> bool:
        """Deliver each landed layer whose checksum is the sender's, in order, a group at a time
        and a message at a time (what is delivered goes on while the next group is awaited);
        after each unit of groups checksummed together, their staging buffers go back to the
        pool (after their last reader) before the handoffs they complete are settled. Before
        each group, the groups handed over meanwhile join, their checksums enqueued: the thread
        never waits for the GPU while groups wait for it. True once the link is closing."""
        delivered: list[_Landing] = []  # messages whose staging the scatters read
        completed: list[_Expected] = []
        closing = False
        checked = n = 0  # groups[:checked] have their checksums enqueued
        with self.dev.on(link.scatter_stream):  # where on_layer scatters
            while n < len(groups):
                closing = closing or self._take_more(link, groups)
                if checked < len(groups):
                    self._checksum(link, groups[checked:])
                    checked = len(groups)
                group = groups[n]
                if group.landings:
                    self._deliver(link, group, delivered, completed)
                n += 1
                if n == len(groups) or groups[n].ready is not group.ready or group.ready is None:
                    self._release(link, delivered, completed)  # the unit's end
                    delivered, completed = [], []
        return closing

    def _deliver(
        self, link: _Link, group: _Group, delivered: list[_Landing], completed: list[_Expected]
    ) -> None:  # fmt: skip
        """Deliver a group's layers once its checksums are in, adding to `delivered` the messages
        handed to on_layer and to `completed` the handoffs they complete."""
        values: list[int] = []
        if not group.error:
            assert group.ready is not None and group.partials is not None
            group.ready.synchronize()
            values = self.dev.checksums(group.partials)
        at = 0  # the message's first row in values
        for landing in group.landings:
            error = group.error or self._mismatch(landing, values[at : at + landing.count])
            at += landing.count
            state = landing.state
            if error:
                link.staging.give(landing.buf, group.released)
                self._reject(link, state.key, state, error)
                continue
            with state.lock:
                if state.closed:
                    link.staging.give(landing.buf, group.released)
                    continue
                # one view per layer in one call, not a slice each (none for a lone layer)
                payloads = (
                    (landing.buf,) if landing.count == 1
                    else landing.buf.view(landing.count, -1).unbind(0)
                )  # fmt: skip
                for i, payload in enumerate(payloads):
                    if error := state.deliver(landing.first + i, payload):
                        break
                delivered.append(landing)
                if not error and len(state.layers) == state.num_layers:
                    completed.append(state)
            if (timeline := self.timeline) is not None:
                timeline.mark_all("delivered", landing.layer_keys())
            if error:
                self._reject(link, state.key, state, error)

    @staticmethod
    def _mismatch(landing: _Landing, values: list[int]) -> str:
        """Why a message's layers are not the sender's ('' if they all are): `values` are their
        checksums as received."""
        expected = landing.sums.expected(landing.row, landing.count)
        if expected is None:
            return "the sender's checksums were lost"
        if values == expected:
            return ""
        bad = next(i for i, (a, b) in enumerate(zip(values, expected, strict=True)) if a != b)
        return f"checksum mismatch on layer {landing.first + bad}"

    def _release(self, link: _Link, delivered: list[_Landing], completed: list[_Expected]) -> None:
        """ACK the handoffs the delivered messages finished (their layers all passed their
        checksums and went to on_layer: the sender may reuse its side at once), give the
        messages' staging buffers back after their scatters, and complete those handoffs once
        the scatters landed (decode reads the blocks next)."""
        if not delivered:
            return
        acked = [state for state in completed if self._ack(link, state)]
        released = Event(link.scatter_stream)
        link.staging.give_all([landing.buf for landing in delivered], released)
        if acked:
            released.synchronize()
            for state in acked:
                self._close(state, ok=True)

    def _ack(self, link: _Link, state: _Expected) -> bool:
        """Send a handoff's ACK unless it was closed (failed or cancelled) meanwhile; whether it
        was sent."""
        with state.lock:
            if state.closed:
                return False
            if (timeline := self.timeline) is not None:
                timeline.mark("ack", state.key, WHOLE)
            link.send(message(NcclFrameKind.ACK, state.key))
        return True

    def _reject(self, link: _Link, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        link.send(message(NcclFrameKind.NACK, key, error))
