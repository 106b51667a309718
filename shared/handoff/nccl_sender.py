"""Prefill side of the NCCL transport (control protocol: nccl_frames).

Streams: the engine's compute stream records an event after each layer's gather; one sender
thread makes the peer's stream wait on it and launches the send, and a checksum stream computes
the checksum (kernels/checksum) beside the send. A publisher thread waits for the checksums and
sends the CKSUM frames, so the sender thread never waits on the GPU, and the compute stream
never waits on the network. Sends of one layer to several decode workers (one batch), and every
layer queued meanwhile, are launched in one ncclGroupStart/End.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

from shared.handoff import nccl
from shared.handoff.nccl_channel import Job, NcclSendChannel
from shared.handoff.nccl_device import Device, Event
from shared.handoff.nccl_frames import MASK64, Frame, Kind, message
from shared.handoff.nccl_pair import Fabric, NcclFabric, PairCache, Peer
from shared.handoff.wire import JOIN_TIMEOUT_S

log = logging.getLogger(__name__)

_MAX_BATCH = 256  # layers launched together when they queued up


@dataclass(frozen=True)
class _Checksums:
    """Checksums of launched layers, being computed on the checksum stream."""

    done: Event
    layers: list[tuple[NcclSendChannel, int]]  # (handoff, layer) per entry of values
    values: torch.Tensor  # [len(layers)] int64, pinned host


@dataclass(frozen=True)
class _Send:
    """One layer of one handoff, about to be launched."""

    job: Job
    channel: NcclSendChannel
    data: torch.Tensor  # [nbytes] uint8 view of the layer, on the device


class NcclKVSender:
    """Prefill side of the NCCL transport (implements transport.KVSender).

    Keeps one pair (control connection + communicator) per decode endpoint, created on the
    first handoff to it, in an LRU cache of `max_peers`: the least recently used idle pair is
    torn down (ncclCommAbort) to make room. One thread launches every send, in queue order;
    another publishes the checksums.
    """

    def __init__(
        self, device: torch.device | str, fabric: Fabric | None = None, max_peers: int = 8,
        connect_timeout: float = 5.0, setup_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.dev = Device(torch.device(device))
        self.fabric = fabric or NcclFabric()
        self.pairs = PairCache(max_peers)
        self.connect_timeout, self.setup_timeout = connect_timeout, setup_timeout
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._checksums: queue.SimpleQueue[_Checksums | None] = queue.SimpleQueue()
        self._checksum_stream = self.dev.stream()
        self._thread = threading.Thread(target=self._send_loop, name="nccl-send", daemon=True)
        self._publisher = threading.Thread(
            target=self._publish_loop, name="nccl-cksum", daemon=True
        )
        self._thread.start()
        self._publisher.start()

    @property
    def peers(self) -> list[str]:
        """Endpoints with a live pair, least recently used first."""
        return self.pairs.endpoints

    def open(self, endpoint: str, handoff_id: str, num_layers: int) -> NcclSendChannel:
        peer = self.pairs.get(endpoint, lambda e: Peer(self, e))
        channel = NcclSendChannel(self, peer, handoff_id, num_layers)
        peer.add(channel)
        return channel

    def close(self) -> None:
        self.pairs.clear("sender closed")
        self._jobs.put(None)
        self._thread.join(JOIN_TIMEOUT_S)
        self._checksums.put(None)
        self._publisher.join(JOIN_TIMEOUT_S)

    def _submit(self, job: Job) -> None:
        self._jobs.put(job)

    # -- the sender thread

    def _send_loop(self) -> None:
        self.dev.bind_thread()
        while True:
            batch = [self._jobs.get()]  # every layer queued by now goes out in one launch
            while batch[-1] is not None and not batch[-1].abort and len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            last = batch[-1]
            try:
                self._launch([j for j in batch if j is not None and not j.abort])
                if last is not None and last.abort:
                    channel = last.items[0][0]
                    channel.peer.write(message(Kind.ABORT, channel.key, last.abort))
            except Exception:  # never let one batch kill the thread every handoff relies on
                log.exception("KV send failed")
            if last is None:
                return

    def _launch(self, jobs: list[Job]) -> None:
        sends = [
            _Send(job, ch, d.view(torch.uint8).reshape(-1))
            for job in jobs
            for ch, d in job.items
            if not ch.failed and not ch.peer.dead
        ]
        if not sends:
            return
        peers = list({id(s.channel.peer): s.channel.peer for s in sends}.values())
        for peer in peers:  # DATA before the sends: the receiver posts its recvs on them, so
            # a send that must first connect more NCCL channels never waits for nothing
            frames = [
                Frame(Kind.DATA, s.channel.key, s.job.layer, s.channel.num_layers, s.data.numel())
                for s in sends
                if s.channel.peer is peer
            ]
            peer.write(b"".join(f.pack() for f in frames))
        launched, spans = self._launch_sends(jobs, sends, peers)
        for s in launched:
            start, end = spans[id(s.channel.peer)]
            s.channel.launched(s.job.layer, s.data.numel(), start, end)
        if not launched:
            return
        stream = self._checksum_stream
        with self.dev.on(stream):  # beside the sends: both only read the data
            for job in jobs:
                if job.ready is not None:
                    self.dev.wait(stream, job.ready)
            values = self.dev.checksums([s.data for s in launched])
            for s in launched:
                self.dev.keep(s.data, stream)
            done = Event(stream)
        # after the DATA frames above: a CKSUM never overtakes its DATA on the connection
        self._checksums.put(_Checksums(done, [(s.channel, s.job.layer) for s in launched], values))

    def _launch_sends(
        self, jobs: list[Job], sends: list[_Send], peers: list[Peer]
    ) -> tuple[list[_Send], dict[int, tuple[Event, Event]]]:
        """One group of sends, each peer's on its own stream after the compute stream's events."""
        for peer in sorted(peers, key=id):
            peer.lock.acquire()
        try:
            # every layer whose DATA went out is sent, also if its handoff failed meanwhile:
            # the receiver posted a recv for it
            live = [s for s in sends if not s.channel.peer.dead]
            starts = {}
            for peer in peers:
                for job in jobs:
                    if job.ready is not None:
                        self.dev.wait(peer.stream, job.ready)
                starts[id(peer)] = Event(peer.stream, timing=True)
            try:
                with self.fabric.group():
                    for s in live:
                        s.channel.peer.comm.send(s.data, 1, s.channel.peer.stream)
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

    # -- the publisher thread

    def _publish_loop(self) -> None:
        """Send the CKSUM frames of launched layers as their checksums complete, in order."""
        self.dev.bind_thread()
        while (sums := self._checksums.get()) is not None:
            try:
                sums.done.synchronize()
                self._publish(sums)
            except Exception:  # never let one batch kill the thread every handoff relies on
                log.exception("KV checksum publishing failed")

    def _publish(self, sums: _Checksums) -> None:
        frames: dict[int, tuple[Peer, list[bytes]]] = {}
        for (channel, layer), value in zip(sums.layers, sums.values.tolist(), strict=True):
            if not channel.failed and not channel.peer.dead:
                frame = Frame(Kind.CKSUM, channel.key, layer, value=value & MASK64)
                frames.setdefault(id(channel.peer), (channel.peer, []))[1].append(frame.pack())
        for peer, packed in frames.values():
            peer.write(b"".join(packed))
