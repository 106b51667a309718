"""What decode and aggregated workers share: a request's block set, owned in Redis and freed
whatever ends the request, and the stream of its tokens out of the engine.

    reserve (Redis `reserved`) -> stream: subscribe -> submit (commit the received KV, or add
    the prompt) -> `owned` -> a DecodeResponse per output (those queued behind the
    engine joined into one) until finished -> free
    free: abort in the engine (a no-op once finished) and release the set in Redis; a cancel of
    the caller (its client hung up) stops neither (ARCHITECTURE.md invariant 8)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from opentelemetry import trace

from kvmesh.protos import worker_pb2
from kvmesh.services.worker.registration import Registration
from kvmesh.shared.control.connect import patiently, redis_wait_s
from kvmesh.shared.control.ledger import OWNED, RESERVED
from kvmesh.shared.engine.engine import Engine, RequestOutput
from kvmesh.shared.engine.loop import EngineLoop

log = logging.getLogger(__name__)
# Lease of a block set in Redis; the heartbeat renews it every second, so it only runs out
# (and the reaper frees the set) when this worker stops heartbeating.
BLOCK_LEASE_S = 10.0


def merged(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one (the later's counts and ending)."""
    return dataclasses.replace(
        later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
        text=earlier.text + later.text,
    )  # fmt: skip


class BlockSets:
    """This worker's requests' blocks: their sets in Redis, their streams, their freeing."""

    def __init__(
        self, loop: EngineLoop, registration: Registration,
        cancel: Callable[[str], None] = lambda hid: None,
    ) -> None:  # fmt: skip
        self.loop = loop
        self.registration = registration
        self._cancel = cancel  # what else holds a request's blocks (decode: its KV receiver)
        self._frees: set[asyncio.Task[None]] = set()  # Redis releases still running
        self._held: dict[str, tuple[int, str]] = {}  # hid -> (blocks, state): the sets held

    @property
    def freeing(self) -> bool:
        return bool(self._frees)

    async def reserve(self, hid: str, num_blocks: int) -> bool:
        """Record hid's blocks as this worker's (state `reserved`); False if the registry
        refused (this worker's registration was fenced). While Redis cannot be reached it asks
        again for up to redis_wait_s() (then raises)."""
        reg = self.registration

        async def record() -> bool:
            return await reg.ledger.reserve(
                reg.worker_id, reg.generation, hid, num_blocks, "", BLOCK_LEASE_S
            )

        ok = await patiently(record, redis_wait_s())
        if not ok:  # refused: the registry may have lost this worker's record; it is checked
            await reg.confirm()
            ok = await record()
        if ok:
            self._held[hid] = (num_blocks, RESERVED)
        return ok

    async def republish(self) -> None:
        """Make the registry's record of this worker's sets exact again, after it may have lost
        them (Redis restarted empty, the worker was fenced, or writes failed while Redis was
        away): record every set still held under the current generation, and release every
        set recorded for this worker that it no longer holds."""
        reg = self.registration
        recorded = (await reg.ledger.snapshot())["block_sets"].get(reg.worker_id, [])
        for stale in {s["handoff_id"] for s in recorded} - set(self._held):
            await reg.ledger.release(reg.worker_id, reg.generation, stale)
        for hid, (blocks, state) in list(self._held.items()):
            await reg.ledger.release(reg.worker_id, reg.generation, hid)  # a set of old state
            await reg.ledger.reserve(reg.worker_id, reg.generation, hid, blocks, "",
                                     BLOCK_LEASE_S)  # fmt: skip
            if state == OWNED:
                await reg.ledger.transition(reg.worker_id, reg.generation, hid, OWNED)
            if hid not in self._held:  # freed meanwhile: its release may have come first
                await reg.ledger.release(reg.worker_id, reg.generation, hid)

    async def free(self, hid: str) -> None:
        """Free hid's blocks (the receiver, the engine, Redis), even if the caller is cancelled.
        The receiver's cancel may wait for a sender to stop writing hid's blocks (IPC), so it runs
        off the event loop, and the engine frees the blocks only after it returned."""
        reg = self.registration
        self._held.pop(hid, None)

        async def release() -> None:
            await asyncio.to_thread(self._cancel, hid)
            self.loop.post(lambda e: e.abort(hid))  # after anything hid's handlers queued before
            with contextlib.suppress(Exception):  # a release lost to an outage: republish's
                await patiently(
                    lambda: reg.ledger.release(reg.worker_id, reg.generation, hid),
                    redis_wait_s(),
                )

        task = asyncio.create_task(release())
        self._frees.add(task)
        task.add_done_callback(self._frees.discard)
        await asyncio.shield(task)

    async def stream(
        self, hid: str, submit: Callable[[Engine], Any],
        on_first: Callable[[RequestOutput], None] = lambda out: None,
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:  # fmt: skip
        """Run submit(engine) (it puts sequence hid on the engine), mark the set `owned` and
        stream hid's outputs until it finishes; free its blocks however the stream ends (an
        error raised by submit ends it too, and reaches the caller)."""
        queue = self.loop.subscribe(hid)
        reg = self.registration
        span = trace.get_current_span()
        joined = time.perf_counter()
        steps = 0
        try:
            await self.loop.call(submit)
            if hid in self._held:
                self._held[hid] = (self._held[hid][0], OWNED)
            try:
                await reg.ledger.transition(reg.worker_id, reg.generation, hid, OWNED)
            except Exception as e:  # Redis away: serve all the same; republish records it
                log.warning("block set %s not marked owned in Redis: %s", hid, e)
            while True:
                out = await queue.get()
                if steps == 0:
                    on_first(out)
                steps += 1
                while not out.finished and not queue.empty():  # behind the engine: one message
                    out = merged(out, queue.get_nowait())
                    steps += 1
                span.set_attribute("kvmesh.preemptions", out.num_preemptions)
                yield worker_pb2.DecodeResponse(
                    token_ids=out.new_token_ids, text=out.text,
                    finish_reason=out.finish_reason.value if out.finish_reason else "",
                    completion_tokens=out.num_output_tokens,
                )  # fmt: skip
                if out.finished:
                    break
        finally:
            span.set_attribute("kvmesh.decode_steps", steps)
            span.set_attribute("kvmesh.time_in_batch_s", time.perf_counter() - joined)
            self.loop.unsubscribe(hid)
            await self.free(hid)
