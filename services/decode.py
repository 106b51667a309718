"""Decode service: reserves KV blocks for incoming handoffs, receives the prompt's KV on the data
plane, and decodes every committed sequence in one in-flight batch, streaming tokens back.

    Reserve  -> blocks allocated, Redis block set `reserved`, receiver expects the handoff
    (prefill pushes KV layer by layer; each layer is checksummed and scattered into the blocks)
    Decode   -> all layers intact? commit (Redis `owned`), join the running batch, stream
    Release  -> give back a reservation that will not be used
    OpenKVLink -> a prefill worker's new NCCL pair: its unique id, for the NCCL receiver

Block sets in Redis, the token stream and freeing the blocks however a request ends are what
aggregated workers do too (services/worker/stream.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from kvmesh.protos import worker_pb2, worker_pb2_grpc
from kvmesh.services.rpc import abort
from kvmesh.services.worker.process import WorkerContext, WorkerParts, serve_worker
from kvmesh.services.worker.registration import (
    Registration,
    WorkerConfig,
    checked_request,
    inspect,
    kv_layout,
    model_response,
    sampling_from_proto,
)
from kvmesh.services.worker.stream import BlockSets
from kvmesh.shared.engine.engine import Engine, RequestError
from kvmesh.shared.engine.loop import EngineLoop
from kvmesh.shared.handoff import (
    HandoffResult,
    KVReceiver,
    LinkRefused,
    layer_nbytes,
    make_receiver,
    offer_link,
    scatter_into,
)
from kvmesh.shared.telemetry import KvmeshMetrics

log = logging.getLogger(__name__)


@dataclass
class _Reservation:
    handoff_id: str
    blocks: list[int]
    received: Future[HandoffResult]
    expires: float  # time.monotonic() deadline for Decode to arrive


class DecodeServicer(worker_pb2_grpc.DecodeServicer):
    def __init__(
        self, loop: EngineLoop, receiver: KVReceiver, kv_endpoint: str,
        registration: Registration, model_id: str, metrics: KvmeshMetrics,
        reservation_ttl_s: float,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.receiver = receiver
        self.kv_endpoint = kv_endpoint
        self.registration = registration
        self.model_id = model_id
        self.metrics = metrics
        self.reservation_ttl_s = reservation_ttl_s
        self.draining = False
        self._reservations: dict[str, _Reservation] = {}
        self._streams = 0
        self.sets = BlockSets(loop, registration, cancel=receiver.cancel)

    @property
    def idle(self) -> bool:
        return not self._reservations and self._streams == 0 and not self.sets.freeing

    async def Model(self, request, context):  # noqa: N802 (gRPC method name)
        return model_response(self.loop.engine, self.model_id)

    async def Inspect(self, request, context):  # noqa: N802
        reg = self.registration
        return await inspect(self.loop, reg.worker_id, len(self._reservations))

    async def Reserve(self, request, context):  # noqa: N802
        if self.draining:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "this decode worker is draining")
        prompt, params = await checked_request(self.loop.engine, request, context)
        try:
            uuid.UUID(request.handoff_id)
        except ValueError as e:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"handoff_id: {e}")
        hid = request.handoff_id
        try:
            blocks = await self.loop.call(lambda e: e.reserve(hid, len(prompt)))
        except RequestError as e:
            await abort(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
        except asyncio.CancelledError:
            self.loop.post(lambda e: e.abort(hid))  # the reserve may have run before the cancel
            raise
        if blocks is None:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no free KV blocks on this decode worker",
            )
        kept = False
        try:
            if not await self.sets.reserve(hid, len(blocks)):
                await abort(context, grpc.StatusCode.UNAVAILABLE, "block ownership was refused")
            nbytes = layer_nbytes(self.loop.engine, len(blocks))
            layers = self.loop.engine.model_config.num_layers
            on_layer = scatter_into(self.loop.engine, blocks)
            received = self.receiver.expect(hid, layers, nbytes, on_layer)
            self._reservations[hid] = _Reservation(
                hid, blocks, received, time.monotonic() + self.reservation_ttl_s
            )
            kept = True
        finally:
            if not kept:  # refused, failed or cancelled: nothing may keep the blocks
                await self.sets.free(hid)
        return worker_pb2.ReserveResponse(
            handoff_id=hid, kv_endpoint=self.kv_endpoint, num_blocks=len(blocks),
            layout=kv_layout(self.loop.engine),
        )  # fmt: skip

    async def OpenKVLink(self, request, context):  # noqa: N802
        """A prefill worker's new NCCL pair: its unique id, before the pair's HELLO names it."""
        try:
            offer_link(self.receiver, request.link_id, request.nccl_unique_id)
        except LinkRefused as e:
            await abort(context, e.code, str(e))
        log.info("NCCL link %s offered by prefill %r", request.link_id, request.prefill_worker_id)
        return worker_pb2.OpenKVLinkResponse()

    async def Release(self, request, context):  # noqa: N802
        return worker_pb2.ReleaseResponse(released=await self._release(request.handoff_id))

    async def Decode(  # noqa: N802
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        hid = request.handoff_id
        reservation = self._reservations.get(hid)
        if reservation is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no reservation {hid!r} (expired?)")
        self._streams += 1
        try:  # aclosing: a cancelled stream frees its blocks now, not when collected
            async with contextlib.aclosing(self._decode(request, reservation, context)) as stream:
                async for message in stream:
                    yield message
        finally:
            self._streams -= 1

    async def _decode(
        self, request: worker_pb2.DecodeRequest, reservation: _Reservation,
        context: grpc.aio.ServicerContext,
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:  # fmt: skip
        hid = reservation.handoff_id
        try:
            result = await self._received(reservation)
        except BaseException:  # cancelled while the KV arrived
            await self._release(hid)
            raise
        self.metrics.observe_handoff(result.nbytes, result.seconds)
        if not result.ok:
            await self._release(hid)
            # ABORTED: the gateway retries the request on another worker pair
            await abort(context, grpc.StatusCode.ABORTED, f"KV handoff failed: {result.error}")
        if self._reservations.pop(hid, None) is None:  # expired or released meanwhile
            await abort(context, grpc.StatusCode.ABORTED, "the reservation was released")
        span = trace.get_current_span()
        span.set_attribute("kvmesh.handoff_bytes", result.nbytes)
        span.set_attribute("kvmesh.handoff_receive_s", result.seconds)
        prompt = list(request.prompt_token_ids)
        params = sampling_from_proto(request.sampling)

        def commit(engine: Engine) -> None:
            engine.commit(hid, prompt, request.first_token, params)

        # the stream frees the blocks however it ends (a no-op in the engine once finished)
        async with contextlib.aclosing(self.sets.stream(hid, commit)) as stream:
            async for message in stream:
                yield message

    async def _received(self, reservation: _Reservation) -> HandoffResult:
        """The handoff's result (a failure after 30 s). Shielded: a cancelled caller must not
        cancel the receiver's future, which its thread settles (the release settles it)."""
        received = asyncio.shield(asyncio.wrap_future(reservation.received))
        try:
            return await asyncio.wait_for(received, 30)
        except TimeoutError:
            return HandoffResult(False, 0, 0.0, "timed out waiting for the KV")

    async def _release(self, hid: str) -> bool:
        reservation = self._reservations.pop(hid, None)
        if reservation is None:
            return False
        await self.sets.free(hid)
        return True

    async def expire_reservations(self) -> None:
        """Release reservations whose Decode call never came (gateway or client gone)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for hid in [h for h, r in self._reservations.items() if r.expires < now]:
                log.warning("reservation %s expired unused; releasing its blocks", hid)
                await self._release(hid)


def decode_parts(ctx: WorkerContext) -> WorkerParts:
    """The decode role: a KV receiver (IPC, NCCL on a GPU, TCP) and the servicer."""
    config = ctx.config
    host = config.resolved_advertise_host()
    engine = ctx.loop.engine
    receiver = make_receiver(engine.device, bind_host=config.host, advertise_host=host,
                             kv_cache=engine.kv_cache)  # fmt: skip
    kv_endpoint = receiver.start()  # "ipc://...,nccl://...,tcp://..." on a GPU with NCCL
    servicer = DecodeServicer(
        ctx.loop, receiver, kv_endpoint, ctx.registration, config.model_id,
        ctx.telemetry.metrics, config.reservation_ttl_s,
    )  # fmt: skip
    ctx.registration.on_rejoin(servicer.sets.republish)
    service = (worker_pb2_grpc.add_DecodeServicer_to_server, servicer, "kvmesh.worker.v1.Decode")
    return WorkerParts(servicer, service, kv_endpoint, (servicer.expire_reservations,),
                       receiver.close)  # fmt: skip


async def serve(config: WorkerConfig) -> None:
    """Run a decode worker until SIGTERM/SIGINT, then drain and leave the registry."""
    await serve_worker(config, decode_parts)
