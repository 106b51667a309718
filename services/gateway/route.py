"""One request's way through the mesh, with retries.

    target (directory.pick_target): an aggregated worker, or a decode worker to pair
    pair:       reserve KV on the decode worker -> prefill on a prefill worker (pushes the KV,
                returns the first token) -> stream the first token -> stream decode's tokens
    aggregated: stream the worker's tokens, the first one included

A target without room for the prompt's KV now (RESOURCE_EXHAUSTED, nothing streamed) is asked
again, or another one is, after a pause, until the deadline. A failed reservation, prefill,
handoff or stream (a worker killed mid-stream included) is retried on other workers and the
client never sees it: the retry resumes the request where the client's stream stands, its
prompt followed by every token already sent (re-prefilled), max_tokens less those, and the
worker told how many of the prompt's tokens are output (Sampling.output_offset: the seeded
random stream and the stop-string search go on after them) and how much of their text was sent
(text_offset). No token is sent twice or lost; greedy and seeded output equal an undisturbed run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace

from kvmesh.protos import gateway_pb2, worker_pb2
from kvmesh.services.gateway.directory import Directory, WorkerStub
from kvmesh.shared.control.connect import redis_wait_s

log = logging.getLogger(__name__)
Code = grpc.StatusCode
FULL_PAUSE_S = 0.05  # before asking again for KV: blocks free up as sequences finish


class RequestFailed(Exception):
    """The request ends with this gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Retry(Exception):
    """This attempt failed in a way another worker pair may not."""


