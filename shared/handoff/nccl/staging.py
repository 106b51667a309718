"""The receiver's staging buffers, reused from message to message without a host sync.

A message (one or more layers) is received into a staging buffer ([nbytes] uint8 on the device)
on a link's recv stream, read by its checksums (check stream) and its scatters (scatter stream),
then given back with the events recorded after its last readers. The next recv that takes it
makes the recv stream wait for those events on the GPU:

    recv stream:    recv A -> ... -> [wait A.released] recv A' -> ...
    check stream:        checksum A
    scatter stream:                scatter A -> A.released

so in steady state no layer allocates, and nothing waits on the host.
"""

from __future__ import annotations

import collections
import threading

import torch

from kvmesh.shared.handoff.nccl.streams import DeviceStreams, Event


def size_class(nbytes: int) -> int:
    """The bytes of the buffer that stages `nbytes`: rounded up to a multiple of an eighth of its
    power of two (less than 1/8 wasted) and of 4 KiB, so that layers of similar sizes (prompts
    of similar lengths) share buffers."""
    step = max(1 << max(nbytes.bit_length() - 4, 0), 4096)
    return -(-max(nbytes, 1) // step) * step


class StagingPool:
    """Staging buffers of one link, by size class. `take` on the thread that posts the recvs;
    `give` from any thread. Keeps at most `max_free_bytes` of free buffers; beyond that a
    returned buffer goes back to torch's allocator, which knows the streams that read it."""

    def __init__(
        self, dev: DeviceStreams, recv_stream: torch.cuda.Stream | None,
        readers: list[torch.cuda.Stream | None], max_free_bytes: int,
    ) -> None:  # fmt: skip
        self.dev, self.recv_stream = dev, recv_stream
        self.readers = readers
        self.max_free_bytes = max_free_bytes
        self.allocated = 0  # buffers made so far (a test's measure of reuse)
        self._lock = threading.Lock()  # guards the three below
        # by size class: free buffers and the events after their last readers
        self._free: dict[int, collections.deque[tuple[torch.Tensor, list[Event]]]] = {}
        self._free_bytes = 0
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the buffer a taken view is of

    @property
    def lent(self) -> int:
        """Buffers taken and not given back yet."""
        with self._lock:
            return len(self._lent)

    def take(self, nbytes: int) -> torch.Tensor:
        """A [nbytes] uint8 buffer that work enqueued next on the recv stream may overwrite."""
        return self.take_all([nbytes])[0]

    def take_all(self, sizes: list[int]) -> list[torch.Tensor]:
        """`take` for each size, with one wait of the recv stream per stream that released the
        reused buffers."""
        classes = [size_class(n) for n in sizes]
        with self._lock:
            reused: list[tuple[torch.Tensor, list[Event]] | None] = []
            for size in classes:
                free = self._free.get(size)
                item = free.popleft() if free else None  # the oldest: its readers likely done
                if item is not None:
                    self._free_bytes -= size
                reused.append(item)
        events = [event for item in reused if item is not None for event in item[1]]
        self.dev.wait_all(self.recv_stream, events)
        bufs = [
            item[0] if item is not None else self._allocate(size)
            for item, size in zip(reused, classes, strict=True)
        ]
        with self._lock:
            for buf in bufs:
                self._lent[buf.data_ptr()] = buf
        return [buf if buf.numel() == n else buf[:n] for buf, n in zip(bufs, sizes, strict=True)]

    def give(self, view: torch.Tensor, released: Event | list[Event]) -> None:
        """Return a buffer `take` gave; `released` completes (all complete) after its last
        reader(s)."""
        self.give_all([view], released)

    def give_all(self, views: list[torch.Tensor], released: Event | list[Event]) -> None:
        events = released if isinstance(released, list) else [released]
        with self._lock:
            for view in views:
                buf = self._lent.pop(view.data_ptr())
                if self._free_bytes + buf.numel() <= self.max_free_bytes:
                    free = self._free.setdefault(buf.numel(), collections.deque())
                    free.append((buf, events))
                    self._free_bytes += buf.numel()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    def _allocate(self, size: int) -> torch.Tensor:
        with self.dev.on(self.recv_stream):
            buf = torch.empty(size, dtype=torch.uint8, device=self.dev.device)
        for stream in self.readers:  # if it is ever freed, not reused before they are done
            self.dev.keep(buf, stream)
        self.allocated += 1
        return buf
