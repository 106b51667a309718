"""Prometheus metrics of one kvmesh process, on its own registry.

Each process builds one :class:`KvmeshMetrics` (``create_metrics(role)``) on a private
``CollectorRegistry`` (never the global one: tests run several processes' worth in one
interpreter) and serves it with :func:`start_metrics_server`. Every series carries a ``role``
label ("gateway", "prefill", "decode", "aggregated").

Bucket edges are in seconds and follow the latencies this system has (benchmarks/RESULTS.md):
TPOT of 5-100 ms, TTFT from tens of ms to seconds under load, KV handoffs of 0.2 ms (64 MiB over
NVLink) to seconds (TCP).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

TTFT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
)
TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
)
E2E_BUCKETS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    180.0,
    300.0,
    600.0,
)
QUEUE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
HANDOFF_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True)
class KvmeshMetrics:
    """Handles on one process's series; all seconds, bytes and block counts."""

    role: str
    registry: CollectorRegistry
    ttft: Histogram  # seconds from request arrival to first token
    tpot: Histogram  # seconds per output token after the first
    e2e_latency: Histogram  # seconds from request arrival to last token
    queue_time: Histogram  # seconds waiting before being scheduled
    handoff: Histogram  # seconds of one KV handoff (reserve .. commit)
    handoff_bytes: Counter  # bytes of KV handed off
    requests: Counter  # finished requests, labelled by finish_reason
    kv_blocks_used: Gauge  # KV blocks
    kv_blocks_free: Gauge  # KV blocks
    requests_in_flight: Gauge  # requests
    queue_depth: Gauge  # requests waiting
    client_requests: Counter  # requests admitted past authentication, by API key id
    client_tokens: Counter  # tokens served, by API key id and kind (prompt, completion)

    def observe_handoff(self, nbytes: int, seconds: float) -> None:
        """One KV handoff of ``nbytes`` bytes that took ``seconds``."""
        self.handoff.observe(seconds)
        self.handoff_bytes.inc(nbytes)

    def finish_request(self, finish_reason: str) -> None:
        """Count a finished request ("stop", "length", "abort", ...)."""
        self.requests.labels(role=self.role, finish_reason=finish_reason).inc()

    def count_client_request(self, key_id: str) -> None:
        """A request of the client with API key `key_id` (a prefix of its hash) let in."""
        self.client_requests.labels(role=self.role, api_key=key_id).inc()

    def count_client_tokens(self, key_id: str, prompt: int, completion: int) -> None:
        """Tokens of a finished request of the client with API key `key_id`."""
        self.client_tokens.labels(role=self.role, api_key=key_id, kind="prompt").inc(prompt)
        self.client_tokens.labels(role=self.role, api_key=key_id, kind="completion").inc(completion)

    def set_kv_blocks(self, used: int, free: int) -> None:
        """Current KV-cache occupancy, in blocks."""
        self.kv_blocks_used.set(used)
        self.kv_blocks_free.set(free)


def create_metrics(role: str, registry: CollectorRegistry | None = None) -> KvmeshMetrics:
    """Register kvmesh's series for ``role`` on ``registry`` (a fresh one by default)."""
    reg = registry if registry is not None else CollectorRegistry()

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, doc, ["role"], registry=reg, buckets=buckets).labels(role=role)

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["role"], registry=reg).labels(role=role)

    requests = Counter(
        "kvmesh_requests", "Finished requests.", ["role", "finish_reason"], registry=reg
    )
    return KvmeshMetrics(
        role=role,
        registry=reg,
        ttft=histogram("kvmesh_ttft_seconds", "Time to first token, seconds.", TTFT_BUCKETS),
        tpot=histogram("kvmesh_tpot_seconds", "Time per output token, seconds.", TPOT_BUCKETS),
        e2e_latency=histogram(
            "kvmesh_e2e_latency_seconds", "Request latency, seconds.", E2E_BUCKETS
        ),
        queue_time=histogram("kvmesh_queue_time_seconds", "Time queued, seconds.", QUEUE_BUCKETS),
        handoff=histogram(
            "kvmesh_handoff_seconds", "KV handoff duration, seconds.", HANDOFF_BUCKETS
        ),
        handoff_bytes=Counter(
            "kvmesh_handoff_bytes", "KV bytes handed off.", ["role"], registry=reg
        ).labels(role=role),
        requests=requests,
        kv_blocks_used=gauge("kvmesh_kv_blocks_used", "KV-cache blocks in use."),
        kv_blocks_free=gauge("kvmesh_kv_blocks_free", "KV-cache blocks free."),
        requests_in_flight=gauge("kvmesh_requests_in_flight", "Requests being served."),
        queue_depth=gauge("kvmesh_queue_depth", "Requests waiting to be scheduled."),
        client_requests=Counter(
            "kvmesh_client_requests",
            "Authenticated requests, by API key id.",
            ["role", "api_key"],
            registry=reg,
        ),
        client_tokens=Counter(
            "kvmesh_client_tokens",
            "Tokens served, by API key id and kind.",
            ["role", "api_key", "kind"],
            registry=reg,
        ),
    )


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return int(self.server.server_port)

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop serving and release the port; waits up to ``timeout_s`` seconds."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)


def start_metrics_server(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0"
) -> tuple[MetricsServer, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0 = ephemeral)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    handle = MetricsServer(server=server, thread=thread)
    return handle, handle.port
