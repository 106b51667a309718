"""Telemetry against real grpc.aio servers, real channels and a real OTLP collector."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from otlp_collector import CollectedSpan, OtlpCollector
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.shared.telemetry import (
    Tracing,
    TracingServerInterceptor,
    client_interceptors,
    configure_logging,
    create_metrics,
    handoff_span,
    inject_metadata,
    setup_tracing,
    start_metrics_server,
    start_otlp_metrics,
    tracing_config_from_env,
)
from kvmesh.shared.telemetry.otel_env import DEFAULT_HTTP_ENDPOINT

SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind values
CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
LAYER_BYTES = 4096
LAYERS = 3


def current_ids() -> bytes:
    """``trace_id:span_id`` (hex) of the span current in the caller, as the reply payload."""
    ctx = trace_current().get_span_context()
    return f"{ctx.trace_id:032x}:{ctx.span_id:016x}".encode()


def trace_current() -> Any:
    from opentelemetry import trace

    return trace.get_current_span()


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def otlp_env(collector: OtlpCollector) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}


# --- two services, A -> B -------------------------------------------------------------------------


async def start_server(
    tracing: Tracing, service: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[TracingServerInterceptor(tracing.tracer)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def service_b(tracing: Tracing) -> dict[str, grpc.RpcMethodHandler]:
    """B: a unary handler doing a KV handoff, and two streaming styles echoing span ids."""

    async def unary(request: bytes, context: Any) -> bytes:
        with handoff_span(tracing.tracer, transport="tcp", request_id="r1") as handoff:
            for layer in range(LAYERS):
                handoff.layer_done(layer, nbytes=LAYER_BYTES, seconds=0.001)
        return current_ids()

    async def stream_yield(request: bytes, context: Any) -> Any:
        for _ in range(3):
            await asyncio.sleep(0)
            yield current_ids()

    async def stream_write(request: bytes, context: Any) -> None:
        for _ in range(2):
            await context.write(current_ids())

    async def fail(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
        raise AssertionError("unreachable")

    return {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "StreamYield": grpc.unary_stream_rpc_method_handler(stream_yield),
        "StreamWrite": grpc.unary_stream_rpc_method_handler(stream_write),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }


def service_a(tracing: Tracing, b_port: int) -> dict[str, grpc.RpcMethodHandler]:
    """A: a streaming handler calling every method of B, replying with all span ids seen."""

    async def generate(request: bytes, context: Any) -> Any:
        yield b"A=" + current_ids()
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{b_port}", interceptors=client_interceptors(tracing.tracer)
        ) as channel:
            yield b"B.Unary=" + await channel.unary_unary("/test.B/Unary")(b"")
            async for reply in channel.unary_stream("/test.B/StreamYield")(b""):
                yield b"B.StreamYield=" + reply
            async for reply in channel.unary_stream("/test.B/StreamWrite")(b""):
                yield b"B.StreamWrite=" + reply
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary("/test.B/Fail")(b"")
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        yield b"A.after=" + current_ids()

    return {"Generate": grpc.unary_stream_rpc_method_handler(generate)}


async def call_a_through_mesh(collector: OtlpCollector, call: Callable[[int], Any]) -> list[str]:
    """Start B and A (own providers), run ``call(a_port)``, flush; returns A's replies."""
    tracing_a = setup_tracing("svc-a", otlp_env(collector))
    tracing_b = setup_tracing("svc-b", otlp_env(collector))
    server_b, b_port = await start_server(tracing_b, "test.B", service_b(tracing_b))
    server_a, a_port = await start_server(tracing_a, "test.A", service_a(tracing_a, b_port))
    try:
        replies = [r.decode() for r in await call(a_port)]
    finally:
        await server_a.stop(None)
        await server_b.stop(None)
        assert tracing_a.shutdown() and tracing_b.shutdown()
    return replies


def by_name(spans: list[CollectedSpan], name: str, kind: int) -> list[CollectedSpan]:
    return [s for s in spans if s.name == name and s.kind == kind]


def only(spans: list[CollectedSpan]) -> CollectedSpan:
    assert len(spans) == 1, spans
    return spans[0]


