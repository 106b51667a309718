"""Aggregated service: prefill and decode in one engine, no KV handoff; the one-card deployment
and the baseline every disaggregated figure is compared with.

    Generate -> room for the prompt's KV? (else RESOURCE_EXHAUSTED: later or elsewhere) ->
    Redis block set `reserved` -> the prompt joins the engine (`owned`) -> stream every token,
    the first one included -> free the blocks (engine and Redis) however the stream ends

Its block sets, streams and their freeing are the decode worker's (services/worker/stream.py).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator

import grpc
from opentelemetry import trace

from kvmesh.protos import worker_pb2, worker_pb2_grpc
from kvmesh.services.rpc import abort
from kvmesh.services.worker.process import WorkerContext, WorkerParts, serve_worker
from kvmesh.services.worker.registration import (
    WorkerConfig,
    checked_request,
    inspect,
    model_response,
)
from kvmesh.services.worker.stream import BlockSets
from kvmesh.shared.engine.engine import Engine, RequestOutput
from kvmesh.shared.engine.kv_cache import blocks_for
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.telemetry import KvmeshMetrics


class NoRoom(Exception):
    """The engine's free KV cannot take the prompt now."""


class AggregatedServicer(worker_pb2_grpc.AggregatedServicer):
    def __init__(self, sets: BlockSets, model_id: str, metrics: KvmeshMetrics) -> None:
        self.sets = sets
        self.loop = sets.loop
        self.model_id = model_id
        self.metrics = metrics
        self.draining = False
        self._streams = 0

    @property
    def idle(self) -> bool:
        return self._streams == 0 and not self.sets.freeing

    async def Model(self, request, context):  # noqa: N802 (gRPC method name)
        return model_response(self.loop.engine, self.model_id)

    async def Inspect(self, request, context):  # noqa: N802
        return await inspect(self.loop, self.sets.registration.worker_id, 0)

    async def Generate(  # noqa: N802
        self, request: worker_pb2.AggregatedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        if self.draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "this aggregated worker is draining")
        prompt, params = await checked_request(self.loop.engine, request, context)
        self._streams += 1
        try:  # aclosing: a cancelled stream frees its blocks now, not when collected
            stream = self._generate(uuid.uuid4().hex, prompt, params, context)
            async with contextlib.aclosing(stream):
                async for message in stream:
                    yield message
        finally:
            self._streams -= 1

    async def _generate(
        self, hid: str, prompt: list[int], params: SamplingParams,
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:  # fmt: skip
        engine = self.loop.engine
        try:
            reserved = await self.sets.reserve(
                hid, blocks_for(len(prompt), engine.config.block_size)
            )
        except BaseException:  # cancelled or Redis failed: the set may exist all the same
            await self.sets.free(hid)
            raise
        if not reserved:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "block ownership was refused")

        def submit(e: Engine) -> None:
            if not e.add_request_if_room(hid, prompt, params):
                raise NoRoom

        try:
            stream = self.sets.stream(hid, submit, self._first_output)
            async with contextlib.aclosing(stream):
                async for message in stream:
                    yield message
        except NoRoom:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no free KV blocks for this prompt on this aggregated worker",
            )

    def _first_output(self, out: RequestOutput) -> None:
        """The prompt was computed: its queueing and batch on the span and the metrics."""
        self.metrics.queue_time.observe(out.queue_seconds)
        span = trace.get_current_span()
        span.set_attribute("kvmesh.prompt_tokens", out.num_prompt_tokens)
        span.set_attribute("kvmesh.queue_seconds", out.queue_seconds)
        span.set_attribute("kvmesh.batch_size", out.step_batch_size)


def aggregated_parts(ctx: WorkerContext) -> WorkerParts:
    """The aggregated role: the servicer alone (no KV transport)."""
    servicer = AggregatedServicer(
        BlockSets(ctx.loop, ctx.registration), ctx.config.model_id, ctx.telemetry.metrics
    )
    ctx.registration.on_rejoin(servicer.sets.republish)
    service = (worker_pb2_grpc.add_AggregatedServicer_to_server, servicer,
               "kvmesh.worker.v1.Aggregated")  # fmt: skip
    return WorkerParts(servicer, service)


async def serve(config: WorkerConfig) -> None:
    """Run an aggregated worker until SIGTERM/SIGINT, then drain and leave the registry."""
    await serve_worker(config, aggregated_parts)
