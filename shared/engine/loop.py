"""Runs an Engine on its own thread and connects it to asyncio services.

The engine is single-threaded by design. Services call into it with `call` (any function of the
engine, run between two steps on the engine thread) and receive each request's outputs on an
asyncio queue. The loop steps while there is work and sleeps on a condition when there is none.

    asyncio handlers --call(fn)--> [command queue] --engine thread: fn(engine); step()-->
    outputs --loop.call_soon_threadsafe--> per-request asyncio.Queue
"""

from __future__ import annotations

import asyncio
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


@dataclass(frozen=True)
class LoopStats:
    steps: int
    busy_seconds: float
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: list[tuple[Callable[[Engine], Any], Future[Any]]] = []
        self._streams: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]
        ] = {}
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
        with self._wake:
            self._commands.append((fn, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def subscribe(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        """A queue that receives every output of request_id (call before submitting it)."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def unsubscribe(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def stats(self) -> LoopStats:
        e = self.engine
        return LoopStats(
            steps=self._steps, busy_seconds=self._busy, free_blocks=e.pool.num_free,
            total_blocks=e.pool.num_blocks, running=len(e.scheduler.running),
            waiting=len(e.scheduler.waiting),
        )  # fmt: skip

    def _run(self) -> None:
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

    def _execute(self, fn: Callable[[Engine], Any], future: Future[Any]) -> None:
        try:
            future.set_result(fn(self.engine))
        except BaseException as e:  # delivered to the caller
            future.set_exception(e)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; aborting its requests")
            outputs = self.engine.abort_all()
        self._busy += time.perf_counter() - start
        self._steps += 1
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, queue = target
                loop.call_soon_threadsafe(queue.put_nowait, out)


async def publish_gauges(loop: EngineLoop, metrics: KvmeshMetrics, period_s: float = 1.0) -> None:
    """Keep the KV-usage and queue gauges current (runs until cancelled)."""
    while True:
        s = loop.stats()
        metrics.set_kv_blocks(s.total_blocks - s.free_blocks, s.free_blocks)
        metrics.queue_depth.set(s.waiting)
        metrics.requests_in_flight.set(s.running + s.waiting)
        await asyncio.sleep(period_s)