class Full(Exception):
    """The target has no room for the prompt's KV now (nothing was streamed)."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


@dataclass
class Progress:
    """What has reached the client so far; retries resume after it."""

    emitted: list[int] = field(default_factory=list)  # token ids sent to the client
    text_chars: int = 0  # characters of text sent
    first_token_at: float = 0.0  # time.perf_counter()
    resumes: int = 0  # attempts that resumed a stream another worker had begun
    kv_bytes: int = 0  # KV pushed by prefill, all attempts
    prefill_worker: str = ""
    decode_worker: str = ""

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata telling the client how its request was served."""
        return (
            ("kvmesh-kv-bytes", str(self.kv_bytes)),
            ("kvmesh-prefill-worker", self.prefill_worker),
            ("kvmesh-decode-worker", self.decode_worker),
            ("kvmesh-resumes", str(self.resumes)),
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
    block_size: int = 0  # tokens per KV block on the model's workers; 0: unknown
    progress: Progress = field(default_factory=Progress)
    tried: set[str] = field(default_factory=set)  # workers that failed this request
    # the current attempt's request: the prompt with what the client has already, the rest of
    # max_tokens (`_resume`)
    _prompt: list[int] = field(default_factory=list)
    _sampling: worker_pb2.Sampling = field(default_factory=worker_pb2.Sampling)

    async def stream(self) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
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

    def _resume(self) -> bool:
        """Set this attempt's prompt and sampling from what reached the client; False if there
        is nothing left to generate."""
        done = self.progress.emitted
        self._prompt, self._sampling = self.prompt + done, worker_pb2.Sampling()
        self._sampling.CopyFrom(self.sampling)
        if done:
            self.progress.resumes += 1
            self._sampling.max_tokens = self.sampling.max_tokens - len(done)
            self._sampling.output_offset = len(done)
            self._sampling.text_offset = self.progress.text_chars
        return self._sampling.max_tokens > 0

    async def _attempt(self) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        deadline = time.monotonic() + (self.context.time_remaining() or 60.0)
        if not self._resume():  # the last token went out, its ending did not
            yield self._response(finish_reason="length")
            return
        while True:
            target = await self._pick("target")
            if self.block_size:  # counted now: the requests that come next see it
                blocks = -(-len(self._prompt) // self.block_size)
                self.directory.note_reserved(target.info.worker_id, blocks)
            aggregated = target.info.role == "aggregated"
            stream = self._aggregated(target) if aggregated else self._pair(target)
            try:
                async with contextlib.aclosing(stream):
                    async for response in stream:
                        yield response
                return
            except Full as e:
                if time.monotonic() >= deadline:
                    raise self._retry(target, e.error, suspect=True) from e
                await asyncio.sleep(FULL_PAUSE_S)

    async def _aggregated(
        self, worker: WorkerStub
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        wid = worker.info.worker_id
        self.progress.prefill_worker = self.progress.decode_worker = wid
        request = worker_pb2.AggregatedRequest(
            request_id=self.request_id, prompt_token_ids=self._prompt, sampling=self._sampling
        )
        stream = self._relay(worker, worker.stub.Generate, request, first_included=True)
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response

    async def _pair(self, decode: WorkerStub) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        reservation = await self._reserve(decode)
        settled = False  # decode's stream ended: decode has freed the blocks itself
        try:
            first = await self._prefill(decode, reservation)
            self.progress.kv_bytes += first.kv_bytes
            self.progress.decode_worker = decode.info.worker_id
            yield self._sent([first.first_token], first.text)
            if first.finish_reason:
                yield self._response(finish_reason=first.finish_reason)
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

    async def _reserve(self, decode: WorkerStub) -> worker_pb2.ReserveResponse:
        request = worker_pb2.ReserveRequest(
            request_id=self.request_id, handoff_id=str(uuid.uuid4()),
            prompt_token_ids=self._prompt, sampling=self._sampling,
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
            if e.code() == Code.RESOURCE_EXHAUSTED:
                raise Full(e) from e
            raise self._retry(decode, e, suspect=True) from e
        return reservation

    async def _prefill(
        self, decode: WorkerStub, reservation: worker_pb2.ReserveResponse
    ) -> worker_pb2.PrefillResponse:
        prefill = await self._pick("prefill")
        wid = prefill.info.worker_id
        self.progress.prefill_worker = wid
        self.directory.outstanding[wid] += 1
        call = prefill.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=self.request_id, prompt_token_ids=self._prompt,
                sampling=self._sampling, handoff_id=reservation.handoff_id,
                kv_endpoint=reservation.kv_endpoint, layout=reservation.layout,
                decode_address=decode.info.address,
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

    def _decode(
        self, decode: WorkerStub, handoff_id: str, first: worker_pb2.PrefillResponse
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        request = worker_pb2.DecodeRequest(
            request_id=self.request_id, handoff_id=handoff_id, prompt_token_ids=self._prompt,
            first_token=first.first_token, sampling=self._sampling,
        )  # fmt: skip
        return self._relay(decode, decode.stub.Decode, request, first_included=False)

    async def _relay(
        self, worker: WorkerStub, method: Any, request: Any, first_included: bool
    ) -> AsyncGenerator[gateway_pb2.GenerateResponse, None]:
        """Relay a worker's stream of DecodeResponses to the client. first_included: the stream
        begins with the attempt's first token (aggregated workers; RESOURCE_EXHAUSTED before it:
        the worker had no room)."""
        call = method(request, timeout=self._timeout())
        pending_first = first_included
        try:
            async for msg in call:
                pending_first = pending_first and not msg.token_ids
                if msg.token_ids or msg.text or msg.finish_reason:
                    yield self._sent(list(msg.token_ids), msg.text, msg.finish_reason)
        except grpc.aio.AioRpcError as e:
            if pending_first and e.code() == Code.RESOURCE_EXHAUSTED:
                raise Full(e) from e
            raise self._stream_failed(worker, e) from e
        finally:
            call.cancel()

    def _sent(
        self, tokens: list[int], text: str, finish_reason: str = ""
    ) -> gateway_pb2.GenerateResponse:  # fmt: skip
        """A message for the client, its tokens and text recorded as sent."""
        progress = self.progress
        if tokens and not progress.emitted:
            progress.first_token_at = time.perf_counter()
        progress.emitted += tokens
        progress.text_chars += len(text)
        return self._response(token_ids=tokens, text=text, finish_reason=finish_reason)

    def _stream_failed(self, worker: WorkerStub, error: grpc.aio.AioRpcError) -> Exception:
        code = error.code()
        if code in (Code.ABORTED, Code.UNAVAILABLE, Code.NOT_FOUND):  # resumed elsewhere
            return self._retry(worker, error, suspect=code == Code.UNAVAILABLE)
        return RequestFailed(code, error.details() or code.name.lower())

    async def _pick(self, role: str) -> WorkerStub:
        pick = self.directory.pick_target if role == "target" else self.directory.pick_prefill
        worker = pick(self.model, self.tried)
        if worker is None:  # one may have joined since the last refresh
            await self.directory.refresh_until(
                lambda: pick(self.model, self.tried) is not None,
                min(redis_wait_s(), self._timeout() or redis_wait_s()),
            )
            worker = pick(self.model, self.tried)
        if worker is None:
            what = (
                "aggregated worker or prefill/decode pair" if role == "target" else f"{role} worker"
            )
            raise Retry(f"no {what} is available")
        return worker

    def _retry(self, worker: WorkerStub, error: grpc.aio.AioRpcError, suspect: bool) -> Retry:
        self.tried.add(worker.info.worker_id)
        if suspect:
            self.directory.mark_suspect(worker.info.worker_id)
        return Retry(f"{worker.info.role} {worker.info.worker_id}: {error.details()}")

    def _timeout(self) -> float | None:
        return self.context.time_remaining()

    def _response(
        self, token_ids: list[int] | None = None, text: str = "", finish_reason: str = ""
    ) -> gateway_pb2.GenerateResponse:  # fmt: skip
        response = gateway_pb2.GenerateResponse(
            request_id=self.request_id, token_ids=token_ids or [], text=text,
            finish_reason=finish_reason,
        )  # fmt: skip
        if finish_reason:  # usage goes on the last message only
            response.usage.prompt_tokens = len(self.prompt)
            response.usage.completion_tokens = len(self.progress.emitted)
        return response


async def _release(decode: WorkerStub, handoff_id: str) -> None:
    request = worker_pb2.ReleaseRequest(handoff_id=handoff_id)
    # shielded: this runs while a cancelled request unwinds, and must still reach decode
    with contextlib.suppress(Exception):
        await asyncio.shield(decode.stub.Release(request, timeout=5))