def assert_mesh_trace(spans: list[CollectedSpan], replies: list[str]) -> str:
    """One trace; client span -> server span links on every hop; handler saw its span."""
    assert len({s.trace_id for s in spans}) == 1
    a_server = only(by_name(spans, "test.A/Generate", SERVER))
    assert a_server.service_name == "svc-a"
    for method in ("Unary", "StreamYield", "StreamWrite", "Fail"):
        client = only(by_name(spans, f"test.B/{method}", CLIENT))
        server = only(by_name(spans, f"test.B/{method}", SERVER))
        assert (client.service_name, server.service_name) == ("svc-a", "svc-b")
        assert client.parent_span_id == a_server.span_id
        assert server.parent_span_id == client.span_id
        assert server.attributes["rpc.service"] == "test.B"
    # The handlers' current span (returned in replies) is the server span, on every step.
    seen = dict(r.split("=", 1) for r in replies)
    trace_id = a_server.trace_id
    assert seen["A"] == seen["A.after"] == f"{trace_id}:{a_server.span_id}"
    for method in ("Unary", "StreamYield", "StreamWrite"):
        server = only(by_name(spans, f"test.B/{method}", SERVER))
        values = {r.split("=", 1)[1] for r in replies if r.startswith(f"B.{method}=")}
        assert values == {f"{trace_id}:{server.span_id}"}
    return a_server.parent_span_id


