"""Prefill side of the NCCL transport (control protocol: nccl_frames).

The engine's thread only records an event on its compute stream after each layer's gather and
queues the layer (send_layer_group; several layers that already exist: one event and one queue
operation for all, send_layer_groups). One sender thread does the rest, in rounds that each take
every layer queued so far, however many (a layer that finds the thread idle goes out alone,
after one layer's host work):

    DATA frames     one write per peer
    sends           one ncclGroupStart/End; each peer's stream waits for the newest gathers;
                    one send per message: consecutive layers of a handoff that lie back to back
                    in memory (KVPusher gathers a request's layers into one buffer) go as one
                    message of up to MESSAGE_BYTES, a handoff's last layer alone
    ...             while layers are queued, their rounds first (a backlog is on the wire
                    before any checksum work); then, once the oldest launched layer's data
                    exists on the GPU (the thread waits for its event without the GIL; layers
                    queued meanwhile are launched first), for every launched layer whose data
                    exists:
    checksums       one Triton launch (kernels/checksum) on the checksum stream
    CKSUM frames    one write per peer, once the checksums are computed

So the receiver has its recvs posted before the data exists (a send never spins on the GPU
waiting for them), a round costs a few dozen host calls whatever its size, the thread that
shares the GIL with the engine wakes about once per layer the GPU produces (layers the engine
queues ahead of the GPU batch up), and the compute stream never waits on the network.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from shared.handoff import nccl
from shared.handoff.nccl_channel import Job, NcclSendChannel
from shared.handoff.nccl_device import HIGH_PRIORITY, Device, Event
from shared.handoff.nccl_frames import MASK64, Kind, message, pack
from shared.handoff.nccl_link import GrpcLinkOpener, LinkOpener
from shared.handoff.nccl_pair import Fabric, NcclFabric, PairCache, Peer
from shared.handoff.timeline import Timeline
from shared.handoff.wire import JOIN_TIMEOUT_S

log = logging.getLogger(__name__)

_MAX_BATCH = 256  # jobs taken into one round when they queued up
# Layers coalesced into one send at most: the receiver stages a message in one buffer and
# checksums it once it landed, so a larger one costs staging memory and tail latency.
MESSAGE_BYTES = 256 << 20


@dataclass(slots=True)
class _Message:
    """Consecutive layers of one handoff sent as one NCCL message (`data` spans them)."""

    first: _Sent
    count: int
    data: torch.Tensor  # uint8, the layers' bytes back to back

    @property
    def layer_nbytes(self) -> int:
        return self.first.data.nbytes


def _follows(prev: _Sent, s: _Sent) -> bool:
    """Whether s is the next layer of prev's handoff, right after it in the same storage."""
    return (
        s.channel is prev.channel
        and s.layer == prev.layer + 1
        and s.data.nbytes == prev.data.nbytes
        and s.data.device == prev.data.device
        and s.data.untyped_storage().data_ptr() == prev.data.untyped_storage().data_ptr()
        and s.data.data_ptr() == prev.data.data_ptr() + prev.data.nbytes
    )


