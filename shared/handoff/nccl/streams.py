"""Streams, events, buffers and layer checksums of the NCCL transport's device, as no-ops (and
the torch reference of the checksum) on CPU, where the transport runs over an in-process
loopback fabric in tests."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from kvmesh.kernels.checksum import (
    PROGRAMS,
    checksum_partials,
    fold,
    layer_checksum_ref,
    layer_table,
)

_order = itertools.count()
_order_lock = threading.Lock()  # an event's place in `_order` is its place on its stream
HIGH_PRIORITY = -1  # streams of the handoff: their few small kernels go ahead of compute's
BYTES_PER_PROGRAM = 4 << 20  # a batch's checksum takes one program per this many bytes (>= 32)


class Event:
    """A CUDA event, or (on CPU) one that is always complete."""

    __slots__ = ("cuda", "stream", "order", "wall")

    def __init__(self, stream: torch.cuda.Stream | None, timing: bool = False) -> None:
        self.cuda = torch.cuda.Event(enable_timing=timing) if stream is not None else None
        self.stream = stream.cuda_stream if stream is not None else 0  # the stream's handle
        with _order_lock:
            if self.cuda is not None:
                self.cuda.record(stream)
            self.order = next(_order)
        self.wall = time.perf_counter()

    def query(self) -> bool:
        return self.cuda is None or self.cuda.query()

    def synchronize(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()

    def seconds_until(self, later: Event) -> float:
        if self.cuda is None or later.cuda is None:
            return later.wall - self.wall
        later.cuda.synchronize()
        return self.cuda.elapsed_time(later.cuda) / 1e3


def _layers(runs: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """The layers of runs (a contiguous tensor, the number of equal layers in it), one by one."""
    flat = [(x.reshape(-1).view(torch.uint8), n) for x, n in runs]
    return [raw.view(n, -1)[i] for raw, n in flat for i in range(n)]


def latest(events: Iterable[Event]) -> list[Event]:
    """The last recorded of `events` on each stream: waiting for them waits for all."""
    last: dict[int, Event] = {}
    for event in events:
        if event.cuda is not None and (
            (seen := last.get(event.stream)) is None or seen.order < event.order
        ):
            last[event.stream] = event
    return list(last.values())


class DeviceStreams:
    """Streams, events and buffers of one device; no-ops on CPU (the loopback fabric)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # "cuda": the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._max_programs = (
            2 * torch.cuda.get_device_properties(device).multi_processor_count if self.cuda else 1
        )

    def bind_thread(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    def bound(self) -> contextlib.AbstractContextManager[Any]:
        """The calling thread works on this device (for a block of work on a borrowed thread)."""
        return torch.cuda.device(self.device) if self.cuda else contextlib.nullcontext()

    def stream(self, priority: int = 0) -> torch.cuda.Stream | None:
        return torch.cuda.Stream(device=self.device, priority=priority) if self.cuda else None

    def on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def current_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def wait(self, stream: torch.cuda.Stream | None, event: Event) -> None:
        if stream is not None and event.cuda is not None:
            stream.wait_event(event.cuda)

    def wait_all(self, stream: torch.cuda.Stream | None, events: Iterable[Event]) -> None:
        """`stream` waits for every event, with one wait per stream they were recorded on."""
        if stream is not None:
            for event in latest(events):
                self.wait(stream, event)

    def keep(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """The allocator must not reuse `tensor` before `stream`'s queued work is done."""
        if stream is not None:
            tensor.record_stream(stream)

    def sum_programs(self, nbytes: int) -> int:
        """How many partial sums a layer's checksum has in a batch of `nbytes` (sender) or a
        group of recvs (receiver): more programs for a larger one, up to two per SM (its checksum
        runs beside NCCL's kernels, which use few SMs); the checksum kernel's usual few for a
        layer the prefill just wrote (beside the compute). One on CPU (the reference)."""
        if not self.cuda:
            return 1
        return max(PROGRAMS, min(self._max_programs, nbytes // BYTES_PER_PROGRAM))

    def layer_sums(self, runs: list[tuple[torch.Tensor, int]], programs: int) -> torch.Tensor:
        """Each layer's checksum (kernels/checksum) of runs (a contiguous tensor, the number of
        equal layers it holds back to back): [layers, 1] int64 on the device, enqueued on the
        current stream without a host sync: one launch of `programs` partial sums a layer
        (`sum_programs`), folded on the device (int64 sums wrap mod 2^64, as `fold`), so that
        whoever reads them folds one value a layer. On CPU the reference."""
        if not self.cuda:
            return torch.stack([layer_checksum_ref(x) for x in _layers(runs)]).reshape(-1, 1)
        partials = checksum_partials([x for x, _ in runs], programs, counts=[n for _, n in runs])
        return partials.sum(dim=1, keepdim=True)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        """int64 zeros on the device, on the current stream."""
        return torch.zeros(shape, dtype=torch.int64, device=self.device)

    def group_sums(
        self, groups: list[tuple[list[tuple[torch.Tensor, int]], Event | None, list[torch.Tensor]]]
    ) -> list[tuple[torch.Tensor | None, list[torch.Tensor], Event]]:  # fmt: skip
        """Per group (runs, after, downs), enqueued on the current stream after `after` (if
        given): the copies down of `downs`, then the checksums of the layers of `runs` (a
        contiguous tensor, the number of equal layers it holds back to back; kernels/checksum)
        as partial sums on the host (none without runs), and an event after both. Returns per
        group (partials [layers, sum_programs of its bytes] int64 on the host, downs on the
        host, event): they hold the values once the event completed (`checksums` folds them).
        On CUDA one table up for all groups (it reads only addresses, so it goes ahead of the
        events), then per group the copies down and one launch, which writes its partial sums
        straight into pinned host memory (no copy down of its own), no host sync; on CPU the
        reference."""
        stream = self.current_stream()
        if stream is None:
            done = Event(None)
            return [
                (self.layer_sums(runs, 1) if runs else None, [x.clone() for x in downs], done)
                for runs, _, downs in groups
            ]
        everything = [run for runs, _, _ in groups for run in runs]
        # per group: its layers and programs (more for a larger group: it is checksummed after
        # its last byte landed, while a smaller one is on the wire, or after the last one)
        shapes = [
            (sum(n for _, n in runs), self.sum_programs(sum(x.nbytes for x, _ in runs)))
            for runs, _, _ in groups
        ]
        table = out = None
        if everything:
            table = layer_table([x for x, _ in everything], [n for _, n in everything])
            out = torch.empty(sum(n * p for n, p in shapes), dtype=torch.int64, pin_memory=True)
        results = []
        row = at = 0
        for (runs, after, downs), (n, programs) in zip(groups, shapes, strict=True):
            if after is not None:
                self.wait(stream, after)
            hosts = [down.to("cpu", non_blocking=True) for down in downs]
            partials = None
            if runs:
                assert table is not None and out is not None
                rows = table[4 * row : 4 * (row + n)]
                tensors, counts = [x for x, _ in runs], [c for _, c in runs]
                partials = checksum_partials(
                    tensors, programs, table=rows, counts=counts,
                    out=out[at : at + n * programs].view(n, programs),
                )  # fmt: skip
                row, at = row + n, at + n * programs
            results.append((partials, hosts, Event(stream)))
        return results

    @staticmethod
    def checksums(partials: torch.Tensor) -> list[int]:
        """The checksums (uint64) of one group's layers from its `group_sums` partials, once
        their event completed."""
        return fold(partials)

    def warm_up(self) -> None:
        """Compile the checksum kernel now, not on the first handoff's thread."""
        if self.cuda:
            with self.bound():
                layer = torch.zeros(24, dtype=torch.uint8, device=self.device)
                self.group_sums([([(layer, 1)], None, [layer])])
                self.layer_sums([(layer, 1)], self.sum_programs(layer.nbytes))
                torch.cuda.synchronize(self.device)