def run_on(loop: str, coro: Any) -> Any:
    """Run ``coro`` on the stock asyncio loop or on uvloop (what the services use)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_two_services_one_trace_with_clients_traceparent(loop: str) -> None:
    async def call(a_port: int) -> list[bytes]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a_port}") as channel:
            stream = channel.unary_stream("/test.A/Generate")(
                b"", metadata=(("traceparent", CLIENT_TRACEPARENT),)
            )
            return [reply async for reply in stream]

    with OtlpCollector() as collector:
        replies = run_on(loop, call_a_through_mesh(collector, call))
        spans = collector.wait_for(lambda s: len(s) >= 9, timeout=5)
    assert len(replies) == 2 + 1 + 3 + 2
    assert len(spans) == 10  # A server, 4 x (client + server), 1 handoff
    assert assert_mesh_trace(spans, replies) == CLIENT_SPAN_ID
    assert spans[0].trace_id == CLIENT_TRACE_ID
    fail = only(by_name(spans, "test.B/Fail", CLIENT))
    assert fail.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert fail.status_code == 2  # ERROR on the client; a client error is not a server fault
    assert only(by_name(spans, "test.B/Fail", SERVER)).status_code == 0


def test_handoff_span_has_bytes_layers_and_events() -> None:
    async def call(a_port: int) -> list[bytes]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{a_port}") as channel:
            return [r async for r in channel.unary_stream("/test.A/Generate")(b"")]

    with OtlpCollector() as collector:
        asyncio.run(call_a_through_mesh(collector, call))
        spans = collector.wait_for(lambda s: len(s) >= 10, timeout=5)
    handoff = only([s for s in spans if s.name == "kv_handoff"])
    b_unary = only(by_name(spans, "test.B/Unary", SERVER))
    assert handoff.parent_span_id == b_unary.span_id
    assert handoff.attributes["kvmesh.handoff.bytes"] == LAYERS * LAYER_BYTES
    assert handoff.attributes["kvmesh.handoff.layers"] == LAYERS
    assert handoff.attributes["kvmesh.handoff.transport"] == "tcp"
    assert handoff.attributes["kvmesh.handoff.gb_per_s"] > 0
    assert [e[1]["kvmesh.layer"] for e in handoff.events] == list(range(LAYERS))
    assert only(by_name(spans, "test.A/Generate", SERVER)).parent_span_id == ""  # a new trace


def test_client_interceptor_span_is_parent_of_server_span() -> None:
    """A traced client (its own provider) starts the trace; the servers continue it."""
    with OtlpCollector() as collector:
        client_tracing = setup_tracing("client", otlp_env(collector))

        async def call(a_port: int) -> list[bytes]:
            with client_tracing.tracer.start_as_current_span("request"):
                async with grpc.aio.insecure_channel(
                    f"127.0.0.1:{a_port}", interceptors=client_interceptors(client_tracing.tracer)
                ) as channel:
                    return [r async for r in channel.unary_stream("/test.A/Generate")(b"")]

        replies = asyncio.run(call_a_through_mesh(collector, call))
        client_tracing.shutdown()
        spans = collector.wait_for(lambda s: len(s) >= 12, timeout=5)
    root = only([s for s in spans if s.name == "request"])
    client = only(by_name(spans, "test.A/Generate", CLIENT))
    assert (root.service_name, client.service_name) == ("client", "client")
    assert client.parent_span_id == root.span_id
    assert assert_mesh_trace(spans, replies) == client.span_id


def test_inject_metadata_carries_the_current_span() -> None:
    tracing = setup_tracing("svc", {})
    with tracing.tracer.start_as_current_span("outer") as span:
        headers = dict(inject_metadata())
    ctx = span.get_span_context()
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (trace_id, span_id) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    assert inject_metadata() == []  # no current span, nothing to send
    tracing.shutdown()


def test_http_protobuf_exporter_and_resource_attributes() -> None:
    with OtlpCollector() as collector:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.http_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "from-env",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,service.name=ignored",
        }
        tracing = setup_tracing("default-name", env)
        with tracing.tracer.start_as_current_span("over-http"):
            pass
        assert tracing.shutdown()
        span = only(collector.wait_for(lambda s: len(s) >= 1, timeout=5))
    assert (span.name, span.service_name) == ("over-http", "from-env")


# --- configuration and shutdown -----------------------------------------------------------------


def test_config_defaults_export_nothing() -> None:
    config = tracing_config_from_env("gateway", {})
    assert config.service_name == "gateway"
    assert config.exporters == ()
    assert not config.enabled


def test_config_from_env() -> None:
    config = tracing_config_from_env(
        "gateway",
        {
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "250",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=gw-1,k8s.pod.name=gw%2D1",
        },
    )
    assert config.service_name == "gw-1"
    assert config.exporters == ("otlp", "console")
    assert config.endpoint == "http://collector:4318/v1/traces"
    assert config.timeout_s == 0.25
    assert config.resource_attributes == (("k8s.pod.name", "gw-1"),)
    assert "TraceIdRatioBased{0.25}" in config.sampler.get_description()
    assert tracing_config_from_env(
        "x", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_EXPORTER": "otlp"}
    ).endpoint == (DEFAULT_HTTP_ENDPOINT + "/v1/traces")


def test_config_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        tracing_config_from_env("x", {"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        tracing_config_from_env("x", {"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="protocol"):
        tracing_config_from_env("x", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_no_otel_env_setup_and_shutdown_are_fast() -> None:
    started = time.perf_counter()
    tracing = setup_tracing("gateway", {})
    with tracing.tracer.start_as_current_span("request"):
        pass
    assert tracing.shutdown()
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_dead_collector_shutdown_is_bounded(protocol: str) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
    }
    tracing = setup_tracing("gateway", env)
    for _ in range(10):
        with tracing.tracer.start_as_current_span("request"):
            pass
    started = time.perf_counter()
    tracing.shutdown()
    assert time.perf_counter() - started < 2.0
    join_abandoned("otel-shutdown")


# --- metrics and logs ---------------------------------------------------------------------------


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(family: Any, sample_name: str, **labels: str) -> float:
    matches = [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample_name, labels, family.samples)
    return float(matches[0])


def test_metrics_endpoint_parses_and_counts_observations() -> None:
    gateway, decode = create_metrics("gateway"), create_metrics("decode")  # registries coexist
    ttfts = [0.02, 0.08, 0.4, 1.2, 9.0]
    for seconds in ttfts:
        gateway.ttft.observe(seconds)
    gateway.finish_request("stop")
    gateway.finish_request("length")
    gateway.finish_request("stop")
    gateway.set_kv_blocks(used=3, free=61)
    decode.observe_handoff(nbytes=1 << 20, seconds=0.002)
    server, port = start_metrics_server(gateway.registry, port=0, host="127.0.0.1")
    try:
        families = scrape(port)
    finally:
        server.stop()
    ttft = families["kvmesh_ttft_seconds"]
    assert ttft.type == "histogram"
    assert sample_value(ttft, "kvmesh_ttft_seconds_count", role="gateway") == len(ttfts)
    assert sample_value(ttft, "kvmesh_ttft_seconds_bucket", le="+Inf") == len(ttfts)
    assert sample_value(ttft, "kvmesh_ttft_seconds_bucket", le="0.1") == 2
    assert sample_value(ttft, "kvmesh_ttft_seconds_sum") == pytest.approx(sum(ttfts))
    requests = families["kvmesh_requests"]
    assert sample_value(requests, "kvmesh_requests_total", finish_reason="stop") == 2
    assert sample_value(families["kvmesh_kv_blocks_free"], "kvmesh_kv_blocks_free") == 61
    assert "kvmesh_handoff_bytes" in families
    assert sample_value(families["kvmesh_handoff_bytes"], "kvmesh_handoff_bytes_total") == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_log_records_carry_current_trace_id() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    tracing = setup_tracing("svc", {})
    try:
        handler = configure_logging("svc", logging.INFO, stream=stream)
        configure_logging("svc", logging.INFO, stream=stream)  # replaces, does not duplicate
        with tracing.tracer.start_as_current_span("work") as span:
            logging.getLogger("kvmesh.test").info("inside")
        logging.getLogger("kvmesh.test").info("outside")
    finally:
        root.handlers[:], root.level = saved
        tracing.shutdown()
    ctx = span.get_span_context()
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(f"inside trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}")
    assert " svc kvmesh.test: " in inside
    assert outside.endswith(f"trace_id={'0' * 32} span_id={'0' * 16}")
    assert handler not in root.handlers


def test_otlp_metrics_push_the_registry() -> None:
    metrics = create_metrics("gateway")
    for seconds in (0.02, 0.08, 0.4):
        metrics.ttft.observe(seconds)
    metrics.finish_request("stop")
    metrics.queue_depth.set(4)
    with OtlpCollector() as collector:
        env = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        pusher = start_otlp_metrics(metrics.registry, "gateway", env)
        assert pusher is not None
        pusher.stop()  # pushes a last snapshot
        received = {m.name: m for m in collector.metrics()}
    ttft = received["kvmesh_ttft_seconds"]
    assert (ttft.kind, ttft.service_name) == ("histogram", "gateway")
    point = only_point(ttft.points)
    assert point["attributes"] == {"role": "gateway"}
    assert point["count"] == sum(point["bucket_counts"]) == 3
    assert len(point["bucket_counts"]) == len(point["explicit_bounds"]) + 1
    requests = received["kvmesh_requests"]
    assert requests.kind == "sum"
    assert only_point(requests.points)["value"] == 1
    assert only_point(received["kvmesh_queue_depth"].points)["value"] == 4
    assert start_otlp_metrics(metrics.registry, "gateway", {}) is None  # not configured


def test_otlp_metrics_stop_is_bounded_when_collector_is_dead() -> None:
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    pusher = start_otlp_metrics(create_metrics("decode").registry, "decode", env)
    assert pusher is not None
    started = time.perf_counter()
    pusher.stop()
    assert time.perf_counter() - started < 3.0
    join_abandoned("otlp-metrics")


def join_abandoned(name: str) -> None:
    """Wait for the threads `name` a bounded stop left retrying a dead collector, so that their
    export errors are logged in the test that made them, not into a later one's caplog."""
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(30)
            assert not thread.is_alive()


