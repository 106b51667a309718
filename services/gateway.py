"""Gateway service: the public `kvmesh.v1.Gateway`. Loads a tokenizer, never a model.

Per request: validate and tokenize -> admission (bounded queue) -> pick a decode worker and
reserve KV blocks there -> pick a prefill worker, which computes the prompt and pushes the KV
-> stream the first token (sampled by prefill) -> stream the decode worker's tokens.
A failed reservation, prefill or handoff is retried on other workers before any decode token has
reached the client, so the client never sees it; the first token is not sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import redis.asyncio as redis
from opentelemetry import trace

from protos import gateway_pb2, gateway_pb2_grpc, worker_pb2
from shared.directory import Directory, Worker
from shared.models.fetch import DEFAULT_MODEL
from shared.models.loader import SYNTHETIC_PREFIX, resolve_source
from shared.ownership import Ledger
from shared.rpc import abort, create_server, serve_until_signal, shutdown_signal
from shared.telemetry import KvmeshMetrics, TracingServerInterceptor, client_interceptors
from shared.telemetry.process import start_process_telemetry
from shared.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
Code = grpc.StatusCode


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

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODEL


class RequestFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Progress:
    """What has reached the client so far; retries never repeat it."""

    sent_first: bool = False
    decode_tokens: int = 0
    first_token_at: float = 0.0
    kv_bytes: int = 0  # KV pushed by prefill, all attempts
    prefill_worker: str = ""
    decode_worker: str = ""

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata telling the client how its request was served."""
        return (
            ("kvmesh-kv-bytes", str(self.kv_bytes)),
            ("kvmesh-prefill-worker", self.prefill_worker),
            ("kvmesh-decode-worker", self.decode_worker),
        )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self, config: GatewayConfig, directory: Directory, tokenizer: Tokenizer,
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
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        span = trace.get_current_span()
        span.set_attribute("kvmesh.request_id", rid)
        started = time.perf_counter()
        try:
            model, prompt, sampling = await self._validate(request)
            span.set_attribute("kvmesh.prompt_tokens", len(prompt))
            progress = _Progress()
            async with self._admit(span):
                async for response in self._serve(
                    rid, model, prompt, sampling, context, started, progress
                ):
                    yield response
            context.set_trailing_metadata(progress.trailers())
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
        if model not in self.directory.models():
            await self.directory.refresh()  # a worker may have joined since the last refresh
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
            worker = self.directory.pick_decode(model, set())
            if worker is None:
                return None
            with contextlib.suppress(grpc.aio.AioRpcError):
                self._limits[model] = await worker.stub.Model(worker_pb2.ModelRequest(), timeout=5)
        return self._limits.get(model)

    @contextlib.asynccontextmanager
    async def _admit(self, span: trace.Span) -> AsyncIterator[None]:
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

    async def _serve(
        self, rid: str, model: str, prompt: list[int], sampling: worker_pb2.Sampling,
        context: grpc.aio.ServicerContext, started: float, progress: _Progress,
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:  # fmt: skip
        tried: set[str] = set()
        last_error = "no worker pair was available"
        for _ in range(self.config.attempts):
            try:
                async for response in self._attempt(rid, model, prompt, sampling, context,
                                                    progress, tried):  # fmt: skip
                    if response.finish_reason:
                        self._record(response, progress, started)
                    yield response
                return
            except _Retry as e:
                last_error = str(e)
                log.warning("request %s: %s; retrying on other workers", rid, e)
        raise RequestFailed(Code.UNAVAILABLE, f"request {rid} failed: {last_error}")

    async def _attempt(
        self, rid: str, model: str, prompt: list[int], sampling: worker_pb2.Sampling,
        context: grpc.aio.ServicerContext, progress: _Progress, tried: set[str],
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:  # fmt: skip
        decode, reservation = await self._reserve(rid, model, prompt, sampling, context, tried)
        hid = reservation.handoff_id
        consumed = False
        try:
            first = await self._prefill(
                rid, model, prompt, sampling, reservation, context, tried, progress
            )
            progress.kv_bytes += first.kv_bytes
            progress.decode_worker = decode.info.worker_id
            if not progress.sent_first:
                progress.sent_first = True
                progress.first_token_at = time.perf_counter()
                yield gateway_pb2.GenerateResponse(
                    request_id=rid, token_ids=[first.first_token], text=first.text
                )
            if first.finish_reason:
                yield self._final(rid, first.finish_reason, len(prompt), 1)
                return
            consumed = True
            call = decode.stub.Decode(
                worker_pb2.DecodeRequest(
                    request_id=rid, handoff_id=hid, prompt_token_ids=prompt,
                    first_token=first.first_token, sampling=sampling,
                ),
                timeout=context.time_remaining(),
            )  # fmt: skip
            try:
                async for msg in call:
                    progress.decode_tokens += len(msg.token_ids)
                    response = gateway_pb2.GenerateResponse(
                        request_id=rid, token_ids=msg.token_ids, text=msg.text,
                        finish_reason=msg.finish_reason,
                    )  # fmt: skip
                    if msg.finish_reason:
                        response.usage.prompt_tokens = len(prompt)
                        response.usage.completion_tokens = msg.completion_tokens
                    yield response
            except grpc.aio.AioRpcError as e:
                self._decode_failed(decode, e, progress)
            finally:
                call.cancel()
        finally:
            if not consumed:
                await self._release(decode, hid)

    async def _reserve(
        self, rid: str, model: str, prompt: list[int], sampling: worker_pb2.Sampling,
        context: grpc.aio.ServicerContext, tried: set[str],
    ) -> tuple[Worker, worker_pb2.ReserveResponse]:  # fmt: skip
        deadline = time.monotonic() + (context.time_remaining() or 60.0)
        while True:
            decode = self.directory.pick_decode(model, tried)
            if decode is None:
                await self.directory.refresh()  # one may have joined since the last refresh
                decode = self.directory.pick_decode(model, tried)
            if decode is None:
                raise _Retry("no decode worker is available")
            request = worker_pb2.ReserveRequest(
                request_id=rid, handoff_id=str(uuid.uuid4()), prompt_token_ids=prompt,
                sampling=sampling,
            )  # fmt: skip
            try:
                reservation = await decode.stub.Reserve(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as e:
                if e.code() == Code.INVALID_ARGUMENT:
                    raise RequestFailed(e.code(), e.details() or "invalid request") from e
                if e.code() == Code.DEADLINE_EXCEEDED:
                    raise RequestFailed(e.code(), "deadline exceeded while reserving KV") from e
                if e.code() == Code.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # blocks free up as sequences finish
                    continue
                tried.add(decode.info.worker_id)
                self.directory.mark_suspect(decode.info.worker_id)
                raise _Retry(f"decode {decode.info.worker_id}: {e.details()}") from e
            self.directory.note_reserved(decode.info.worker_id, reservation.num_blocks)
            return decode, reservation

    async def _prefill(
        self, rid: str, model: str, prompt: list[int], sampling: worker_pb2.Sampling,
        reservation: worker_pb2.ReserveResponse, context: grpc.aio.ServicerContext,
        tried: set[str], progress: _Progress,
    ) -> worker_pb2.PrefillResponse:  # fmt: skip
        prefill = self.directory.pick_prefill(model, tried)
        if prefill is None:
            await self.directory.refresh()
            prefill = self.directory.pick_prefill(model, tried)
        if prefill is None:
            raise _Retry("no prefill worker is available")
        wid = prefill.info.worker_id
        progress.prefill_worker = wid
        self.directory.outstanding[wid] += 1
        call = prefill.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                handoff_id=reservation.handoff_id, kv_endpoint=reservation.kv_endpoint,
                layout=reservation.layout,
            ),
            timeout=context.time_remaining(),
        )  # fmt: skip
        try:
            response: worker_pb2.PrefillResponse = await call
        except grpc.aio.AioRpcError as e:
            if e.code() in (Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED):
                raise RequestFailed(e.code(), e.details() or "prefill failed") from e
            tried.add(wid)
            if e.code() == Code.UNAVAILABLE:
                self.directory.mark_suspect(wid)
            raise _Retry(f"prefill {wid}: {e.details()}") from e
        finally:
            self.directory.outstanding[wid] -= 1
            call.cancel()
        span = trace.get_current_span()
        span.set_attribute("kvmesh.kv_bytes", response.kv_bytes)
        return response

    def _decode_failed(
        self, decode: Worker, error: grpc.aio.AioRpcError, progress: _Progress
    ) -> None:
        code = error.code()
        if code in (Code.CANCELLED, Code.DEADLINE_EXCEEDED):
            raise RequestFailed(code, error.details() or code.name.lower())
        if code == Code.UNAVAILABLE:
            self.directory.mark_suspect(decode.info.worker_id)
        if progress.decode_tokens == 0 and code in (Code.ABORTED, Code.UNAVAILABLE, Code.NOT_FOUND):
            raise _Retry(f"decode {decode.info.worker_id}: {error.details()}")
        raise RequestFailed(
            Code.UNAVAILABLE,
            f"decode worker {decode.info.worker_id} failed mid-stream: {error.details()}",
        )

    async def _release(self, decode: Worker, handoff_id: str) -> None:
        request = worker_pb2.ReleaseRequest(handoff_id=handoff_id)
        # shielded: this runs while a cancelled request unwinds, and must still reach decode
        with contextlib.suppress(Exception):
            await asyncio.shield(decode.stub.Release(request, timeout=5))

    def _final(
        self, rid: str, reason: str, prompt_tokens: int, completion_tokens: int
    ) -> gateway_pb2.GenerateResponse:
        response = gateway_pb2.GenerateResponse(request_id=rid, finish_reason=reason)
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
        return response

    def _record(
        self, final: gateway_pb2.GenerateResponse, progress: _Progress, started: float
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
        span = trace.get_current_span()
        span.set_attribute("kvmesh.completion_tokens", n)
        span.set_attribute("kvmesh.finish_reason", final.finish_reason)
        span.set_attribute("kvmesh.ttft_seconds", ttft)
        span.set_attribute("kvmesh.tpot_seconds", tpot)


class _Retry(Exception):
    """This attempt failed in a way another worker pair may not."""


def gateway_tokenizer(model: str) -> Tokenizer:
    """The tokenizer of the served model; synthetic models use the default model's."""
    source = resolve_source("" if model.startswith(SYNTHETIC_PREFIX) else model)
    from pathlib import Path

    return load_tokenizer(Path(source))


async def serve(config: GatewayConfig) -> None:
    """Run the gateway until SIGTERM/SIGINT, then finish in-flight streams and exit."""
    telemetry = start_process_telemetry("kvmesh-gateway", "gateway", config.metrics_port)
    tracer = telemetry.tracing.tracer
    client = redis.from_url(config.redis_url)
    directory = Directory(Ledger(client), client_interceptors(tracer))
    await directory.refresh()
    tokenizer = await asyncio.to_thread(gateway_tokenizer, config.model)
    servicer = GatewayServicer(config, directory, tokenizer, telemetry.metrics)
    server, port, health = create_server(
        f"{config.host}:{config.port}",
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "kvmesh.v1.Gateway")],
        [TracingServerInterceptor(tracer)],
    )
    await server.start()
    refresher = asyncio.create_task(directory.run())
    log.info("gateway serving on %s:%d", config.host, port)
    stop = shutdown_signal()
    print(f"gateway ready {config.host}:{port}", flush=True)

    async def drain() -> None:
        servicer.draining = True

    await serve_until_signal(server, health, stop, drain, grace_s=config.drain_timeout_s)
    refresher.cancel()
    await directory.close()
    await client.aclose()
    telemetry.stop()
