"""A handoff being pushed over NCCL (NcclSendChannel), and `send_layer_group`, which queues one
layer of several handoffs (one batch) for the sender thread to launch in one NCCL group
(`send_layer_groups`: several layers at once, for KV that already exists)."""

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
    """One layer of one or more handoffs (a batch), or (reason set) an ABORT."""

    layer: int
    items: list[tuple[NcclSendChannel, torch.Tensor]]  # data: contiguous, on the device
    ready: Event  # recorded on the compute stream after the gathers
    abort: str = ""


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

    def launched(self, layer: int, nbytes: int, span: tuple[Event, Event]) -> None:
        self._spans[layer] = span
        self._nbytes += nbytes

    def acked(self) -> None:
        super().acked()
        if (timeline := self.sender.timeline) is not None:
            timeline.mark("acked", self.key, WHOLE, self._acked_at)

    def _stats(self) -> HandoffStats:
        seconds = max(self._acked_at - self._first_send, 1e-9)
        layer_seconds = [0.0] * self.num_layers
        sharing = collections.Counter(id(span) for span in self._spans.values())
        elapsed: dict[int, float] = {}  # layers launched together share one span: time it once
        for layer, span in self._spans.items():
            if id(span) not in elapsed:
                elapsed[id(span)] = span[0].seconds_until(span[1]) / sharing[id(span)]
            layer_seconds[layer] = elapsed[id(span)]
        return HandoffStats(self._nbytes, seconds, self._nbytes / seconds / 1e9, layer_seconds)


def send_layer_group(
    layer: int, items: list[tuple[NcclSendChannel, torch.Tensor]]
) -> list[NcclSendChannel]:
    """Queue layer `layer` of several handoffs (one batch, one NcclKVSender): their sends are
    launched together, in one ncclGroupStart/End. Call on the stream that produced the data.
    Returns the channels that had already failed (nothing is queued for them)."""
    return send_layer_groups([(layer, items)])


def send_layer_groups(
    groups: list[tuple[int, list[tuple[NcclSendChannel, torch.Tensor]]]],
) -> list[NcclSendChannel]:
    """send_layer_group for several layers whose data all exists by now (a handoff of KV
    already in the cache, or layers the caller produced together): one event and one queue
    operation for all of them, so the sender thread takes them in one round and sends each
    handoff's layers that lie back to back in memory as one message. Returns the channels that
    had already failed (nothing more is queued for them)."""
    failed: list[NcclSendChannel] = []
    jobs: list[tuple[int, list[tuple[NcclSendChannel, torch.Tensor]]]] = []
    for layer, items in groups:
        queued = []
        for channel, data in items:
            if channel in failed:
                continue
            try:
                channel.queue(layer)
            except HandoffError:
                failed.append(channel)
                continue
            queued.append((channel, data if data.is_contiguous() else data.contiguous()))
        if queued:
            jobs.append((layer, queued))
    if jobs:
        sender = jobs[0][1][0][0].sender
        if any(ch.sender is not sender for _, queued in jobs for ch, _ in queued):
            raise ValueError("send_layer_groups takes the channels of one sender")
        ready = Event(sender.dev.current_stream())  # after the gathers (and copies above)
        sender._submit([Job(layer, queued, ready) for layer, queued in jobs])
        if (timeline := sender.timeline) is not None:
            timeline.mark_all("queued", [(ch.key, layer) for layer, q in jobs for ch, _ in q])
    return failed
