"""A real OTLP collector for tests: gRPC ``TraceService/Export`` and HTTP ``/v1/traces`` for
spans, gRPC ``MetricsService/Export`` for metrics.

Runs in the test process on free loopback ports (its own threads, so it serves an asyncio test
loop and separate processes alike) and keeps every span it receives, decoded::

    with OtlpCollector() as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}   # give to the processes
        ...
        spans = collector.wait_for(lambda spans: len(spans) >= 3, timeout=5)
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

Attributes = dict[str, Any]


@dataclass(frozen=True)
class CollectedSpan:
    """One received span; ids are lowercase hex ("" for no parent)."""

    trace_id: str  # 32 hex
    span_id: str  # 16 hex
    parent_span_id: str  # 16 hex, or "" for a root span
    name: str
    kind: int  # opentelemetry.proto Span.SpanKind: 2 = SERVER, 3 = CLIENT
    service_name: str  # the exporting process's resource service.name
    attributes: Attributes
    events: tuple[tuple[str, Attributes], ...]  # (name, attributes) in order
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int  # unix nanoseconds
    end_ns: int  # unix nanoseconds


@dataclass(frozen=True)
class CollectedMetric:
    """One metric of one export request (cumulative points, as received)."""

    name: str
    kind: str  # "histogram" | "sum" | "gauge" | ...
    service_name: str
    points: tuple[dict[str, Any], ...]  # {"attributes", "value"} or histogram fields


def decode_value(value: AnyValue) -> Any:
    """An OTLP attribute value as a plain Python value (arrays become tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(decode_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def decode_attributes(pairs: Any) -> Attributes:
    """Repeated ``KeyValue`` -> dict."""
    return {kv.key: decode_value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[CollectedSpan]:
    """All spans of one export request."""
    spans: list[CollectedSpan] = []
    for resource_spans in request.resource_spans:
        service = str(decode_attributes(resource_spans.resource.attributes).get("service.name"))
        for scope_spans in resource_spans.scope_spans:
            spans.extend(_decode_span(span, service) for span in scope_spans.spans)
    return spans


def decode_metrics_request(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> list[CollectedMetric]:
    """All metrics of one export request."""
    metrics: list[CollectedMetric] = []
    for resource_metrics in request.resource_metrics:
        resource = decode_attributes(resource_metrics.resource.attributes)
        service = str(resource.get("service.name"))
        for scope_metrics in resource_metrics.scope_metrics:
            metrics.extend(_decode_metric(m, service) for m in scope_metrics.metrics)
    return metrics


def _decode_metric(metric: Any, service: str) -> CollectedMetric:
    kind = metric.WhichOneof("data")
    points = tuple(_decode_point(p, kind) for p in getattr(metric, kind).data_points)
    return CollectedMetric(name=metric.name, kind=kind, service_name=service, points=points)


def _decode_point(point: Any, kind: str) -> dict[str, Any]:
    decoded: dict[str, Any] = {"attributes": decode_attributes(point.attributes)}
    if kind == "histogram":
        decoded.update(
            count=point.count,
            sum=point.sum,
            bucket_counts=list(point.bucket_counts),
            explicit_bounds=list(point.explicit_bounds),
        )
    else:
        decoded["value"] = getattr(point, point.WhichOneof("value"))
    return decoded


def _decode_span(span: Any, service: str) -> CollectedSpan:
    return CollectedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=span.kind,
        service_name=service,
        attributes=decode_attributes(span.attributes),
        events=tuple((e.name, decode_attributes(e.attributes)) for e in span.events),
        status_code=span.status.code,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
    )


class _SpanStore:
    """Thread-safe list of spans with a condition to wait on."""

    def __init__(self) -> None:
        self._spans: list[CollectedSpan] = []
        self._changed = threading.Condition()
        self.requests = 0  # export requests received

    def add(self, spans: list[CollectedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.requests += 1
            self._changed.notify_all()

    def snapshot(self) -> list[CollectedSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(
        self, predicate: Callable[[list[CollectedSpan]], bool], timeout: float
    ) -> list[CollectedSpan]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.service_name, s.name) for s in self._spans]
                    raise TimeoutError(f"spans never matched in {timeout} s; have {names}")
                self._changed.wait(left)
            return list(self._spans)


class _MetricStore:
    """Thread-safe list of received metrics."""

    def __init__(self) -> None:
        self._metrics: list[CollectedMetric] = []
        self._lock = threading.Lock()

    def add(self, metrics: list[CollectedMetric]) -> None:
        with self._lock:
            self._metrics.extend(metrics)

    def snapshot(self) -> list[CollectedMetric]:
        with self._lock:
            return list(self._metrics)


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _MetricStore) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        self._store.add(decode_metrics_request(request))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _SpanStore) -> None:
        self._store = store

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
        self._store.add(decode_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(store: _SpanStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            store.add(decode_request(request))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
            pass

    return Handler


class OtlpCollector:
    """Context manager running both receivers; ``endpoint`` is the gRPC one (http://host:port)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._store = _SpanStore()
        self._metric_store = _MetricStore()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _TraceService(self._store), self._grpc
        )
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self._metric_store), self._grpc
        )
        self.grpc_port = self._grpc.add_insecure_port(f"{host}:0")
        self._http = ThreadingHTTPServer((host, 0), _http_handler(self._store))
        self._http_thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """OTLP/gRPC endpoint for OTEL_EXPORTER_OTLP_ENDPOINT."""
        return f"http://{self._host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """OTLP/HTTP base endpoint (exporters append /v1/traces)."""
        return f"http://{self._host}:{self._http.server_address[1]}"

    @property
    def export_requests(self) -> int:
        """Export requests received so far (both receivers)."""
        return self._store.requests

    def spans(self) -> list[CollectedSpan]:
        """Every span received so far, in arrival order."""
        return self._store.snapshot()

    def metrics(self) -> list[CollectedMetric]:
        """Every metric received so far (each export repeats cumulative values)."""
        return self._metric_store.snapshot()

    def traces(self) -> dict[str, list[CollectedSpan]]:
        """Spans received so far grouped by trace id."""
        grouped: dict[str, list[CollectedSpan]] = {}
        for span in self.spans():
            grouped.setdefault(span.trace_id, []).append(span)
        return grouped

    def clear(self) -> None:
        """Forget the spans received so far."""
        self._store.clear()

    def wait_for(
        self, predicate: Callable[[list[CollectedSpan]], bool], timeout: float = 5.0
    ) -> list[CollectedSpan]:
        """Block until ``predicate(spans)`` holds (TimeoutError after ``timeout`` seconds)."""
        return self._store.wait_for(predicate, timeout)

    def start(self) -> OtlpCollector:
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
