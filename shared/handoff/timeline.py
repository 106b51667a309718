"""An optional per-layer timeline of NCCL handoffs: a diagnostic, off unless a benchmark sets a
sender's or receiver's `timeline`. Then the transport's threads mark when each layer passes
each point; `by_layer` lays them out for printing.

    prefill (NcclKVSender)            decode (NcclKVReceiver)
    queued     send_layer returned    data       its DATA frame read
    launched   its send enqueued      posted     its recv enqueued
    acked      the ACK read (-1)      enqueued   its checksum enqueued (verify thread)
                                      landed     its recv group complete
                                      summed     its checksum computed
                                      delivered  on_layer returned
                                      ack        the ACK written (-1)

Marks are time.perf_counter() seconds: CLOCK_MONOTONIC on Linux, so the marks of two processes
on one host compare. Appending to a list is atomic: any thread may mark. GPU milestones
(landed, summed) are marked by a watcher thread per point that waits for their events.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable

SENDER_POINTS = ("queued", "launched")
RECEIVER_POINTS = ("data", "posted", "enqueued", "landed", "summed", "delivered")
WHOLE = -1  # the layer of marks about a whole handoff (its ACK)


class Timeline:
    """Marks (point, handoff id bytes, layer, seconds) of handoffs, in the order made."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, bytes, int, float]] = []
        self._lock = threading.Lock()
        self._watchers: dict[tuple[str, Hashable], tuple[queue.SimpleQueue, threading.Thread]] = {}

    def mark(self, point: str, key: bytes, layer: int, at: float | None = None) -> None:
        self.marks.append((point, key, layer, time.perf_counter() if at is None else at))

    def mark_all(self, point: str, layers: list[tuple[bytes, int]]) -> None:
        """The same moment for several layers."""
        at = time.perf_counter()
        self.marks += [(point, key, layer, at) for key, layer in layers]

    def watch(
        self, point: str, lane: Hashable, wait: Callable[[], None], layers: list[tuple[bytes, int]]
    ) -> None:
        """Mark `layers` at `point` once `wait()` (e.g. an event's synchronize) returns, on the
        watcher thread of (point, lane), which waits in the order given: one lane per stream."""
        with self._lock:
            watcher = self._watchers.get((point, lane))
            if watcher is None:
                q: queue.SimpleQueue = queue.SimpleQueue()
                name = f"timeline-{point}"
                thread = threading.Thread(target=self._watch, args=(point, q), name=name)
                thread.daemon = True
                thread.start()
                watcher = self._watchers[(point, lane)] = (q, thread)
        watcher[0].put((wait, layers))

    def close(self) -> None:
        """Stop the watcher threads once they marked what they were given."""
        with self._lock:
            watchers, self._watchers = list(self._watchers.values()), {}
        for q, _ in watchers:
            q.put(None)
        for _, thread in watchers:
            thread.join(5.0)

    def _watch(self, point: str, q: queue.SimpleQueue) -> None:
        while (item := q.get()) is not None:
            wait, layers = item
            wait()
            self.mark_all(point, layers)


def by_layer(
    marks: list[tuple[str, bytes, int, float]], key: bytes
) -> dict[str, dict[int, float]]:  # fmt: skip
    """One handoff's marks: point -> layer -> seconds (the first mark, if repeated)."""
    out: dict[str, dict[int, float]] = {}
    for point, k, layer, at in marks:
        if k == key:
            out.setdefault(point, {}).setdefault(layer, at)
    return out
