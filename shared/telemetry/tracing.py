"""Tracer provider setup from OTEL_* settings, with fast and bounded shutdown.

Each :class:`Tracing` owns an explicit ``TracerProvider``: several coexist in one process (tests
run a whole mesh in one interpreter), and none is installed globally unless asked
(:meth:`Tracing.make_global`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from kvmesh.shared.telemetry.otel_env import TracingConfig, tracing_config_from_env

TRACER_NAME = "kvmesh"
SHUTDOWN_TIMEOUT_S = 1.0  # a flush at shutdown gets this long, then is abandoned, seconds
SHUTDOWN_SLACK_S = 0.5  # shutdown waits at most the flush timeout + this, seconds


@dataclass
class Tracing:
    """A process's tracing: its provider, config, and the tracer its code uses."""

    config: TracingConfig
    provider: TracerProvider

    @cached_property
    def tracer(self) -> trace.Tracer:
        """The kvmesh tracer of this provider (one per Tracing, reused)."""
        return self.provider.get_tracer(TRACER_NAME)

    def make_global(self) -> None:
        """Install this provider as the process-wide one (once per process, in ``main``)."""
        trace.set_tracer_provider(self.provider)

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Export all finished spans now; True on success. Timeout in seconds."""
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush pending spans and stop; never blocks longer than ``timeout_s`` seconds.

        Returns False when the flush did not finish in time (its thread is a daemon and
        is abandoned: the spans it held are lost, the process is not held up).
        """
        budget = min(self.config.timeout_s, SHUTDOWN_TIMEOUT_S)
        timeout = budget + SHUTDOWN_SLACK_S if timeout_s is None else timeout_s
        flusher = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        flusher.start()
        flusher.join(timeout)
        return not flusher.is_alive()


def setup_tracing(service_name: str, env: Mapping[str, str] = os.environ) -> Tracing:
    """Build tracing for ``service_name`` from the OTEL_* variables of ``env``."""
    return tracing_from_config(tracing_config_from_env(service_name, env))


def tracing_from_config(config: TracingConfig) -> Tracing:
    """Build a provider with one BatchSpanProcessor per configured exporter."""
    resource = make_resource(config.service_name, config.resource_attributes)
    provider = TracerProvider(sampler=config.sampler, resource=resource, shutdown_on_exit=False)
    for name in config.exporters:
        exporter = make_exporter(name, config)
        schedule_ms = config.schedule_delay_s * 1000
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=2048,
                schedule_delay_millis=schedule_ms,
                max_export_batch_size=512,
                export_timeout_millis=config.timeout_s * 1000,
            )
        )
    return Tracing(config=config, provider=provider)


def make_resource(service_name: str, attributes: Iterable[tuple[str, str]] = ()) -> Resource:
    """The process resource: OTEL_RESOURCE_ATTRIBUTES plus service.name (no env lookups)."""
    return Resource(
        {
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            **dict(attributes),
            "service.name": service_name,
        }
    )


def make_exporter(name: str, config: TracingConfig) -> SpanExporter:
    """The span exporter called ``name`` ("otlp" or "console")."""
    if name == "console":
        return ConsoleSpanExporter(service_name=config.service_name)
    if config.protocol == "http/protobuf":
        return _http_exporter(config)
    return _grpc_exporter(config)


def _grpc_exporter(config: TracingConfig) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=config.endpoint,
        insecure=config.insecure,
        headers=config.headers,
        timeout=config.timeout_s,
    )


def _http_exporter(config: TracingConfig) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(
        endpoint=config.endpoint, headers=dict(config.headers), timeout=config.timeout_s
    )
