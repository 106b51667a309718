"""One trace per request across the mesh's processes, exported to a real OTLP collector, and a
Prometheus endpoint per process."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from meshproc import Proc, generate, kvmesh, start_mesh
from otlp_collector import CollectedSpan, OtlpCollector
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.protos import gateway_pb2
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.model.config import SHAPES

N = 4
KV_BYTES_PER_TOKEN = SHAPES["smollm2-135m"].kv_bytes_per_token(4)  # fp32 on CPU
BLOCK = 16


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    c = OtlpCollector().start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def traced_mesh(collector: OtlpCollector) -> Iterator[tuple[Proc, str]]:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "KVMESH_METRICS_PORT": "0",
    }
    with RedisServer() as redis_server:
        proc, address = start_mesh(redis_server.url, "--prefill", "1", "--decode", "1",
                                   extra_env=env)  # fmt: skip
        yield proc, address
        proc.stop(signal.SIGINT)


def _served(address: str) -> list:
    async def run() -> list:
        requests = [
            gateway_pb2.GenerateRequest(
                request_id=f"traced-{i}", prompt=f"About number {i}" + " and more" * (5 * i),
                max_tokens=6, ignore_eos=True,
            )
            for i in range(N)
        ]  # fmt: skip
        return await asyncio.gather(*(generate(address, r) for r in requests))

    return asyncio.run(run())


def test_one_trace_per_request_spans_every_process(traced_mesh, collector: OtlpCollector) -> None:
    _, address = traced_mesh
    results = _served(address)
    assert all(r.code == grpc.StatusCode.OK for r in results), results

    def complete(spans: list[CollectedSpan]) -> bool:
        roots = [s for s in spans if s.name == "kvmesh.v1.Gateway/Generate"]
        handoffs = [s for s in spans if s.name == "kv_handoff"]
        decodes = [s for s in spans if s.name == "kvmesh.worker.v1.Decode/Decode" and s.kind == 2]
        return len(roots) >= N and len(handoffs) >= N and len(decodes) >= N

    spans = collector.wait_for(complete, timeout=20)
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.name == "kvmesh.v1.Gateway/Generate"]
    assert {r.attributes["kvmesh.request_id"] for r in roots} >= {f"traced-{i}" for i in range(N)}
    for root in roots:
        trace = [s for s in spans if s.trace_id == root.trace_id]
        services = {s.service_name for s in trace}
        assert {"kvmesh-gateway", "kvmesh-prefill", "kvmesh-decode"} <= services, services
        for span in trace:  # every span hangs off the gateway's request span
            node = span
            while node.parent_span_id:
                node = by_id[node.parent_span_id]
            assert node.span_id == root.span_id, (span.name, span.service_name)
        (handoff,) = [s for s in trace if s.name == "kv_handoff"]
        prompt_tokens = int(root.attributes["kvmesh.prompt_tokens"])
        blocks = -(-prompt_tokens // BLOCK)
        # the handoff moves whole blocks: the prompt's KV rounded up to the block size
        assert handoff.attributes["kvmesh.handoff.bytes"] == blocks * BLOCK * KV_BYTES_PER_TOKEN
        assert handoff.attributes["kvmesh.handoff.layers"] == SHAPES["smollm2-135m"].num_layers
        assert by_id[handoff.parent_span_id].service_name == "kvmesh-prefill"
        assert root.attributes["kvmesh.completion_tokens"] == 6
        assert root.attributes["kvmesh.ttft_seconds"] > 0


def test_a_client_traceparent_is_honoured(traced_mesh, collector: OtlpCollector) -> None:
    _, address = traced_mesh
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            from kvmesh.protos import gateway_pb2_grpc

            call = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt="Hello", max_tokens=3),
                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
            )
            async for _ in call:
                pass

    asyncio.run(run())
    wanted = {"kvmesh-gateway", "kvmesh-prefill", "kvmesh-decode"}
    # each process exports on its own schedule: wait until all three have sent their spans
    collector.wait_for(
        lambda ss: {s.service_name for s in ss if s.trace_id == trace_id} >= wanted, timeout=20
    )


def _metrics_ports(proc: Proc) -> dict[str, int]:
    ports = {}
    for line in proc.lines:
        m = re.search(r"\[(\w+)-?\d*\] (\w+) metrics at :(\d+)/metrics", line)
        if m:
            ports[m.group(1)] = int(m.group(3))
    return ports


def test_prometheus_endpoints_parse_and_count_requests(traced_mesh) -> None:
    proc, address = traced_mesh
    served_before = _ttft_count(_metrics_ports(proc)["gateway"])
    results = _served(address)
    assert all(r.code == grpc.StatusCode.OK for r in results), results
    ports = _metrics_ports(proc)
    assert set(ports) == {"gateway", "prefill", "decode"}
    for role, port in ports.items():
        families = {f.name: f for f in _families(port)}
        assert "kvmesh_kv_blocks_free" in families or role == "gateway"
    assert _ttft_count(ports["gateway"]) == served_before + N


def _families(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def _ttft_count(port: int) -> float:
    for family in _families(port):
        if family.name == "kvmesh_ttft_seconds":
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    raise AssertionError("no kvmesh_ttft_seconds histogram")


def test_without_a_collector_startup_and_shutdown_add_no_delay() -> None:
    with RedisServer() as redis_server:
        start = time.monotonic()
        gateway = kvmesh("gateway", "--port", "0", "--host", "127.0.0.1",
                         redis_url=redis_server.url)  # fmt: skip
        gateway.wait_for("gateway ready", timeout=120)
        started = time.monotonic() - start
        stop = time.monotonic()
        assert gateway.stop(signal.SIGTERM) == 0
        stopped = time.monotonic() - stop
    assert stopped < 3.0, stopped
    assert started < 60, started
