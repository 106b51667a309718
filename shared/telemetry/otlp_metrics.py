"""Push the Prometheus registry over OTLP, for deployments that collect metrics by push.

The registry stays the single source of truth: every ``interval_s`` a daemon thread converts a
``registry.collect()`` snapshot into OTLP (cumulative temporality, as Prometheus counts) and
exports it. Each export is bounded by the config's timeout, and :meth:`OtlpMetricsPusher.stop`
pushes once more and returns within about two timeouts, collector up or down.

    prometheus family     ->  OTLP metric
    counter (_total)      ->  Sum, monotonic
    gauge                 ->  Gauge
    histogram (_bucket)   ->  Histogram (per-bucket counts from cumulative ones; no min/max)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry

from kvmesh.shared.telemetry.otel_env import MetricsExportConfig, metrics_export_config_from_env
from kvmesh.shared.telemetry.tracing import SHUTDOWN_SLACK_S, SHUTDOWN_TIMEOUT_S, make_resource

SCOPE = InstrumentationScope("kvmesh")
CUMULATIVE = AggregationTemporality.CUMULATIVE


@dataclass
class _HistogramSeries:
    """One label set of a Prometheus histogram, being assembled from its samples."""

    bounds: list[float] = field(default_factory=list)  # "le" edges, ascending, +Inf last
    cumulative: list[float] = field(default_factory=list)  # count <= each edge
    count: float = 0.0
    total: float = 0.0  # sum of observations
    created_s: float | None = None  # unix seconds the series started

    def point(self, attributes: dict[str, str], start_ns: int, now_ns: int) -> HistogramDataPoint:
        previous = [0.0, *self.cumulative[:-1]]
        per_bucket = [int(c - p) for c, p in zip(self.cumulative, previous, strict=True)]
        return HistogramDataPoint(
            attributes=attributes,
            start_time_unix_nano=_start_ns(self.created_s, start_ns),
            time_unix_nano=now_ns,
            count=int(self.count),
            sum=self.total,
            bucket_counts=per_bucket,
            explicit_bounds=[b for b in self.bounds if b != float("inf")],
            min=None,  # type: ignore[arg-type]
            max=None,  # type: ignore[arg-type]  # unknown to Prometheus: left unset
        )


def _start_ns(created_s: float | None, default_ns: int) -> int:
    return int(created_s * 1e9) if created_s is not None else default_ns


def _label_key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def _histogram(family: Any, start_ns: int, now_ns: int) -> Histogram:
    series: dict[tuple[tuple[str, str], ...], _HistogramSeries] = {}
    for sample in family.samples:
        entry = series.setdefault(_label_key(sample.labels), _HistogramSeries())
        suffix = sample.name[len(family.name) :]
        if suffix == "_bucket":
            entry.bounds.append(float(sample.labels["le"]))
            entry.cumulative.append(sample.value)
        elif suffix == "_count":
            entry.count = sample.value
        elif suffix == "_sum":
            entry.total = sample.value
        elif suffix == "_created":
            entry.created_s = sample.value
    points = [s.point(dict(key), start_ns, now_ns) for key, s in series.items()]
    return Histogram(data_points=points, aggregation_temporality=CUMULATIVE)


def _number_points(family: Any, value_suffix: str, start_ns: int, now_ns: int) -> list[Any]:
    created = {
        _label_key(s.labels): s.value for s in family.samples if s.name == family.name + "_created"
    }
    return [
        NumberDataPoint(
            attributes=dict(s.labels),
            value=s.value,
            time_unix_nano=now_ns,
            start_time_unix_nano=_start_ns(created.get(_label_key(s.labels)), start_ns),
        )
        for s in family.samples
        if s.name == family.name + value_suffix
    ]


def _convert(family: Any, start_ns: int, now_ns: int) -> Metric | None:
    if not family.samples:  # labelled, and no label set used yet: a metric without points
        return None  # has no data field on the wire, which receivers reject
    if family.type == "histogram":
        data: Any = _histogram(family, start_ns, now_ns)
    elif family.type == "counter":
        points = _number_points(family, "_total", start_ns, now_ns)
        data = Sum(data_points=points, aggregation_temporality=CUMULATIVE, is_monotonic=True)
    elif family.type == "gauge":
        data = Gauge(data_points=_number_points(family, "", start_ns, now_ns))
    else:
        return None  # summaries, info, enums: kvmesh defines none
    return Metric(name=family.name, description=family.documentation, unit=family.unit, data=data)


def registry_to_metrics_data(
    registry: CollectorRegistry, resource: Resource, start_ns: int
) -> MetricsData:
    """A snapshot of ``registry`` as OTLP metrics; ``start_ns`` (unix ns) when ``_created`` is
    not exposed."""
    now_ns = time.time_ns()
    metrics = [m for f in registry.collect() if (m := _convert(f, start_ns, now_ns)) is not None]
    scope_metrics = ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")
    return MetricsData(
        resource_metrics=[
            ResourceMetrics(resource=resource, scope_metrics=[scope_metrics], schema_url="")
        ]
    )


def make_metric_exporter(config: MetricsExportConfig) -> MetricExporter:
    """The OTLP metric exporter of ``config.protocol``."""
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpExporter,
        )

        return HttpExporter(
            endpoint=config.endpoint, headers=dict(config.headers), timeout=config.timeout_s
        )
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter(
        endpoint=config.endpoint,
        insecure=config.insecure,
        headers=config.headers,
        timeout=config.timeout_s,
    )


class OtlpMetricsPusher:
    """Exports a registry every ``config.interval_s`` seconds from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, config: MetricsExportConfig) -> None:
        self._registry = registry
        self._config = config
        self._resource = make_resource(config.service_name, config.resource_attributes)
        self._exporter = make_metric_exporter(config)
        self._start_ns = time.time_ns()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    def start(self) -> OtlpMetricsPusher:
        self._thread.start()
        return self

    def push(self) -> bool:
        """Export one snapshot now; True on success."""
        data = registry_to_metrics_data(self._registry, self._resource, self._start_ns)
        timeout_ms = self._config.timeout_s * 1000
        return self._exporter.export(data, timeout_millis=timeout_ms).name == "SUCCESS"

    def stop(self) -> None:
        """Push a last snapshot and stop; bounded by the shutdown budget (a push still stuck on
        a dead collector then is abandoned on its daemon thread)."""
        budget = min(self._config.timeout_s, SHUTDOWN_TIMEOUT_S)
        self._stopping.set()
        self._thread.join(budget + SHUTDOWN_SLACK_S)
        if not self._thread.is_alive():
            self._exporter.shutdown(timeout_millis=budget * 1000)

    def _run(self) -> None:
        while not self._stopping.wait(self._config.interval_s):
            self.push()
        self.push()


def start_otlp_metrics(
    registry: CollectorRegistry, service_name: str, env: Mapping[str, str] = os.environ
) -> OtlpMetricsPusher | None:
    """Start pushing ``registry`` when ``env`` has OTEL_METRICS_EXPORTER=otlp, else None."""
    config = metrics_export_config_from_env(service_name, env)
    return OtlpMetricsPusher(registry, config).start() if config is not None else None
