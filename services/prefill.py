"""Prefill service: computes prompts in batches (chunked under the token budget), pushes each
layer's KV to the decode worker that reserved blocks for it as soon as the layer is written, and
returns the first sampled token.

    Prefill -> open a data-plane channel to the reserved blocks -> engine step(s): after layer l
    of the prompt's last chunk, gather its blocks of layer l and send -> first token sampled ->
    wait for the receiver's ACK (all layers, checksums verified) -> respond
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from opentelemetry import trace

from kvmesh.protos import worker_pb2, worker_pb2_grpc
from kvmesh.services.rpc import abort
from kvmesh.services.tls import sync_channel
from kvmesh.services.worker.process import WorkerContext, WorkerParts, serve_worker
from kvmesh.services.worker.registration import (
    WorkerConfig,
    checked_request,
    inspect,
    kv_layout,
    model_response,
)
from kvmesh.shared.engine.engine import RequestError
from kvmesh.shared.engine.kv_cache import blocks_for
from kvmesh.shared.engine.loop import EngineLoop
from kvmesh.shared.engine.sequence import FinishReason
from kvmesh.shared.handoff import (
    AutoKVSender,
    HandoffError,
    KVPusher,
    KVSendChannel,
    KVSender,
    layer_nbytes,
)
from kvmesh.shared.telemetry import KvmeshMetrics
from kvmesh.shared.telemetry.handoff import HandoffRecorder, start_handoff_span

log = logging.getLogger(__name__)

HANDOFF_TIMEOUT_S = 30.0


class PrefillServicer(worker_pb2_grpc.PrefillServicer):
    def __init__(
        self, loop: EngineLoop, sender: KVSender, model_id: str, metrics: KvmeshMetrics,
        tracer: trace.Tracer, worker_id: str,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.sender = sender
        self.model_id = model_id
        self.metrics = metrics
        self.tracer = tracer
        self.pusher = KVPusher(loop.engine)
        loop.engine.export_hook = self.pusher
        self.draining = False
        self.active = 0
        self._handoffs: set[asyncio.Task[None]] = set()  # pushes still waiting for their ACK
        self.worker_id = worker_id

    async def Model(self, request, context):  # noqa: N802 (gRPC method name)
        return model_response(self.loop.engine, self.model_id)

    async def Inspect(self, request, context):  # noqa: N802
        return await inspect(self.loop, self.worker_id, 0)

    async def Prefill(self, request, context):  # noqa: N802
        if self.draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "this prefill worker is draining")
        if request.layout != kv_layout(self.loop.engine):
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"KV layout mismatch: decode has {request.layout}, prefill has "
                f"{kv_layout(self.loop.engine)}",
            )
        prompt, params = await checked_request(self.loop.engine, request, context)
        self.active += 1
        try:
            return await self._prefill(request, prompt, params, context)
        finally:
            self.active -= 1

    async def _prefill(self, request, prompt, params, context):
        """Compute the prompt and answer with the first token as soon as it is sampled; the
        KV push (queued layer by layer during the computation) completes in the background,
        and decode verifies it before decoding (a failed push reaches the gateway as ABORTED
        from Decode, and the gateway retries elsewhere)."""
        hid = request.handoff_id
        engine = self.loop.engine
        layers = engine.model_config.num_layers
        opening = asyncio.ensure_future(
            asyncio.to_thread(
                self.sender.open, request.kv_endpoint, hid, layers, request.decode_address
            )
        )
        try:
            channel = await asyncio.shield(opening)
        except (HandoffError, ValueError) as e:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"cannot reach the decode KV: {e}")
        except asyncio.CancelledError:  # the channel still opens on its thread: abort it then
            opening.add_done_callback(_abort_opened)
            raise
        transport = getattr(channel, "transport", "socket")
        recorder = start_handoff_span(self.tracer, transport, request_id=request.request_id)
        self.pusher.register(hid, channel)
        queue = self.loop.subscribe(hid)
        out = None
        try:
            await self.loop.call(lambda e: e.add_request(hid, prompt, params))
            out = await queue.get()  # every layer was queued on the channel during that step
        except RequestError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            self.pusher.unregister(hid)
            self.loop.unsubscribe(hid)
            if out is None or not out.new_token_ids:  # cancelled, or failed in the engine
                channel.abort("prefill cancelled")
                recorder.end(RuntimeError("prefill cancelled"))
                # posted: runs after the add_request above (if it ran), even if this is cancelled
                self.loop.post(lambda e: e.abort(hid))
        if not out.new_token_ids:  # a failed engine step aborted it
            await abort(context, grpc.StatusCode.INTERNAL, "the prefill engine failed this request")
        task = asyncio.create_task(self._complete_handoff(channel, recorder, layers))
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)
        self.metrics.queue_time.observe(out.queue_seconds)
        rpc_span = trace.get_current_span()
        rpc_span.set_attribute("kvmesh.prompt_tokens", len(prompt))
        rpc_span.set_attribute("kvmesh.queue_seconds", out.queue_seconds)
        rpc_span.set_attribute("kvmesh.batch_size", out.step_batch_size)
        reason = out.finish_reason
        kv_bytes = layers * layer_nbytes(engine, blocks_for(len(prompt), engine.config.block_size))
        return worker_pb2.PrefillResponse(
            first_token=out.new_token_ids[0], text=out.text,
            finish_reason="" if reason in (None, FinishReason.HANDOFF) else reason.value,
            kv_bytes=kv_bytes,
        )  # fmt: skip

    async def _complete_handoff(
        self, channel: KVSendChannel, recorder: HandoffRecorder, layers: int
    ) -> None:
        """Wait for the receiver's ACK; record the transfer on the span and the metrics."""
        try:
            stats = await asyncio.to_thread(channel.finish, HANDOFF_TIMEOUT_S)
        except HandoffError as e:
            log.warning("KV handoff failed after the first token: %s", e)
            recorder.end(e)
            return
        for layer, seconds in enumerate(stats.layer_seconds):
            recorder.layer_done(layer, stats.nbytes // max(layers, 1), seconds)
        recorder.end()
        self.metrics.observe_handoff(stats.nbytes, stats.seconds)

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._handoffs


def _abort_opened(opening: asyncio.Future[KVSendChannel]) -> None:
    """Abort a channel that finished opening after its Prefill call was cancelled."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().abort("prefill cancelled")


def prefill_parts(ctx: WorkerContext) -> WorkerParts:
    """The prefill role: a KV sender (NCCL to decode workers that offer it) and the servicer."""
    tls = ctx.config.tls
    sender = AutoKVSender(ctx.loop.engine.device, ctx.registration.worker_id,
                          connect=lambda address: sync_channel(address, tls))  # fmt: skip
    servicer = PrefillServicer(
        ctx.loop, sender, ctx.config.model_id, ctx.telemetry.metrics,
        ctx.telemetry.tracing.tracer, ctx.registration.worker_id,
    )  # fmt: skip
    service = (worker_pb2_grpc.add_PrefillServicer_to_server, servicer, "kvmesh.worker.v1.Prefill")
    return WorkerParts(servicer, service, close=sender.close)


async def serve(config: WorkerConfig) -> None:
    """Run a prefill worker until SIGTERM/SIGINT, then drain and leave the registry."""
    await serve_worker(config, prefill_parts)