def _span(first: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The `nbytes` bytes of first's storage from first's start, as a uint8 tensor."""
    offset = first.storage_offset() * first.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=first.device)
    return out.set_(first.untyped_storage(), offset, (nbytes,), (1,))


def coalesce(sends: list[_Sent], max_bytes: int = MESSAGE_BYTES) -> list[_Message]:
    """The messages of one round's sends to one peer, in their order within each handoff: runs of
    consecutive layers back to back in memory, of at most max_bytes (a handoff's last layer
    alone)."""
    by_channel: dict[int, list[_Sent]] = {}
    for s in sends:
        by_channel.setdefault(id(s.channel), []).append(s)
    messages: list[_Message] = []
    for run in by_channel.values():
        current: list[_Sent] = []
        for s in run:
            last_layer = s.layer == s.channel.num_layers - 1
            if current and (
                last_layer
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
    return _Message(first, len(run), data)


@dataclass(frozen=True, slots=True)
class _Sent:
    """One layer of one handoff whose send is launched; its checksum follows once its data
    exists."""

    channel: NcclSendChannel
    layer: int
    data: torch.Tensor  # contiguous, on the device
    ready: Event  # the data exists once it completes

    @property
    def live(self) -> bool:
        return not self.channel.failed and not self.channel.peer.dead


class NcclKVSender:
    """Prefill side of the NCCL transport (implements transport.KVSender).

    Keeps one pair (control connection + communicator) per decode endpoint, created on the
    first handoff to it, in an LRU cache of `max_peers`: the least recently used idle pair is
    torn down (ncclCommAbort) to make room. A pair's unique id goes to the decode worker by
    `links` (default: Decode.OpenKVLink at open's `decode_address`, as `worker_id`). One thread
    launches every send and checksum, in queue order. `timeline`, if set, records when each
    layer passes each point (a diagnostic).
    """

    def __init__(
        self, device: torch.device | str, fabric: Fabric | None = None, max_peers: int = 8,
        connect_timeout: float = 5.0, setup_timeout: float = 60.0,
        links: LinkOpener | None = None, worker_id: str = "",
    ) -> None:  # fmt: skip
        self.dev = Device(torch.device(device))
        self.dev.warm_up()
        self.fabric = fabric or NcclFabric()
        self.links: LinkOpener = links or GrpcLinkOpener(worker_id)
        self.pairs = PairCache(max_peers)
        self.connect_timeout, self.setup_timeout = connect_timeout, setup_timeout
        self.timeline: Timeline | None = None
        self._jobs: queue.SimpleQueue[list[Job] | None] = queue.SimpleQueue()
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
        self._jobs.put(None)
        self._thread.join(JOIN_TIMEOUT_S)

    def _submit(self, jobs: list[Job]) -> None:
        self._jobs.put(jobs)

    # -- the sender thread

    def _send_loop(self) -> None:
        self.dev.bind_thread()
        unchecked: collections.deque[_Sent] = collections.deque()  # launched, in launch order
        while True:
            jobs = self._take(_MAX_BATCH)
            if not jobs and unchecked:  # wait (no GIL held) until the oldest one's data exists
                unchecked[0].ready.synchronize()
                jobs = self._take(_MAX_BATCH)  # queued meanwhile: their sends go first
            elif not jobs:  # idle: the first jobs to come go out alone
                first = self._jobs.get()
                jobs = [None] if first is None else list(first)
            closing = False
            if jobs:
                try:
                    closing = self._launch_jobs(jobs, unchecked)
                except Exception:  # never let one round kill the thread every handoff relies on
                    log.exception("KV send failed")
                    closing = any(job is None for job in jobs)
                if not closing and self._queued():  # a backlog: on the wire before checksums
                    continue
            try:
                self._checksum(unchecked)
            except Exception:
                log.exception("KV checksum failed")
            if closing:
                return

    def _queued(self) -> bool:
        return not self._jobs.empty()

    def _take(self, limit: int) -> list[Job | None]:
        """The jobs queued so far, in queue operations of `limit` jobs in all (or one more)."""
        jobs: list[Job | None] = []
        while len(jobs) < limit:
            try:
                more = self._jobs.get_nowait()
            except queue.Empty:
                break
            if more is None:
                jobs.append(None)
                break
            jobs += more
        return jobs

    def _launch_jobs(self, jobs: list[Job | None], unchecked: collections.deque[_Sent]) -> bool:
        """Launch the sends of `jobs` in order, an ABORT where one is; True at the end (None)."""
        run: list[Job] = []
        for job in jobs:
            if job is None:
                self._launch(run, unchecked)
                return True
            if job.abort:  # after the DATA of the layers queued before it
                self._launch(run, unchecked)
                run = []
                channel = job.items[0][0]
                channel.peer.write(message(Kind.ABORT, channel.key, job.abort))
            else:
                run.append(job)
        self._launch(run, unchecked)
        return False

    def _launch(self, jobs: list[Job], unchecked: collections.deque[_Sent]) -> None:
        sends = [
            _Sent(channel, job.layer, data, job.ready)
            for job in jobs
            for channel, data in job.items
            if not channel.failed and not channel.peer.dead
        ]
        if not sends:
            return
        peers = list({id(s.channel.peer): s.channel.peer for s in sends}.values())
        messages = {id(p): coalesce([s for s in sends if s.channel.peer is p]) for p in peers}
        for peer in peers:  # DATA before the sends: the receiver posts its recvs on them, so
            # a send that must first connect more NCCL channels never waits for nothing
            peer.write(
                b"".join(
                    pack(
                        Kind.DATA,
                        m.first.channel.key,
                        m.first.layer,
                        m.first.channel.num_layers,
                        m.layer_nbytes,
                        value=m.count,
                    )
                    for m in messages[id(peer)]
                )  # fmt: skip
            )
        launched, spans = self._launch_sends(jobs, sends, peers, messages)
        for s in launched:
            s.channel.launched(s.layer, s.data.nbytes, spans[id(s.channel.peer)])
        unchecked.extend(launched)
        if (timeline := self.timeline) is not None:
            timeline.mark_all("launched", [(s.channel.key, s.layer) for s in launched])

    def _launch_sends(
        self, jobs: list[Job], sends: list[_Sent], peers: list[Peer],
        messages: dict[int, list[_Message]],
    ) -> tuple[list[_Sent], dict[int, tuple[Event, Event]]]:  # fmt: skip
        """One group of sends (one per message), each peer's on its own stream after the compute
        stream's events."""
        for peer in sorted(peers, key=id):
            peer.lock.acquire()
        try:
            # every layer whose DATA went out is sent, also if its handoff failed meanwhile:
            # the receiver posted a recv for it
            live = [s for s in sends if not s.channel.peer.dead]
            starts = {}
            for peer in peers:
                self.dev.wait_all(peer.stream, [job.ready for job in jobs])
                starts[id(peer)] = Event(peer.stream, timing=True)
            try:
                with self.fabric.group():
                    for peer in peers:
                        if not peer.dead:
                            for m in messages[id(peer)]:
                                peer.comm.send(m.data, 1, peer.stream)
            except nccl.NcclError as exc:
                failed: list[Peer] = peers
                error = str(exc)
            else:
                failed, error = [], ""
            spans = {id(p): (starts[id(p)], Event(p.stream, timing=True)) for p in peers}
            for s in live:
                self.dev.keep(s.data, s.channel.peer.stream)
        finally:
            for peer in peers:
                peer.lock.release()
        for peer in failed:
            peer.die(f"NCCL send failed: {error}")
        return ([] if failed else live), spans

    def _checksum(self, unchecked: collections.deque[_Sent]) -> None:
        """Checksum the launched layers whose data exists (the oldest first: a stream's events
        complete in order), then send their CKSUM frames: one launch, one write per peer."""
        batch: list[_Sent] = []
        seen: Event | None = None  # the layers of one job share its event
        while unchecked and (unchecked[0].ready is seen or unchecked[0].ready.query()):
            seen = unchecked[0].ready
            batch.append(unchecked.popleft())
        batch = [s for s in batch if s.live]  # a failed handoff needs no more checksums
        if not batch:
            return
        with self.dev.on(self._checksum_stream):  # beside the sends: both only read the data
            [(partials, done)] = self.dev.group_sums([([s.data for s in batch], None)])
        done.synchronize()
        values = self.dev.checksums(partials)
        frames: dict[int, tuple[Peer, list[bytes]]] = {}
        for s, value in zip(batch, values, strict=True):
            if s.live:  # after the DATA frames: a CKSUM never overtakes its DATA
                frame = pack(Kind.CKSUM, s.channel.key, s.layer, value=value & MASK64)
                frames.setdefault(id(s.channel.peer), (s.channel.peer, []))[1].append(frame)
        if (timeline := self.timeline) is not None:
            timeline.mark_all("published", [(s.channel.key, s.layer) for s in batch])
        for peer, packed in frames.values():
            peer.write(b"".join(packed))
