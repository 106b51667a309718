"""kvmesh telemetry: OpenTelemetry tracing, Prometheus metrics, trace-aware logs.

Modules, one concept each:
- ``otel_env``: the OTEL_* environment, parsed once into a frozen ``TracingConfig``.
- ``tracing``: a process's ``TracerProvider`` (explicit, not global) with bounded shutdown.
- ``rpc_tracing``: W3C trace context over grpc.aio metadata (server/client interceptors).
- ``handoff``: the KV-handoff span (per-layer events, bytes, GB/s).
- ``metrics``: Prometheus series on a per-process registry and its scrape endpoint.
- ``otlp_metrics``: optional push of that registry over OTLP (OTEL_METRICS_EXPORTER=otlp).
- ``logging``: log records with trace_id/span_id.
"""

from kvmesh.shared.telemetry.handoff import HandoffRecorder, HandoffSummary, handoff_span
from kvmesh.shared.telemetry.logging import TraceContextFilter, configure_logging
from kvmesh.shared.telemetry.metrics import (
    KvmeshMetrics,
    MetricsServer,
    create_metrics,
    start_metrics_server,
)
from kvmesh.shared.telemetry.otel_env import (
    MetricsExportConfig,
    TracingConfig,
    metrics_export_config_from_env,
    tracing_config_from_env,
)
from kvmesh.shared.telemetry.otlp_metrics import OtlpMetricsPusher, start_otlp_metrics
from kvmesh.shared.telemetry.rpc_tracing import (
    TracingServerInterceptor,
    client_interceptors,
    extract_context,
    inject_metadata,
)
from kvmesh.shared.telemetry.tracing import Tracing, setup_tracing, tracing_from_config

__all__ = [
    "HandoffRecorder",
    "HandoffSummary",
    "KvmeshMetrics",
    "MetricsExportConfig",
    "MetricsServer",
    "OtlpMetricsPusher",
    "TraceContextFilter",
    "Tracing",
    "TracingConfig",
    "TracingServerInterceptor",
    "client_interceptors",
    "configure_logging",
    "create_metrics",
    "extract_context",
    "handoff_span",
    "inject_metadata",
    "metrics_export_config_from_env",
    "setup_tracing",
    "start_metrics_server",
    "start_otlp_metrics",
    "tracing_config_from_env",
    "tracing_from_config",
]
