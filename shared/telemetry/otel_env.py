"""Parse the standard ``OTEL_*`` environment variables into a frozen tracing config.

This is the only module that reads OTEL_* settings, and it reads them from a mapping it is given
(the process environment at the edge, a plain dict in tests). Everything else takes the
resulting :class:`TracingConfig`.

Deviations from the SDK defaults, on purpose:
- With neither ``OTEL_TRACES_EXPORTER`` nor an OTLP endpoint set, nothing is exported (the SDK
  would try ``localhost:4317`` and stall shutdown for seconds when no collector listens).
- The export timeout keeps the SDK's 10 s default (a busy process may need it); shutdown is
  bounded separately (tracing.SHUTDOWN_TIMEOUT_S), so a dead collector cannot stall it.
- ``OTEL_EXPORTER_OTLP_*TIMEOUT`` is read in milliseconds, as the specification says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from opentelemetry.sdk.trace import sampling

EXPORTERS = frozenset({"otlp", "console", "none"})
PROTOCOLS = frozenset({"grpc", "http/protobuf"})
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_TIMEOUT_S = 10.0  # per export request, seconds (the SDK's default)
DEFAULT_SCHEDULE_DELAY_S = 1.0
DEFAULT_METRIC_INTERVAL_S = 15.0


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings of one process, already validated."""

    service_name: str
    exporters: tuple[str, ...]  # subset of {"otlp", "console"}; empty = export nothing
    protocol: str = "grpc"  # "grpc" | "http/protobuf"
    endpoint: str = DEFAULT_GRPC_ENDPOINT  # grpc: scheme://host:port; http: full /v1/traces URL
    insecure: bool = True  # grpc only: plaintext channel
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S  # per export request, seconds
    schedule_delay_s: float = DEFAULT_SCHEDULE_DELAY_S  # batch processor flush period, seconds
    sampler: sampling.Sampler = field(default=sampling.ParentBased(sampling.ALWAYS_ON))
    resource_attributes: tuple[tuple[str, str], ...] = ()  # service.name not included

    def __post_init__(self) -> None:
        unknown = set(self.exporters) - (EXPORTERS - {"none"})
        if unknown:
            raise ValueError(f"unknown OTEL_TRACES_EXPORTER value(s): {sorted(unknown)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unsupported OTLP protocol {self.protocol!r}; use one of {PROTOCOLS}")
        if self.timeout_s <= 0:
            raise ValueError(f"export timeout must be > 0 s, got {self.timeout_s}")

    @property
    def enabled(self) -> bool:
        """True when at least one exporter is configured."""
        return bool(self.exporters)


def tracing_config_from_env(service_name: str, env: Mapping[str, str]) -> TracingConfig:
    """Build the config of ``service_name`` from OTEL_* variables in ``env``."""
    protocol = _signal_var(env, "PROTOCOL") or "grpc"
    return TracingConfig(
        service_name=_service_name(service_name, env),
        exporters=_exporters(env),
        protocol=protocol,
        endpoint=_endpoint(env, protocol),
        insecure=_insecure(env),
        headers=tuple(_parse_pairs(_signal_var(env, "HEADERS")).items()),
        timeout_s=_millis(_signal_var(env, "TIMEOUT"), DEFAULT_TIMEOUT_S),
        schedule_delay_s=_millis(env.get("OTEL_BSP_SCHEDULE_DELAY"), DEFAULT_SCHEDULE_DELAY_S),
        sampler=parse_sampler(env.get("OTEL_TRACES_SAMPLER"), env.get("OTEL_TRACES_SAMPLER_ARG")),
        resource_attributes=_resource_attributes(env),
    )


def _signal_var(env: Mapping[str, str], suffix: str, signal: str = "TRACES") -> str | None:
    """``OTEL_EXPORTER_OTLP_<signal>_<suffix>``, else ``OTEL_EXPORTER_OTLP_<suffix>``."""
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal}_{suffix}")
    return specific or env.get(f"OTEL_EXPORTER_OTLP_{suffix}")


