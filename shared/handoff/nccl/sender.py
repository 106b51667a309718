"""Prefill side of the NCCL transport (control protocol: frames).

The engine's thread only records an event on its compute stream after each layer's gather and
queues the layer (send_layer_group). One sender thread does the rest, in rounds that each take
every layer queued so far, however many (a layer that finds the thread idle goes out with
those queued while it woke). Runs of layers that already exist (send_layer_runs: one event for
all) go out in one round on the caller's thread if nothing is queued before them, since that
caller waits for their ACKs next; launches never overlap and keep the order of submission.
A round:

    DATA, SUMS      one write per peer: a DATA frame a message (consecutive layers of a
                    handoff that lie back to back in memory go as one message of up to
                    MESSAGE_BYTES, a handoff's last layer alone; KVPusher gathers a request's
                    layers into one buffer), and a SUMS frame wherever the batch of messages
                    sent since the last one closes: once it holds BATCH_BYTES, and at the end
                    of a round that holds a handoff's last layer
    per segment     (the messages up to a SUMS frame, or the round's rest) one
                    ncclGroupStart/End of its sends, each peer's on its own stream after the
                    compute stream's events; where it closes a batch, one group of the batch's
                    checksums' sends, each peer's stream waiting for them. A segment that
                    closes a batch whose checksums are not computed yet launches, right after
                    its sends, those of the batches the round closes from it on, up to
                    LAUNCH_RATIO times its bytes (at least MESSAGE_BYTES): one Triton launch
                    (kernels/checksum) on the checksum stream, beside the sends (folded there
                    to one int64 a layer)

So the checksums travel on the communicator right behind the data they cover: the receiver
verifies a batch once it landed (after the last byte, only the last batch waits for its
checksums); a handoff the prefill produces a layer at a time costs one checksum launch per
BATCH_BYTES and one at its end, not one a layer; the sender thread never waits for the GPU, a
round costs a few dozen host calls whatever its size, and the compute stream never waits on
the network.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl.channel import Job, NcclSendChannel
from kvmesh.shared.handoff.nccl.frames import NO_ID, NcclFrameKind, message, pack
from kvmesh.shared.handoff.nccl.link import GrpcLinkOpener, LinkOpener
from kvmesh.shared.handoff.nccl.pair import Fabric, NcclFabric, PairCache, Peer
from kvmesh.shared.handoff.nccl.streams import HIGH_PRIORITY, DeviceStreams, Event
from kvmesh.shared.handoff.timeline import Timeline
from kvmesh.shared.handoff.transport import HandoffError
from kvmesh.shared.handoff.wire import JOIN_TIMEOUT_S

log = logging.getLogger(__name__)

_MAX_BATCH = 256  # jobs taken into one round when they queued up
# Layers coalesced into one send at most: the receiver stages a message in one buffer and
# checksums it once it landed, so a larger one costs staging memory; every message costs a
# recv group, a checksum launch and a delivery on the receiver's host, and its SUMS send
# here: large layers go in few messages (benchmarks/RESULTS.md, "Constants the code cites").
MESSAGE_BYTES = 512 << 20
# Messages whose checksums go together, after them: the receiver verifies a batch once its last
# message and the checksums landed, so a large round is verified in pieces while it lands, and
# a handoff the prefill sends a layer at a time is left, after its last layer, with at most this
# much to verify: the larger the batch, the longer the TTFT + ACK (benchmarks/RESULTS.md,
# "Constants the code cites").
BATCH_BYTES = 128 << 20
# The smallest message of a run's halving tail (message_sizes): the receiver's host work (a recv
# group, a checksum launch, a delivery) is per message, while the larger the last messages
# before the last layer, the more is left to verify after the wire. 32 x 16 MiB layers go as 4
# messages (256, 128, 112, 16 MiB) (benchmarks/RESULTS.md, "Constants the code cites").
TAIL_BYTES = 128 << 20
# One checksum launch reads up to this many times the bytes of the batch it starts at (and at
# least MESSAGE_BYTES): the GPU reads for a checksum about ten times faster than the link
# carries, so they are done before that batch has left, and the send of its checksums, which
# waits for them, holds up none of the messages after it; the fewer launches, the less host
# work between the sends.
LAUNCH_RATIO = 4


@dataclass(frozen=True, slots=True)
class _Sent:
    """One layer of one handoff in a round."""

    channel: NcclSendChannel
    layer: int
    data: torch.Tensor  # contiguous, on the device
    ready: Event  # its data exists once it completed


@dataclass(frozen=True, slots=True)
class _Message:
    """Consecutive layers of one handoff sent as one NCCL message."""

    channel: NcclSendChannel
    first: int  # its first layer
    count: int
    source: torch.Tensor  # contiguous: its bytes (row < 0), or holding them as rows row..
    nbytes: int
    ready: list[Event]  # the data exists once they completed
    row: int = -1

    @property
    def data(self) -> torch.Tensor:
        """The layers' bytes back to back, contiguous (a view made where it is sent: not on the
        way to its DATA frame)."""
        return self.source if self.row < 0 else self.source[self.row : self.row + self.count]

    @property
    def layer_nbytes(self) -> int:
        return self.nbytes // self.count

    @property
    def ends_handoff(self) -> bool:
        """Whether it holds its handoff's last layer."""
        return self.first + self.count == self.channel.num_layers