def only_point(points: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    assert len(points) == 1, points
    return points[0]


def edge_service() -> dict[str, grpc.RpcMethodHandler]:
    """Handlers that fail, stream until cancelled, and stream in both directions."""
    cancelled = asyncio.Event()

    async def boom(request: bytes, context: Any) -> bytes:
        raise RuntimeError("kaboom")

    async def forever(request: bytes, context: Any) -> Any:
        try:
            while True:
                yield current_ids()
                await asyncio.sleep(0.01)
        finally:
            cancelled.set()

    async def echo(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield current_ids()

    async def wait_cancelled(request: bytes, context: Any) -> bytes:
        await asyncio.wait_for(cancelled.wait(), timeout=5)
        return b"ok"

    return {
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "WaitCancelled": grpc.unary_unary_rpc_method_handler(wait_cancelled),
    }


async def exercise_edges(tracing: Tracing) -> list[str]:
    server, port = await start_server(tracing, "test.E", edge_service())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.unary_unary("/test.E/Boom")(b"")
            call = channel.unary_stream("/test.E/Forever")(b"")
            await call.read()
            call.cancel()
            assert await channel.unary_unary("/test.E/WaitCancelled")(b"") == b"ok"
            echo = channel.stream_stream("/test.E/Echo")(iter([b"1", b"2"]))
            return [reply.decode() async for reply in echo]
    finally:
        await server.stop(None)


def test_server_spans_of_failed_cancelled_and_bidi_rpcs(caplog: pytest.LogCaptureFixture) -> None:
    with OtlpCollector() as collector:
        tracing = setup_tracing("svc-e", otlp_env(collector))
        with caplog.at_level(logging.ERROR, logger="opentelemetry"):
            echoed = asyncio.run(exercise_edges(tracing))
        assert tracing.shutdown()
        spans = collector.wait_for(lambda s: len(s) >= 4, timeout=5)
    otel_errors = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert not otel_errors  # e.g. no "Failed to detach context" from the cancelled stream
    boom = only(by_name(spans, "test.E/Boom", SERVER))
    assert boom.status_code == 2
    assert boom.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]
    assert [name for name, _ in boom.events] == ["exception"]
    forever = only(by_name(spans, "test.E/Forever", SERVER))
    assert forever.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    echo = only(by_name(spans, "test.E/Echo", SERVER))
    assert echoed == [f"{echo.trace_id}:{echo.span_id}"] * 2
