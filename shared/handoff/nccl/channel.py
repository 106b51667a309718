"""A handoff being pushed over NCCL (NcclSendChannel), and `send_layer_group`, which queues one
layer of several handoffs (one batch) for the sender thread to launch in one NCCL group
(`send_layer_runs`: runs of layers that already exist, each run one tensor)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

import torch

from kvmesh.shared.handoff.channel import SendChannel
from kvmesh.shared.handoff.nccl.pair import Peer
from kvmesh.shared.handoff.nccl.streams import DeviceStreams, Event
from kvmesh.shared.handoff.timeline import WHOLE, Timeline
from kvmesh.shared.handoff.transport import HandoffError, HandoffStats
from kvmesh.shared.handoff.wire import settle


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


class Launcher(Protocol):
    """What a channel needs of its sender (NcclKVSender): the device its data is on, the
    optional timeline, and the queue of the jobs that its launches take."""

    @property
    def dev(self) -> DeviceStreams: ...
    @property
    def timeline(self) -> Timeline | None: ...
    def submit(self, jobs: list[Job] | None, inline: bool = False) -> None: ...


class NcclSendChannel(SendChannel):
    """One handoff being pushed over NCCL (implements transport.KVSendChannel).

    send_layer takes the layer on the device and returns at once: the data must not be
    modified afterwards (the pusher's gather buffers never are); the sender thread keeps it
    alive until the send and checksum that read it are done.
    """

    transport = "nccl"

    def __init__(
        self, sender: Launcher, peer: Peer, handoff_id: str, num_layers: int
    ) -> None:  # fmt: skip
        super().__init__(handoff_id, num_layers)
        self.sender, self.peer = sender, peer
        self._spans: dict[int, tuple[Event, Event]] = {}  # layer -> (start, end) of its send

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        if send_layer_group(layer, [(self, data)]):
            self.queue(layer)  # raises the channel's error

    def finish(self, timeout: float) -> HandoffStats:
        self._await_ack(timeout, self.peer)
        return self._stats(self._layer_times)

    def abort(self, reason: str) -> None:
        if settle(self._done, HandoffError(f"aborted: {reason}")):
            job = Job(0, [(self, torch.empty(0))], Event(None), reason or "aborted")
            self.sender.submit([job])

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


def _queue_all(
    caller: str, items: list[tuple[NcclSendChannel, int, torch.Tensor, int]]
) -> tuple[list[tuple[NcclSendChannel, int, torch.Tensor, int]], Event | None,
           list[NcclSendChannel]]:  # fmt: skip
    """What both ways of queueing do first: layers first.. (`count` of them) of each channel
    queued (a channel that had already failed goes to the failed list), their data made
    contiguous; the channels must be of one sender; one event on the current stream after
    all that (the data exists once it completed). Returns (the queued items, the event (None
    if nothing was queued), the failed channels)."""
    queued, failed = [], []
    for channel, first, data, count in items:
        try:
            channel.queue(first, count)
        except HandoffError:
            failed.append(channel)
            continue
        queued.append((channel, first, data if data.is_contiguous() else data.contiguous(), count))
    if not queued:
        return queued, None, failed
    sender = queued[0][0].sender
    if any(channel.sender is not sender for channel, *_ in queued):
        raise ValueError(f"{caller} takes the channels of one sender")
    if (timeline := sender.timeline) is not None:
        keys = [(ch.key, first + i) for ch, first, _, count in queued for i in range(count)]
        timeline.mark_all("queued", keys)
    return queued, Event(sender.dev.current_stream()), failed


def send_layer_group(
    layer: int, items: list[tuple[NcclSendChannel, torch.Tensor]]
) -> list[NcclSendChannel]:
    """Queue layer `layer` of several handoffs (one batch, one NcclKVSender): their sends are
    launched together, in one ncclGroupStart/End. Call on the stream that produced the data.
    Returns the channels that had already failed (nothing is queued for them)."""
    queued, ready, failed = _queue_all(
        "send_layer_group", [(channel, layer, data, 1) for channel, data in items]
    )
    if ready is not None:
        job = Job(layer, [(channel, data) for channel, _, data, _ in queued], ready)
        queued[0][0].sender.submit([job])
    return failed


def send_layer_runs(runs: list[tuple[NcclSendChannel, int, torch.Tensor]]) -> list[NcclSendChannel]:
    """Queue runs of layers whose data all exists by now (KV already in the cache, or a
    request's layers gathered into one buffer): (channel, first layer, data [count, ...], the
    layers back to back), of one NcclKVSender. One event for all of them, launched in one
    round, each run as a few large messages: on the calling thread if the sender thread has
    nothing queued (no hand-over to it: the caller waits for the ACKs next), else by the sender
    thread after what is queued. Call on the stream that produced the data. Returns the
    channels that had already failed (nothing is queued for them)."""
    queued, ready, failed = _queue_all(
        "send_layer_runs", [(channel, first, data, data.shape[0]) for channel, first, data in runs]
    )
    if ready is not None:
        jobs = [Job(first, [(channel, data)], ready, count=count)
                for channel, first, data, count in queued]  # fmt: skip
        queued[0][0].sender.submit(jobs, inline=True)
    return failed