def _follows(prev: _Sent, s: _Sent) -> bool:
    """Whether s is the next layer of prev's handoff, right after it in the same buffer (views
    of one base tensor: two allocations that happen to be adjacent do not count)."""
    base = s.data._base
    return (
        s.channel is prev.channel
        and s.layer == prev.layer + 1
        and base is not None
        and base is prev.data._base
        and s.data.nbytes == prev.data.nbytes
        and s.data.data_ptr() == prev.data.data_ptr() + prev.data.nbytes
    )


def _span(first: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The `nbytes` bytes of first's storage from first's start, as a uint8 tensor."""
    offset = first.storage_offset() * first.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=first.device)
    return out.set_(first.untyped_storage(), offset, (nbytes,), (1,))


def coalesce(sends: list[_Sent], max_bytes: int | None = None) -> list[_Message]:
    """The messages of one round's single layers to one peer, in their order within each
    handoff: runs of consecutive layers back to back in memory, of at most max_bytes (default
    MESSAGE_BYTES, read when called, as `split` does; a handoff's last layer alone)."""
    max_bytes = MESSAGE_BYTES if max_bytes is None else max_bytes
    by_channel: dict[int, list[_Sent]] = {}
    for s in sends:
        by_channel.setdefault(id(s.channel), []).append(s)
    messages: list[_Message] = []
    for run in by_channel.values():
        current: list[_Sent] = []
        for s in run:
            if current and (
                s.layer == s.channel.num_layers - 1
                or not _follows(current[-1], s)
                or (len(current) + 1) * s.data.nbytes > max_bytes
            ):
                messages.append(_message(current))
                current = []
            current.append(s)
        if current:
            messages.append(_message(current))
    return messages


def _message(run: list[_Sent]) -> _Message:
    first = run[0]
    data = first.data if len(run) == 1 else _span(first.data, first.data.nbytes * len(run))
    return _Message(first.channel, first.layer, len(run), data, data.nbytes,
                    [s.ready for s in run])  # fmt: skip


def message_sizes(
    count: int, layer_bytes: int, ends: bool, max_bytes: int, tail_bytes: int
) -> list[int]:  # fmt: skip
    """How many layers each message of a run of `count` layers holds: at most max_bytes (at
    least a layer). A run that ends its handoff (`ends`) ends in messages that halve in size
    down to tail_bytes, then the last layer alone: the receiver verifies each message while the
    next, half as large, is on the wire, so that after the last byte it has little left to
    verify."""
    step = max(1, max_bytes // layer_bytes)
    if not ends:
        return [min(step, count - i) for i in range(0, count, step)]
    sizes = []
    left = count - 1
    while left:
        n = step if left >= 2 * step else -(-left // 2)
        if n * layer_bytes < tail_bytes:  # too small to halve further: the rest at once
            n = min(left, step)
        sizes.append(n)
        left -= n
    return [*sizes, 1]


def split(
    channel: NcclSendChannel, first: int, data: torch.Tensor, ready: Event,
    max_bytes: int | None = None,
) -> list[_Message]:  # fmt: skip
    """The messages of a run of layers first.. (data [count, ...], contiguous, a layer a row),
    in place, of message_sizes (max_bytes: MESSAGE_BYTES, tail_bytes: TAIL_BYTES)."""
    count = data.shape[0]
    layer_bytes = data.nbytes // count
    ends = first + count == channel.num_layers
    max_bytes = MESSAGE_BYTES if max_bytes is None else max_bytes
    sizes = message_sizes(count, layer_bytes, ends, max_bytes, TAIL_BYTES)
    if len(sizes) == 1:
        return [_Message(channel, first, count, data, data.nbytes, [ready])]
    starts = itertools.accumulate(sizes[:-1], initial=0)
    return [
        _Message(channel, first + i, n, data, n * layer_bytes, [ready], i)
        for i, n in zip(starts, sizes, strict=True)
    ]


@dataclass(slots=True)
class _Segment:
    """Messages of a round to one peer sent in one group, then, if `sums` is set, the checksums
    of the batch it closes (`sums`: every message sent to the peer since the last SUMS)."""

    messages: list[_Message]
    sums: list[_Message] | None = None


class NcclKVSender:
    """Prefill side of the NCCL transport (implements transport.KVSender).

    Keeps one pair (control connection + communicator) per decode endpoint, created on the
    first handoff to it, in an LRU cache of `max_peers`: the least recently used idle pair is
    torn down (ncclCommAbort) to make room. A pair's unique id goes to the decode worker by
    `links` (default: Decode.OpenKVLink at open's `decode_address`, as `worker_id`). The sender
    thread launches the sends and checksums (a caller of send_layer_runs its own, when nothing is
    queued before them); launches take turns, in the order they were submitted. `timeline`, if
    set, records when each layer passes each point (a diagnostic).
    """

    def __init__(
        self, device: torch.device | str, fabric: Fabric | None = None, max_peers: int = 8,
        connect_timeout: float = 5.0, setup_timeout: float = 60.0,
        links: LinkOpener | None = None, worker_id: str = "",
    ) -> None:  # fmt: skip
        self.dev = DeviceStreams(torch.device(device))
        self.dev.warm_up()
        self.fabric = fabric or NcclFabric()
        self.links: LinkOpener = links or GrpcLinkOpener(worker_id)
        self.pairs = PairCache(max_peers)
        self.connect_timeout, self.setup_timeout = connect_timeout, setup_timeout
        self.timeline: Timeline | None = None
        self._jobs: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
        # launches go one at a time, in submission order: `_waiting` counts the submissions
        # queued for the sender thread and not yet taken, `_launching` is set while one runs
        self._turn = threading.Condition()
        self._waiting = 0
        self._launching = False
        self._checksum_stream = self.dev.stream(HIGH_PRIORITY)
        self._thread = threading.Thread(target=self._send_loop, name="nccl-send", daemon=True)
        self._thread.start()

    @property
    def peers(self) -> list[str]:
        """Endpoints with a live pair, least recently used first."""
        return self.pairs.endpoints

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> NcclSendChannel:
        peer = self.pairs.get(endpoint, lambda e: Peer(self, e, decode_address))
        channel = NcclSendChannel(self, peer, handoff_id, num_layers)
        peer.add(channel)
        return channel

    def close(self) -> None:
        self.pairs.clear("sender closed")
        self.submit(None)
        self._thread.join(JOIN_TIMEOUT_S)

    def submit(self, jobs: list[Job] | None, inline: bool = False) -> None:
        """Queue `jobs` for the sender thread (None: it ends); `inline`: launch them on the
        calling thread instead if nothing queued before them waits (no hand-over to the sender
        thread: for a caller that has nothing else to do until its handoffs are ACKed)."""
        with self._turn:
            if not inline or jobs is None or self._waiting or self._launching:
                self._waiting += 1
                self._jobs.put(jobs)
                return
            self._launching = True
        try:
            with self.dev.bound():
                self._round(list(jobs))
        finally:
            self._end_turn()

    def _end_turn(self) -> None:
        with self._turn:
            self._launching = False
            self._turn.notify()

    # -- the sender thread

    def _send_loop(self) -> None:
        self.dev.bind_thread()
        while True:
            try:
                first, limit = self._jobs.get_nowait(), _MAX_BATCH
            except queue.Empty:  # idle: the first jobs to come go out alone
                first, limit = self._jobs.get(), 0
            with self._turn:  # after the inline launch of jobs submitted before `first`
                while self._launching:
                    self._turn.wait()
                self._launching = True
                jobs = self._take(first, limit)
            try:
                closing = self._round(jobs)
            finally:
                self._end_turn()
            if closing:
                return

    def _take(self, first: list[Job] | None, limit: int) -> list[Job | None]:
        """`first` and the jobs queued after it so far, while fewer than `limit` (the last queue
        operation may pass it), no further than an end (None); under `_turn`."""
        jobs: list[Job | None] = [None] if first is None else list(first)
        taken = 1
        while jobs[-1] is not None and len(jobs) < limit:
            try:
                more = self._jobs.get_nowait()
            except queue.Empty:
                break
            taken += 1
            jobs += [None] if more is None else more
        self._waiting -= taken
        return jobs

    def _round(self, jobs: list[Job | None]) -> bool:
        """Launch `jobs` (_launch_jobs), logging what fails; True at the end (None)."""
        try:
            return self._launch_jobs(jobs)
        except Exception:  # never let one round kill the thread every handoff relies on
            log.exception("KV send failed")
            return any(job is None for job in jobs)

    def _launch_jobs(self, jobs: list[Job | None]) -> bool:
        """Launch the sends of `jobs` in order, an ABORT where one is; True at the end (None)."""
        run: list[Job] = []
        for job in jobs:
            if job is None:
                self._launch(run)
                return True
            if job.abort:  # after the DATA of the layers queued before it
                self._launch(run)
                run = []
                channel = job.items[0][0]
                # its last layer may never come to close the batch its layers are in
                self._close_batch(channel.peer)
                channel.peer.write(message(NcclFrameKind.ABORT, channel.key, job.abort))
            else:
                run.append(job)
        self._launch(run)
        return False

    def _launch(self, jobs: list[Job]) -> None:
        live = [
            (job, channel, data)
            for job in jobs
            for channel, data in job.items
            if not channel.failed and not channel.peer.dead
        ]
        if not live:
            return
        peers = list({id(ch.peer): ch.peer for _, ch, _ in live}.values())
        segments = {}
        for peer in peers:
            mine = [(job, ch, data) for job, ch, data in live if ch.peer is peer]
            singles = [_Sent(ch, job.layer, data, job.ready)
                       for job, ch, data in mine if job.count == 1]  # fmt: skip
            messages = coalesce(singles)
            for job, ch, data in mine:
                if job.count > 1:
                    messages += split(ch, job.layer, data, job.ready)
            segments[id(peer)] = self._segments(peer, messages)
        for peer in peers:  # DATA and SUMS before the sends: the receiver posts its recvs on
            # them, so a send that must first connect more NCCL channels never waits for nothing
            peer.write(b"".join(self._frames(seg) for seg in segments[id(peer)]))
        self._launch_sends(jobs, peers, segments)

    @staticmethod
    def _segments(peer: Peer, messages: list[_Message]) -> list[_Segment]:
        """A round's messages to `peer` in segments: the batch of messages sent since the last
        SUMS closes (its checksums follow) once it holds BATCH_BYTES, and at the end of a round
        that holds a handoff's last layer. So a handoff that already exists goes in batches
        verified while the next are on the wire, and one a prefill produces a layer at a time
        costs one checksum launch per BATCH_BYTES and one at its end, not one a layer."""
        segments = [_Segment([])]
        ends = False  # a message since the last SUMS holds its handoff's last layer

        def close() -> None:
            nonlocal ends
            segments[-1].sums, peer.unsummed = peer.unsummed, []
            peer.unsummed_bytes, ends = 0, False
            segments.append(_Segment([]))

        for m in messages:
            segments[-1].messages.append(m)
            peer.unsummed.append(m)
            peer.unsummed_bytes += m.nbytes
            ends = ends or m.ends_handoff
            if peer.unsummed_bytes >= BATCH_BYTES:
                close()
        if ends and peer.unsummed:
            close()
        return [seg for seg in segments if seg.messages]

    def _frames(self, segment: _Segment) -> bytes:
        """A segment's DATA frames, then the SUMS frame of the checksums of the batch it closes."""
        frames = [
            pack(
                NcclFrameKind.DATA,
                m.channel.key,
                m.first,
                m.channel.num_layers,
                m.layer_nbytes,
                value=m.count,
            )  # fmt: skip
            for m in segment.messages
        ]
        if (batch := segment.sums) is not None:  # one checksum a layer (_checksums)
            count = sum(m.count for m in batch)
            frames.append(pack(NcclFrameKind.SUMS, NO_ID, 0, count, 8 * count, value=1))
        return b"".join(frames)

    def _launch_sends(
        self, jobs: list[Job], peers: list[Peer], segments: dict[int, list[_Segment]]
    ) -> None:  # fmt: skip
        """Per segment: one group of sends (one per message, each peer's on its own stream after
        the compute stream's events), their channels told (before any checksums go: the ACK may
        follow them); if it closes a batch, the batch's checksums on the checksum stream beside
        them (launched with those of the batches after it, _batch_checksums, unless an earlier
        segment's launch covered it), then one group of the checksums' sends, each peer's stream
        waiting for them."""
        for peer in sorted(peers, key=id):
            peer.lock.acquire()
        try:
            # every layer whose DATA went out is sent, also if its handoff failed meanwhile:
            # the receiver posted a recv for it
            ready = [job.ready for job in jobs]
            starts = {}
            for peer in peers:
                self.dev.wait_all(peer.stream, ready)
                starts[id(peer)] = Event(peer.stream, timing=True)
            sums: dict[int, tuple[torch.Tensor, Event]] = {}  # by id(batch): its checksums
            batches = [  # in the order they close
                seg.sums for segs in itertools.zip_longest(*(segments[id(p)] for p in peers))
                for seg in segs if seg is not None and seg.sums is not None
            ]  # fmt: skip
            try:
                for b in range(max(len(segments[id(p)]) for p in peers)):
                    now = [(p, segments[id(p)][b]) for p in peers if b < len(segments[id(p)])]
                    with self.fabric.group():
                        for peer, seg in now:
                            if not peer.dead:
                                for m in seg.messages:
                                    peer.comm.send(m.data, 1, peer.stream)
                    self._launched([(p, seg.messages) for p, seg in now], starts)
                    closing = [(p, seg.sums) for p, seg in now if seg.sums]
                    if not closing:
                        continue
                    for _, batch in closing:  # a launch may stop short of the next peer's
                        if id(batch) not in sums:
                            sums.update(self._batch_checksums(batches, batch))
                    with self.fabric.group():
                        for peer, batch in closing:
                            if not peer.dead:
                                partials, summed = sums[id(batch)]
                                self.dev.wait(peer.stream, summed)
                                peer.comm.send(partials, 1, peer.stream)
                    for peer, batch in closing:
                        self.dev.keep(sums[id(batch)][0], peer.stream)
            except nccl.NcclError as exc:
                failed: list[Peer] = peers
                error = str(exc)
            else:
                failed, error = [], ""
            for peer in peers:
                for seg in segments[id(peer)]:
                    for m in seg.messages:
                        self.dev.keep(m.source, peer.stream)
        finally:
            for peer in peers:
                peer.lock.release()
        for peer in failed:
            peer.die(f"NCCL send failed: {error}")

    def _close_batch(self, peer: Peer) -> None:
        """Send the checksums of the messages sent to `peer` since the last SUMS frame, so that
        the receiver settles their layers (and frees their staging) without waiting for more."""
        if not peer.unsummed or peer.dead:
            return
        batch, peer.unsummed, peer.unsummed_bytes = peer.unsummed, [], 0
        peer.write(self._frames(_Segment([], batch)))
        with peer.lock:
            partials, summed = self._checksums(batch)
            try:
                with self.fabric.group():
                    self.dev.wait(peer.stream, summed)
                    peer.comm.send(partials, 1, peer.stream)
            except nccl.NcclError as exc:
                error = str(exc)
            else:
                self.dev.keep(partials, peer.stream)
                return
        peer.die(f"NCCL send failed: {error}")

    def _launched(
        self, sent: list[tuple[Peer, list[_Message]]], starts: dict[int, Event]
    ) -> None:  # fmt: skip
        """Tell the channels of messages just enqueued (stats: the span of their sends)."""
        told = [(peer, messages) for peer, messages in sent if not peer.dead]
        for peer, messages in told:
            span = (starts[id(peer)], Event(peer.stream, timing=True))
            for m in messages:
                m.channel.launched(m.first, m.count, m.nbytes, span)
        if (timeline := self.timeline) is not None:  # a diagnostic: no keys built without it
            keys = [(m.channel.key, m.first + i)
                    for _, messages in told for m in messages for i in range(m.count)]  # fmt: skip
            timeline.mark_all("launched", keys)

    def _batch_checksums(
        self, batches: list[list[_Message]], first: list[_Message]
    ) -> dict[int, tuple[torch.Tensor, Event]]:  # fmt: skip
        """_checksums of the batches from `first` on, in one launch, up to the one that makes
        them LAUNCH_RATIO times first's bytes, or MESSAGE_BYTES if more (the batches of a round
        share a few launches; the first batch's checksums are not held up by more than the GPU
        reads while it is on the wire): by id(batch), its rows and the event."""
        start = next(i for i, batch in enumerate(batches) if batch is first)
        limit = max(MESSAGE_BYTES, LAUNCH_RATIO * sum(m.nbytes for m in first))
        end, size = start, 0
        while end < len(batches) and size < limit:
            size += sum(m.nbytes for m in batches[end])
            end += 1
        chosen = batches[start:end]
        partials, summed = self._checksums([m for batch in chosen for m in batch])
        rows = partials.split([sum(m.count for m in batch) for batch in chosen])
        return {id(batch): (part, summed) for batch, part in zip(chosen, rows, strict=True)}

    def _checksums(self, batch: list[_Message]) -> tuple[torch.Tensor, Event]:
        """The checksums of a batch's layers ([layers, 1] int64 on the device, as its SUMS frame
        announced: folded there, so the receiver folds one value a layer), enqueued on the
        checksum stream (which waits for the data), and the event after them. If they cannot
        be computed, the batch's handoffs fail and zeros go in their place (the receiver expects
        the bytes)."""
        programs = self.dev.sum_programs(sum(m.nbytes for m in batch))
        self.dev.wait_all(self._checksum_stream, [e for m in batch for e in m.ready])
        for m in batch:  # sent in earlier rounds, perhaps: not reused before it is read here
            self.dev.keep(m.source, self._checksum_stream)
        with self.dev.on(self._checksum_stream):
            try:
                partials = self.dev.layer_sums([(m.data, m.count) for m in batch], programs)
            except Exception as exc:
                log.exception("KV checksum launch failed")
                for m in batch:
                    m.channel.fail(HandoffError(f"checksum failed: {exc}"))
                partials = self.dev.zeros((sum(m.count for m in batch), 1))
            return partials, Event(self._checksum_stream)
