"""A handoff being pushed over NCCL (NcclSendChannel), and `send_layer_group`, which queues one
layer of several handoffs (one batch) for the sender thread to launch in one NCCL group
(`send_layer_runs`: runs of layers that already exist, each run one tensor)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.handoff.channel import SendChannel
from shared.handoff.nccl_device import Event
from shared.handoff.timeline import WHOLE
from shared.handoff.transport import HandoffError, HandoffStats
from shared.handoff.wire import settle

if TYPE_CHECKING:
    from shared.handoff.nccl_pair import Peer
    from shared.handoff.nccl_sender import NcclKVSender


@dataclass(frozen=True)
class Job:
    """Layers `layer`.. (`count` of them) of one or more handoffs (a batch), or (reason set) an
    ABORT."""

    layer: int
    # data: contiguous, on the device; `count` layers back to back
    items: list[tuple[NcclSendChannel, torch.Tensor]]
    ready: Event  # recorded on the compute stream after the gathers
    abort: str = ""
    count: int = 1


class NcclSendChannel(SendChannel):
    """One handoff being pushed over NCCL (implements transport.KVSendChannel).

    send_layer takes the layer on the device and returns at once: the data must not be
    modified afterwards (the pusher's gather buffers never are); the sender thread keeps it
    alive until the send and checksum that read it are done.
    """

    transport = "nccl"

    def __init__(
        self, sender: NcclKVSender, peer: Peer, handoff_id: str, num_layers: int
    ) -> None:  # fmt: skip
        super().__init__(handoff_id, num_layers)
        self.sender, self.peer = sender, peer
        self._spans: dict[int, tuple[Event, Event]] = {}  # layer -> (start, end) of its send

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        if send_layer_group(layer, [(self, data)]):
            self.queue(layer)  # raises the channel's error

    def finish(self, timeout: float) -> HandoffStats:
        self._await_ack(timeout, self.peer)
        return self._stats()

    def abort(self, reason: str) -> None:
        if settle(self._done, HandoffError(f"aborted: {reason}")):
            job = Job(0, [(self, torch.empty(0))], Event(None), reason or "aborted")
            self.sender._submit([job])

    # -- called from the sender's threads

    def launched(self, first: int, count: int, nbytes: int, span: tuple[Event, Event]) -> None:
        """Layers first.. (`count`, `nbytes` in all) are enqueued between the events of `span`."""
        for layer in range(first, first + count):
            self._spans[layer] = span
        self._nbytes += nbytes

    def acked(self) -> None:
        super().acked()
        if (timeline := self.sender.timeline) is not None:
            timeline.mark("acked", self.key, WHOLE, self._acked_at)

    def _stats(self) -> HandoffStats:
        seconds = max(self._acked_at - self._first_send, 1e-9)
        return HandoffStats(self._nbytes, seconds, self._nbytes / seconds / 1e9, self._layer_times)

    def _layer_times(self) -> list[float]:
        """Each layer's share of the time its send's span took on the GPU."""
        layer_seconds = [0.0] * self.num_layers
        sharing = collections.Counter(id(span) for span in self._spans.values())
        elapsed: dict[int, float] = {}  # layers launched together share one span: time it once
        for layer, span in self._spans.items():
            if id(span) not in elapsed:
                elapsed[id(span)] = span[0].seconds_until(span[1]) / sharing[id(span)]
            layer_seconds[layer] = elapsed[id(span)]
        return layer_seconds


def send_layer_group(
    layer: int, items: list[tuple[NcclSendChannel, torch.Tensor]]
) -> list[NcclSendChannel]:
    """Queue layer `layer` of several handoffs (one batch, one NcclKVSender): their sends are
    launched together, in one ncclGroupStart/End. Call on the stream that produced the data.
    Returns the channels that had already failed (nothing is queued for them)."""
    queued, failed = [], []
    for channel, data in items:
        try:
            channel.queue(layer)
        except HandoffError:
            failed.append(channel)
            continue
        queued.append((channel, data if data.is_contiguous() else data.contiguous()))
    if queued:
        sender = queued[0][0].sender
        if any(ch.sender is not sender for ch, _ in queued):
            raise ValueError("send_layer_group takes the channels of one sender")
        ready = Event(sender.dev.current_stream())  # after the gathers (and copies above)
        sender._submit([Job(layer, queued, ready)])
        if (timeline := sender.timeline) is not None:
            timeline.mark_all("queued", [(ch.key, layer) for ch, _ in queued])
    return failed


def send_layer_runs(runs: list[tuple[NcclSendChannel, int, torch.Tensor]]) -> list[NcclSendChannel]:
    """Queue runs of layers whose data all exists by now (KV already in the cache, or a
    request's layers gathered into one buffer): (channel, first layer, data [count, ...], the
    layers back to back), of one NcclKVSender. One event for all of them, launched in one
    round, each run as a few large messages: on the calling thread if the sender thread has
    nothing queued (no hand-over to it: the caller waits for the ACKs next), else by the sender
    thread after what is queued. Call on the stream that produced the data. Returns the
    channels that had already failed (nothing is queued for them)."""
    failed: list[NcclSendChannel] = []
    jobs: list[Job] = []
    ready = None
    for channel, first, data in runs:
        try:
            channel.queue(first, data.shape[0])
        except HandoffError:
            failed.append(channel)
            continue
        if ready is None:
            ready = Event(channel.sender.dev.current_stream())  # after the gathers
        data = data if data.is_contiguous() else data.contiguous()
        jobs.append(Job(first, [(channel, data)], ready, count=data.shape[0]))
    if jobs:
        sender = jobs[0].items[0][0].sender
        if any(job.items[0][0].sender is not sender for job in jobs):
            raise ValueError("send_layer_runs takes the channels of one sender")
        if (timeline := sender.timeline) is not None:
            timeline.mark_all("queued", [(job.items[0][0].key, job.layer + i)
                                         for job in jobs for i in range(job.count)])  # fmt: skip
        sender._submit(jobs, inline=True)
    return failed