def _service_name(default: str, env: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME > service.name in OTEL_RESOURCE_ATTRIBUTES > the caller's default."""
    from_resource = _parse_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES")).get("service.name")
    return env.get("OTEL_SERVICE_NAME") or from_resource or default


def _exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    """Configured exporters; unset means otlp only if an OTLP endpoint is configured."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        return ("otlp",) if _signal_var(env, "ENDPOINT") else ()
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def _endpoint(env: Mapping[str, str], protocol: str, signal: str = "TRACES") -> str:
    """The exporter endpoint; for http/protobuf a base endpoint gets the /v1/<signal> path."""
    per_signal = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if protocol == "grpc":
        return per_signal or base or DEFAULT_GRPC_ENDPOINT
    if per_signal:
        return per_signal
    return (base or DEFAULT_HTTP_ENDPOINT).rstrip("/") + f"/v1/{signal.lower()}"


def _insecure(env: Mapping[str, str], signal: str = "TRACES") -> bool:
    """Plaintext gRPC unless the endpoint is https or *_INSECURE=false."""
    endpoint = _signal_var(env, "ENDPOINT", signal) or ""
    if endpoint.startswith("https://"):
        return False
    flag = _signal_var(env, "INSECURE", signal)
    return flag is None or flag.strip().lower() != "false"


@dataclass(frozen=True)
class MetricsExportConfig:
    """OTLP push of the Prometheus registry (only when OTEL_METRICS_EXPORTER=otlp)."""

    service_name: str
    protocol: str  # "grpc" | "http/protobuf"
    endpoint: str
    insecure: bool
    headers: tuple[tuple[str, str], ...]
    timeout_s: float  # per export request, seconds
    interval_s: float  # between pushes, seconds
    resource_attributes: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unsupported OTLP protocol {self.protocol!r}; use one of {PROTOCOLS}")
        if self.interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("metric export interval and timeout must be > 0 s")


def metrics_export_config_from_env(
    service_name: str, env: Mapping[str, str]
) -> MetricsExportConfig | None:
    """The OTLP metrics config, or None unless OTEL_METRICS_EXPORTER names ``otlp``."""
    names = {n.strip().lower() for n in env.get("OTEL_METRICS_EXPORTER", "").split(",")}
    if "otlp" not in names or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    protocol = _signal_var(env, "PROTOCOL", "METRICS") or "grpc"
    return MetricsExportConfig(
        service_name=_service_name(service_name, env),
        protocol=protocol,
        endpoint=_endpoint(env, protocol, "METRICS"),
        insecure=_insecure(env, "METRICS"),
        headers=tuple(_parse_pairs(_signal_var(env, "HEADERS", "METRICS")).items()),
        timeout_s=_millis(_signal_var(env, "TIMEOUT", "METRICS"), DEFAULT_TIMEOUT_S),
        interval_s=_millis(env.get("OTEL_METRIC_EXPORT_INTERVAL"), DEFAULT_METRIC_INTERVAL_S),
        resource_attributes=_resource_attributes(env),
    )


def _millis(raw: str | None, default_s: float) -> float:
    """A millisecond env value converted to seconds, or ``default_s`` when unset."""
    if raw is None or not raw.strip():
        return default_s
    return float(raw) / 1000.0


def _resource_attributes(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    attrs = _parse_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES"))
    attrs.pop("service.name", None)
    return tuple(attrs.items())


def _parse_pairs(raw: str | None) -> dict[str, str]:
    """Parse ``k1=v1,k2=v2`` (values percent-encoded, as W3C baggage) into a dict."""
    pairs: dict[str, str] = {}
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def parse_sampler(name: str | None, arg: str | None) -> sampling.Sampler:
    """The sampler named by OTEL_TRACES_SAMPLER; default ``parentbased_always_on``."""
    ratio = float(arg) if arg else 1.0
    samplers: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    key = (name or "parentbased_always_on").strip().lower()
    if key not in samplers:
        raise ValueError(f"unsupported OTEL_TRACES_SAMPLER {name!r}; use one of {sorted(samplers)}")
    return samplers[key]
