"""One call per process: tracing, logging, metrics endpoint and OTLP metrics, and their stop."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kvmesh.shared.telemetry.logging import configure_logging
from kvmesh.shared.telemetry.metrics import (
    KvmeshMetrics,
    MetricsServer,
    create_metrics,
    start_metrics_server,
)
from kvmesh.shared.telemetry.otlp_metrics import OtlpMetricsPusher, start_otlp_metrics
from kvmesh.shared.telemetry.tracing import Tracing, setup_tracing


@dataclass
class ProcessTelemetry:
    tracing: Tracing
    metrics: KvmeshMetrics
    metrics_server: MetricsServer | None
    metrics_port: int  # bound port, or -1 when the endpoint is off
    pusher: OtlpMetricsPusher | None

    def stop(self) -> None:
        if self.pusher is not None:
            self.pusher.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.tracing.shutdown()


def start_process_telemetry(
    service_name: str,
    role: str,
    metrics_port: int,
    env: Mapping[str, str] = os.environ,
    log_level: str = "INFO",
) -> ProcessTelemetry:
    """metrics_port: -1 = no Prometheus endpoint, 0 = any free port."""
    configure_logging(service_name, log_level)
    tracing = setup_tracing(service_name, env)
    metrics = create_metrics(role)
    server, port = None, -1
    if metrics_port >= 0:
        server, port = start_metrics_server(metrics.registry, metrics_port)
        print(f"{role} metrics at :{port}/metrics", flush=True)
    pusher = start_otlp_metrics(metrics.registry, service_name, env)
    return ProcessTelemetry(tracing, metrics, server, port, pusher)
