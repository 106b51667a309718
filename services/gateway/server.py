"""The gateway server: the public `kvmesh.v1.Gateway`. Loads a tokenizer, never a model.

Per request: validate and tokenize -> admission (bounded queue) -> a Route through the workers
(route.py) -> metrics, span attributes and trailers from what the route reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.asyncio as redis
from opentelemetry import trace

from kvmesh.protos import gateway_pb2, gateway_pb2_grpc, worker_pb2
from kvmesh.services.gateway.auth import ApiKeyInterceptor, ApiKeys, caller
from kvmesh.services.gateway.directory import Directory
from kvmesh.services.gateway.route import Progress, RequestFailed, Route
from kvmesh.services.rpc import (
    abort,
    create_server,
    on_reload_signal,
    serve_until_signal,
    shutdown_signal,
)
from kvmesh.services.tls import PLAINTEXT, ServerTls, TlsFiles
from kvmesh.shared.control.connect import check_redis, redis_wait_s
from kvmesh.shared.control.ledger import Ledger
from kvmesh.shared.engine.tokenizer import Tokenizer, converted_path, load_tokenizer
from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig
from kvmesh.shared.model.source import is_synthetic, resolve_source
from kvmesh.shared.telemetry import KvmeshMetrics, TracingServerInterceptor, client_interceptors
from kvmesh.shared.telemetry.process import start_process_telemetry

log = logging.getLogger(__name__)
Code = grpc.StatusCode
SHUTDOWN_MARGIN_S = 5.0  # after the drain: closing channels, Redis and telemetry (each bounded)


@dataclass(frozen=True)
class GatewayConfig:
    redis_url: str
    model: str = ""  # the served default model (its tokenizer is loaded here)
    host: str = "0.0.0.0"
    port: int = 50051
    max_inflight: int = 64  # requests inside the mesh at once
    max_queue: int = 256  # requests waiting for admission beyond that; more are refused
    default_max_tokens: int = 256
    attempts: int = 3  # worker pairs tried for one request
    metrics_port: int = -1
    drain_timeout_s: float = 30.0
    fetch: FetchConfig = field(default_factory=FetchConfig)  # the default model's tokenizer
    tls: TlsFiles = PLAINTEXT  # TLS to clients, mutual TLS to the workers
    api_key_hashes: tuple[str, ...] = ()  # hex SHA-256 of accepted API keys
    api_keys_file: Path | None = None  # more of them, one per line, read again on SIGHUP
    open_services: tuple[str, ...] = ("health", "reflection")  # served without a key

    @property
    def authenticates(self) -> bool:
        return bool(self.api_key_hashes) or self.api_keys_file is not None

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODEL


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self, config: GatewayConfig, directory: Directory, tokenizer: Tokenizer | None,
        metrics: KvmeshMetrics,
    ) -> None:  # fmt: skip
        self.config = config
        self.directory = directory
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._slots = asyncio.Semaphore(config.max_inflight)
        self._waiting = 0
        self._limits: dict[str, worker_pb2.ModelResponse] = {}
        self.draining = False

    # ----------------------------------------------------------------------------- endpoints

    async def ListModels(self, request, context):  # noqa: N802 (gRPC method name)
        models = []
        for model in sorted(self.directory.models()):
            limits = await self._model_limits(model)
            models.append(
                gateway_pb2.ModelInfo(
                    id=model,
                    context_length=limits.context_length if limits else 0,
                    max_tokens_limit=limits.max_tokens_limit if limits else 0,
                    is_default=model == self.config.model_id,
                )  # fmt: skip
            )
        return gateway_pb2.ListModelsResponse(models=models)

    async def Generate(  # noqa: N802
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        rid = request.request_id or uuid.uuid4().hex
        span = trace.get_current_span()
        span.set_attribute("kvmesh.request_id", rid)
        started = time.perf_counter()
        try:
            model, prompt, sampling = await self._validate(request)
            span.set_attribute("kvmesh.prompt_tokens", len(prompt))
            limits = self._limits.get(model)
            block_size = limits.layout.block_size if limits else 0
            route = Route(self.directory, rid, model, prompt, sampling, context,
                          self.config.attempts, block_size)  # fmt: skip
            # aclosing: a client that hangs up releases the request's KV now, not when collected
            async with self._admit(span), contextlib.aclosing(route.stream()) as stream:
                async for response in stream:
                    if response.finish_reason:
                        self._record(response, route.progress, started)
                    yield response
            context.set_trailing_metadata(route.progress.trailers())
        except RequestFailed as e:
            self.metrics.finish_request("error")
            await abort(context, e.code, e.message)

    # ----------------------------------------------------------------------------- internals

    async def _validate(
        self, r: gateway_pb2.GenerateRequest
    ) -> tuple[str, list[int], worker_pb2.Sampling]:
        if self.draining:
            raise RequestFailed(Code.UNAVAILABLE, "the gateway is shutting down")
        model = r.model or self.config.model_id
        if model not in self.directory.models():  # a worker may have joined since
            await self.directory.refresh_until(
                lambda: model in self.directory.models(), redis_wait_s()
            )
        if model not in self.directory.models():
            known = ", ".join(sorted(self.directory.models())) or "none registered yet"
            code = Code.INVALID_ARGUMENT if self.directory.models() else Code.UNAVAILABLE
            raise RequestFailed(code, f"unknown model {model!r}; served: {known}")
        prompt = self._prompt_ids(r)
        limits = await self._model_limits(model)
        if limits is not None:
            if len(prompt) >= limits.context_length:
                raise RequestFailed(
                    Code.INVALID_ARGUMENT,
                    f"the prompt has {len(prompt)} tokens; the context of {model} holds "
                    f"{limits.context_length}, and one must be left to generate",
                )
            if r.max_tokens > limits.max_tokens_limit:
                raise RequestFailed(
                    Code.INVALID_ARGUMENT,
                    f"max_tokens {r.max_tokens} is over the limit of {limits.max_tokens_limit}",
                )
        if r.temperature < 0 or not 0 <= r.top_p <= 1:
            raise RequestFailed(
                Code.INVALID_ARGUMENT,
                f"temperature must be >= 0 and top_p in [0, 1]; got {r.temperature}, {r.top_p}",
            )
        sampling = worker_pb2.Sampling(
            max_tokens=r.max_tokens or self.config.default_max_tokens, temperature=r.temperature,
            top_p=r.top_p or 1.0, top_k=r.top_k,
            seed=r.seed if r.HasField("seed") else secrets.randbits(62),
            stop=list(r.stop), ignore_eos=r.ignore_eos,
        )  # fmt: skip
        return model, prompt, sampling

    def _prompt_ids(self, r: gateway_pb2.GenerateRequest) -> list[int]:
        given = [bool(r.prompt), len(r.messages) > 0, len(r.prompt_token_ids) > 0]
        if sum(given) != 1:
            raise RequestFailed(
                Code.INVALID_ARGUMENT,
                "set exactly one input: prompt, messages or prompt_token_ids "
                f"({'none' if not any(given) else 'several'} given)",
            )
        if r.prompt_token_ids:
            return list(r.prompt_token_ids)
        if self.tokenizer is None:
            raise RequestFailed(
                Code.INVALID_ARGUMENT,
                f"this gateway has no tokenizer for {self.config.model}: send prompt_token_ids",
            )
        try:
            if r.prompt:
                ids = self.tokenizer.encode(r.prompt)
            else:
                chat = [{"role": m.role, "content": m.content} for m in r.messages]
                ids = self.tokenizer.apply_chat_template(chat)
        except ValueError as e:
            raise RequestFailed(Code.INVALID_ARGUMENT, str(e)) from e
        if not ids:
            raise RequestFailed(Code.INVALID_ARGUMENT, "the prompt is empty after tokenization")
        return ids

    async def _model_limits(self, model: str) -> worker_pb2.ModelResponse | None:
        if model not in self._limits:
            worker = self.directory.any_worker(model)
            if worker is None:
                return None
            with contextlib.suppress(grpc.aio.AioRpcError):
                self._limits[model] = await worker.stub.Model(worker_pb2.ModelRequest(), timeout=5)
        return self._limits.get(model)

    @contextlib.asynccontextmanager
    async def _admit(self, span: trace.Span) -> AsyncGenerator[None, None]:
        if self._slots.locked() and self._waiting >= self.config.max_queue:
            raise RequestFailed(
                Code.RESOURCE_EXHAUSTED,
                f"the mesh is at capacity ({self.config.max_inflight} requests running, "
                f"{self._waiting} queued); retry later",
            )
        queued = time.perf_counter()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        wait = time.perf_counter() - queued
        self.metrics.queue_time.observe(wait)
        span.set_attribute("kvmesh.queue_seconds", wait)
        self.metrics.requests_in_flight.inc()
        try:
            yield
        finally:
            self.metrics.requests_in_flight.dec()
            self._slots.release()

    def _record(
        self, final: gateway_pb2.GenerateResponse, progress: Progress, started: float
    ) -> None:
        now = time.perf_counter()
        ttft = progress.first_token_at - started
        n = final.usage.completion_tokens
        tpot = (now - progress.first_token_at) / (n - 1) if n > 1 else 0.0
        self.metrics.ttft.observe(ttft)
        if n > 1:
            self.metrics.tpot.observe(tpot)
        self.metrics.e2e_latency.observe(now - started)
        self.metrics.finish_request(final.finish_reason)
        if key_id := caller.get():
            self.metrics.count_client_tokens(key_id, final.usage.prompt_tokens, n)
        span = trace.get_current_span()
        span.set_attribute("kvmesh.completion_tokens", n)
        span.set_attribute("kvmesh.finish_reason", final.finish_reason)
        span.set_attribute("kvmesh.ttft_seconds", ttft)
        span.set_attribute("kvmesh.tpot_seconds", tpot)


def gateway_tokenizer(model: str, fetch: FetchConfig) -> Tokenizer | None:
    """The tokenizer of the served model (the default model is fetched on first use). A
    synthetic model fetches nothing: it borrows the default model's tokenizer when the cache
    holds it, and without it the gateway takes token-id prompts only."""
    if not is_synthetic(model):
        return load_tokenizer(Path(resolve_source(model, fetch)), fetch.cache)
    gguf = fetch.model_file
    if gguf.exists() or converted_path(gguf, fetch.cache).exists():
        return load_tokenizer(gguf, fetch.cache)
    log.warning(
        "no tokenizer for %s: the default model is not in %s (`kvmesh fetch` puts it there); "
        "text prompts will be refused", model, fetch.cache,
    )  # fmt: skip
    return None


async def serve(config: GatewayConfig) -> None:
    """Run the gateway until SIGTERM/SIGINT, then finish in-flight streams and exit."""
    await check_redis(config.redis_url)
    telemetry = start_process_telemetry("kvmesh-gateway", "gateway", config.metrics_port)
    tracer = telemetry.tracing.tracer
    client = redis.from_url(config.redis_url)
    directory = Directory(Ledger(client), client_interceptors(tracer), config.tls)
    await directory.refresh()
    tokenizer = await asyncio.to_thread(gateway_tokenizer, config.model, config.fetch)
    servicer = GatewayServicer(config, directory, tokenizer, telemetry.metrics)
    interceptors: list[grpc.aio.ServerInterceptor] = [TracingServerInterceptor(tracer)]
    reloads = []
    if config.authenticates:  # first: a call without a key costs no more than this check
        keys = ApiKeys(config.api_key_hashes, config.api_keys_file)
        interceptors.insert(0, ApiKeyInterceptor(keys, telemetry.metrics, config.open_services))
        reloads.append(keys.reload)
        if not config.tls.enabled:
            log.warning("API keys without TLS: keys cross the network in the clear")
    # clients present no certificate: they prove who they are with an API key
    tls = ServerTls(config.tls, require_client_auth=False) if config.tls.enabled else None
    if tls is not None:
        reloads.append(tls.reload)
    server, port, health = create_server(
        f"{config.host}:{config.port}",
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "kvmesh.v1.Gateway")],
        interceptors, tls,
    )  # fmt: skip
    await server.start()
    on_reload_signal(*reloads)
    refresher = asyncio.create_task(directory.run())
    log.info("gateway serving on %s:%d", config.host, port)
    stop = shutdown_signal()
    print(f"gateway ready {config.host}:{port}", flush=True)

    async def drain() -> None:
        servicer.draining = True

    await serve_until_signal(
        server, health, stop, drain, grace_s=config.drain_timeout_s,
        deadline_s=config.drain_timeout_s + SHUTDOWN_MARGIN_S,
    )  # fmt: skip
    refresher.cancel()
    await directory.close()
    await client.aclose()
    telemetry.stop()
