"""The KV-handoff span: per-layer timings as events, totals and GB/s as attributes.

Aggregate histograms cannot say why one request's handoff was slow; this span can. Usage on the
sending side (one event per layer as its send completes)::

    with handoff_span(tracer, transport="nccl", request_id=rid) as handoff:
        for layer in range(num_layers):
            t0 = time.perf_counter()
            send_layer(layer)
            handoff.layer_done(layer, nbytes=layer_bytes, seconds=time.perf_counter() - t0)
    metrics.observe_handoff(handoff.summary.nbytes, handoff.summary.seconds)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import trace

SPAN_NAME = "kv_handoff"
PREFIX = "kvmesh.handoff."


@dataclass(frozen=True)
class HandoffSummary:
    """Totals of one handoff."""

    transport: str  # "nccl" | "tcp" | ...
    nbytes: int  # bytes of KV sent, all layers
    layers: int  # layers sent
    seconds: float  # wall time from span start to end

    @property
    def gb_per_s(self) -> float:
        """Throughput in GB/s (1e9 bytes per second); 0 for an empty or instant handoff."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class HandoffRecorder:
    """Collects per-layer sends of one handoff into its span."""

    span: trace.Span
    transport: str
    started: float = field(default_factory=time.perf_counter)  # perf_counter seconds
    nbytes: int = 0
    layer_seconds: list[float] = field(default_factory=list)  # per layer, in send order
    _summary: HandoffSummary | None = None  # set when the span ends

    def layer_done(self, layer: int, nbytes: int, seconds: float) -> None:
        """Layer ``layer`` (index) sent ``nbytes`` bytes in ``seconds``."""
        self.nbytes += nbytes
        self.layer_seconds.append(seconds)
        self.span.add_event(
            "kv_layer",
            {
                "kvmesh.layer": layer,
                "kvmesh.layer.bytes": nbytes,
                "kvmesh.layer.seconds": seconds,
            },
        )

    def finish(self) -> HandoffSummary:
        """Compute the totals and write them onto the span as attributes."""
        summary = HandoffSummary(
            transport=self.transport,
            nbytes=self.nbytes,
            layers=len(self.layer_seconds),
            seconds=time.perf_counter() - self.started,
        )
        self.span.set_attributes(
            {
                PREFIX + "transport": summary.transport,
                PREFIX + "bytes": summary.nbytes,
                PREFIX + "layers": summary.layers,
                PREFIX + "seconds": summary.seconds,
                PREFIX + "gb_per_s": summary.gb_per_s,
                PREFIX + "layer_seconds": self.layer_seconds,
                PREFIX + "max_layer_seconds": max(self.layer_seconds, default=0.0),
            }
        )
        self._summary = summary
        return summary

    def end(self, error: BaseException | None = None) -> HandoffSummary:
        """Write the totals, mark a failure if any, and end the span."""
        summary = self.finish()
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        self.span.end()
        return summary

    @property
    def summary(self) -> HandoffSummary:
        """The totals; available once the ``handoff_span`` block has exited."""
        if self._summary is None:
            raise RuntimeError("handoff still in progress: summary exists after the span ends")
        return self._summary


def start_handoff_span(
    tracer: trace.Tracer, transport: str, *, request_id: str = "", peer: str = ""
) -> HandoffRecorder:
    """A ``kv_handoff`` span, child of the current span but not made current: a handoff may
    outlive the RPC that started it. End it with ``recorder.end()``."""
    attributes = {PREFIX + "transport": transport}
    if request_id:
        attributes["kvmesh.request_id"] = request_id
    if peer:
        attributes[PREFIX + "peer"] = peer
    span = tracer.start_span(SPAN_NAME, attributes=attributes)
    return HandoffRecorder(span=span, transport=transport)


@contextmanager
def handoff_span(
    tracer: trace.Tracer, transport: str, *, request_id: str = "", peer: str = ""
) -> Iterator[HandoffRecorder]:
    """A current ``kv_handoff`` span whose attributes are filled in when the block exits."""
    recorder = start_handoff_span(tracer, transport, request_id=request_id, peer=peer)
    with trace.use_span(recorder.span, end_on_exit=False):
        try:
            yield recorder
        finally:
            recorder.end()
