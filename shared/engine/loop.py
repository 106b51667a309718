"""Runs an Engine on its own thread and connects it to asyncio services.

The engine is single-threaded by design. Services call into it with `call` (any function of the
engine, run between two steps on the engine thread) and receive each request's outputs on an
asyncio queue. The loop steps while there is work and sleeps on a condition when there is none.

    asyncio handlers --call(fn)--> [command queue] --engine thread: fn(engine); step()-->
    outputs --loop.call_soon_threadsafe, once a step--> per-request asyncio.Queue

Cancels: a caller may be cancelled (its client hung up) at any await. Commands run in the order
they were queued, so a caller's cleanup (`post(abort)`) runs after whatever it queued before;
a command whose caller was cancelled before it started is skipped, and one that already runs
completes with nobody to receive its result. The engine thread never settles a future the caller
has given up on (set_running_or_notify_cancel claims it first).

Death: if the engine thread itself fails, it logs the error, fails every queued and later call
with EngineDied (a later `post` does nothing), and calls `on_death` so the process can stop
serving (a registered worker whose engine is gone would wedge every request routed to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmesh.shared.engine.engine import Engine, RequestOutput
from kvmesh.shared.telemetry import KvmeshMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
OutputQueue = asyncio.Queue[RequestOutput]
Command = tuple[Callable[[Engine], Any], Future[Any] | None]  # None: posted, no result


class EngineDied(RuntimeError):
    """The engine thread stopped on an error: nothing more runs on this engine."""


@dataclass(frozen=True)
class LoopStats:
    steps: int
    busy_seconds: float
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    cached_blocks: int = 0  # blocks holding a prefix-cache hash, in use or free
    prompt_tokens: int = 0  # of requests admitted so far
    cached_tokens: int = 0  # of those, found in the prefix cache (hit rate = cached / prompt)


class EngineLoop:
    def __init__(
        self, engine: Engine, on_death: Callable[[BaseException], object] | None = None
    ) -> None:
        self.engine = engine
        self._on_death = on_death  # called on the engine thread after it failed
        self._death: BaseException | None = None
        self._commands: list[Command] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, OutputQueue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._steps = 0
        self._busy = 0.0
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread between steps; its result or exception."""
        future: Future[T] = Future()
        self._queue(fn, future)
        return await asyncio.wrap_future(future)

    def post(self, fn: Callable[[Engine], Any]) -> None:
        """Queue fn(engine) to run between steps whatever becomes of the caller: for cleanup
        (aborts) that a cancel of the caller must not lose. Its errors are logged; on a dead engine
        it does nothing."""
        with self._wake:
            if self._death is None:  # else nothing runs on this engine any more
                self._commands.append((fn, None))
                self._wake.notify()

    def _queue(self, fn: Callable[[Engine], Any], future: Future[Any]) -> None:
        with self._wake:
            if self._death is not None:
                raise EngineDied("the engine thread has stopped") from self._death
            self._commands.append((fn, future))
            self._wake.notify()

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        """A queue that receives every output of request_id (call before submitting it)."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stats(self) -> LoopStats:
        e, sched = self.engine, self.engine.scheduler
        return LoopStats(
            steps=self._steps, busy_seconds=self._busy, free_blocks=e.pool.num_free,
            total_blocks=e.pool.num_blocks, running=len(e.scheduler.running),
            waiting=len(e.scheduler.waiting), cached_blocks=e.pool.num_cached,
            prompt_tokens=sched.num_prompt_tokens, cached_tokens=sched.num_cached_tokens,
        )  # fmt: skip

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            self._die(e)

    def _die(self, error: BaseException) -> None:
        log.critical("the engine thread died; this worker cannot serve", exc_info=error)
        with self._wake:
            self._death = error
            commands, self._commands = self._commands, []
        for _, future in commands:
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(EngineDied("the engine thread has stopped"))
        if self._on_death is not None:
            self._on_death(error)

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._commands or self.engine.has_work or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            for fn, future in commands:
                self._execute(fn, future)
            if self.engine.has_work:
                self._step()

    def _execute(self, fn: Callable[[Engine], Any], future: Future[Any] | None) -> None:
        if future is None:
            try:
                fn(self.engine)
            except Exception:
                log.exception("a posted engine command failed")
            return
        if not future.set_running_or_notify_cancel():
            return  # its caller was cancelled before it ran: skip it
        try:
            result = fn(self.engine)
        except BaseException as e:  # delivered to the caller
            future.set_exception(e)
        else:
            future.set_result(result)  # RUNNING futures cannot be cancelled: never raises

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; aborting its requests")
            outputs = self.engine.abort_all()
        self._busy += time.perf_counter() - start
        self._steps += 1
        # one wake-up of each event loop a step, not one a request: every call_soon_threadsafe
        # writes the loop's self-pipe and takes the GIL the next step's launch is waiting for
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[OutputQueue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, queue = target
                deliveries.setdefault(loop, []).append((queue, out))
        for loop, items in deliveries.items():
            with contextlib.suppress(RuntimeError):  # its event loop closed: nobody listens
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[OutputQueue, RequestOutput]]) -> None:
    """On a subscriber's event loop: each output into its request's queue."""
    for queue, out in items:
        queue.put_nowait(out)


async def publish_gauges(loop: EngineLoop, metrics: KvmeshMetrics, period_s: float = 1.0) -> None:
    """Keep the KV-usage and queue gauges current (runs until cancelled)."""
    while True:
        s = loop.stats()
        metrics.set_kv_blocks(s.total_blocks - s.free_blocks, s.free_blocks)
        metrics.queue_depth.set(s.waiting)
        metrics.requests_in_flight.set(s.running + s.waiting)
        await asyncio.sleep(period_s)
