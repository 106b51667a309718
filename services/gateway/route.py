"""One request's way through the mesh, with retries.

    reserve KV on a decode worker -> prefill on a prefill worker (pushes the KV, returns the
    first token) -> stream the first token -> stream the decode worker's tokens

A failed reservation, prefill or handoff is retried on other workers while no decode token has
reached the client, so the client never sees it; the first token is never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from kvmesh.protos import gateway_pb2, worker_pb2
from kvmesh.services.gateway.directory import Directory, WorkerStub

log = logging.getLogger(__name__)
Code = grpc.StatusCode


class RequestFailed(Exception):
    """The request ends with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Retry(Exception):
    """This attempt failed in a way another worker pair may not."""


@dataclass
class Progress:
    """What has reached the client so far; retries never repeat it."""

    sent_first: bool = False
    decode_tokens: int = 0
    first_token_at: float = 0.0  # time.perf_counter()
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


@dataclass
class Route:
    directory: Directory
    request_id: str
    model: str
    prompt: list[int]
    sampling: worker_pb2.Sampling
    context: grpc.aio.ServicerContext
    attempts: int
    progress: Progress = field(default_factory=Progress)
    tried: set[str] = field(default_factory=set)  # workers that failed this request

    async def stream(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The client's stream: tries up to `attempts` worker pairs."""
        last_error = "no worker pair was available"
        for _ in range(self.attempts):
            try:  # aclosing: a cancelled request releases its KV now, not when collected
                async with contextlib.aclosing(self._attempt()) as attempt:
                    async for response in attempt:
                        yield response
                return
            except Retry as e:
                last_error = str(e)
                log.warning("request %s: %s; retrying on other workers", self.request_id, e)
        raise RequestFailed(Code.UNAVAILABLE, f"request {self.request_id} failed: {last_error}")

    async def _attempt(self) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        decode, reservation = await self._reserve()
        settled = False  # decode's stream ended: decode has freed the blocks itself
        try:
            first = await self._prefill(decode, reservation)
            self.progress.kv_bytes += first.kv_bytes
            self.progress.decode_worker = decode.info.worker_id
            if not self.progress.sent_first:
                self.progress.sent_first = True
                self.progress.first_token_at = time.perf_counter()
                yield self._response(token_ids=[first.first_token], text=first.text)
            if first.finish_reason:
                yield self._response(finish_reason=first.finish_reason, completion_tokens=1)
                return
            stream = self._decode(decode, reservation.handoff_id, first)
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield response
            settled = True
        finally:
            # failed, cancelled at any point, or prefill finished the request: release (a no-op
            # where decode's stream already freed the blocks; where its Decode call never
            # started, the reservation would otherwise hold them until it expires)
            if not settled:
                await _release(decode, reservation.handoff_id)

    async def _reserve(self) -> tuple[WorkerStub, worker_pb2.ReserveResponse]:
        deadline = time.monotonic() + (self.context.time_remaining() or 60.0)
        while True:
            decode = await self._pick("decode")
            request = worker_pb2.ReserveRequest(
                request_id=self.request_id, handoff_id=str(uuid.uuid4()),
                prompt_token_ids=self.prompt, sampling=self.sampling,
            )  # fmt: skip
            try:
                reservation = await decode.stub.Reserve(request, timeout=self._timeout())
            except asyncio.CancelledError:  # decode may have reserved before the cancel came
                await _release(decode, request.handoff_id)
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == Code.INVALID_ARGUMENT:
                    raise RequestFailed(e.code(), e.details() or "invalid request") from e
                if e.code() == Code.DEADLINE_EXCEEDED:  # decode may have reserved all the same
                    await _release(decode, request.handoff_id)
                    raise RequestFailed(e.code(), "deadline exceeded while reserving KV") from e
                if e.code() == Code.RESOURCE_EXHAUSTED and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)  # blocks free up as sequences finish
                    continue
                raise self._retry(decode, e, suspect=True) from e
            self.directory.note_reserved(decode.info.worker_id, reservation.num_blocks)
            return decode, reservation

    async def _prefill(
        self, decode: WorkerStub, reservation: worker_pb2.ReserveResponse
    ) -> worker_pb2.PrefillResponse:
        prefill = await self._pick("prefill")
        wid = prefill.info.worker_id
        self.progress.prefill_worker = wid
        self.directory.outstanding[wid] += 1
        call = prefill.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=self.request_id, prompt_token_ids=self.prompt, sampling=self.sampling,
                handoff_id=reservation.handoff_id, kv_endpoint=reservation.kv_endpoint,
                layout=reservation.layout, decode_address=decode.info.address,
            ),
            timeout=self._timeout(),
        )  # fmt: skip
        try:
            response: worker_pb2.PrefillResponse = await call
        except grpc.aio.AioRpcError as e:
            if e.code() in (Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED):
                raise RequestFailed(e.code(), e.details() or "prefill failed") from e
            raise self._retry(prefill, e, suspect=e.code() == Code.UNAVAILABLE) from e
        finally:
            self.directory.outstanding[wid] -= 1
            call.cancel()
        trace.get_current_span().set_attribute("kvmesh.kv_bytes", response.kv_bytes)
        return response

    async def _decode(
        self, decode: WorkerStub, handoff_id: str, first: worker_pb2.PrefillResponse
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        call = decode.stub.Decode(
            worker_pb2.DecodeRequest(
                request_id=self.request_id, handoff_id=handoff_id, prompt_token_ids=self.prompt,
                first_token=first.first_token, sampling=self.sampling,
            ),
            timeout=self._timeout(),
        )  # fmt: skip
        try:
            async for msg in call:
                self.progress.decode_tokens += len(msg.token_ids)
                yield self._response(
                    token_ids=list(msg.token_ids), text=msg.text,
                    finish_reason=msg.finish_reason, completion_tokens=msg.completion_tokens,
                )  # fmt: skip
        except grpc.aio.AioRpcError as e:
            raise self._decode_failed(decode, e) from e
        finally:
            call.cancel()

    def _decode_failed(self, decode: WorkerStub, error: grpc.aio.AioRpcError) -> Exception:
        code = error.code()
        if code in (Code.CANCELLED, Code.DEADLINE_EXCEEDED):
            return RequestFailed(code, error.details() or code.name.lower())
        retryable = code in (Code.ABORTED, Code.UNAVAILABLE, Code.NOT_FOUND)
        if self.progress.decode_tokens == 0 and retryable:  # nothing of decode's reached the client
            return self._retry(decode, error, suspect=code == Code.UNAVAILABLE)
        if code == Code.UNAVAILABLE:
            self.directory.mark_suspect(decode.info.worker_id)
        return RequestFailed(
            Code.UNAVAILABLE,
            f"decode worker {decode.info.worker_id} failed mid-stream: {error.details()}",
        )

    async def _pick(self, role: str) -> WorkerStub:
        pick = self.directory.pick_decode if role == "decode" else self.directory.pick_prefill
        worker = pick(self.model, self.tried)
        if worker is None:
            await self.directory.refresh()  # one may have joined since the last refresh
            worker = pick(self.model, self.tried)
        if worker is None:
            raise Retry(f"no {role} worker is available")
        return worker

    def _retry(self, worker: WorkerStub, error: grpc.aio.AioRpcError, suspect: bool) -> Retry:
        self.tried.add(worker.info.worker_id)
        if suspect:
            self.directory.mark_suspect(worker.info.worker_id)
        return Retry(f"{worker.info.role} {worker.info.worker_id}: {error.details()}")

    def _timeout(self) -> float | None:
        return self.context.time_remaining()

    def _response(
        self, token_ids: list[int] | None = None, text: str = "", finish_reason: str = "",
        completion_tokens: int = 0,
    ) -> gateway_pb2.GenerateResponse:  # fmt: skip
        response = gateway_pb2.GenerateResponse(
            request_id=self.request_id, token_ids=token_ids or [], text=text,
            finish_reason=finish_reason,
        )  # fmt: skip
        if finish_reason:  # usage goes on the last message only
            response.usage.prompt_tokens = len(self.prompt)
            response.usage.completion_tokens = completion_tokens
        return response


async def _release(decode: WorkerStub, handoff_id: str) -> None:
    request = worker_pb2.ReleaseRequest(handoff_id=handoff_id)
    # shielded: this runs while a cancelled request unwinds, and must still reach decode
    with contextlib.suppress(Exception):
        await asyncio.shield(decode.stub.Release(request, timeout=5))
