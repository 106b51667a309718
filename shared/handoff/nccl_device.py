"""Streams, events, buffers and layer checksums of the NCCL transport's device, as no-ops (and
the torch reference of the checksum) on CPU, where the transport runs over an in-process
loopback fabric in tests."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from kernels.checksum import layer_checksum, layer_checksum_ref


class Event:
    """A CUDA event, or (on CPU) one that is always complete."""

    def __init__(self, stream: torch.cuda.Stream | None, timing: bool = False) -> None:
        self.cuda = torch.cuda.Event(enable_timing=timing) if stream is not None else None
        if self.cuda is not None:
            self.cuda.record(stream)
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


class Device:
    """Streams, events and buffers of one device; no-ops on CPU (the loopback fabric)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # "cuda": the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device

    def bind_thread(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    def stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.Stream(device=self.device) if self.cuda else None

    def on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def current_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def wait(self, stream: torch.cuda.Stream | None, event: Event) -> None:
        if stream is not None and event.cuda is not None:
            stream.wait_event(event.cuda)

    def keep(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """The allocator must not reuse `tensor` before `stream`'s queued work is done."""
        if stream is not None:
            tensor.record_stream(stream)

    def host_int64(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, pin_memory=self.cuda)

    def checksums(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """The layer checksum (kernels/checksum) of each tensor, as [len(layers)] int64 on the
        host (pinned): enqueued on the current stream, valid once an event recorded after this
        call completes. On CUDA, one small-grid Triton pass per layer, no host sync."""
        checksum = layer_checksum if self.cuda else layer_checksum_ref
        sums = torch.empty(len(layers), dtype=torch.int64, device=self.device)  # [k]
        for i, data in enumerate(layers):
            checksum(data, sums[i])
        if not self.cuda:
            return sums
        host = self.host_int64(len(layers))
        host.copy_(sums, non_blocking=True)
        return host
