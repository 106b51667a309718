"""The gateway's view of the worker pools: live workers from the Redis registry, one gRPC channel
per worker, and the routing policy.

    target:  where a request decodes: an aggregated worker (both phases, no handoff), or a
             decode worker when a prefill worker can pair with it; the most free KV (fraction
             of its blocks, minus what this gateway reserved since the last refresh), then the
             fewest sequences (running, and queued: an aggregated worker's prompts waiting)
    prefill: shortest expected wait: queued requests + prefills this gateway has outstanding
A worker that failed a call is skipped for a few seconds (the registry drops it once its
heartbeat lapses). With TLS, a worker joins the view only once a health check over mutual TLS
succeeded: anyone who can write the registry can announce an address, but only a process with a
certificate of the mesh's CA is routed to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.protos import worker_pb2_grpc
from kvmesh.services.rpc import channel
from kvmesh.services.tls import PLAINTEXT, TlsFiles
from kvmesh.shared.control.ledger import Ledger, WorkerInfo

log = logging.getLogger(__name__)
SUSPECT_S = 5.0
VERIFY_TIMEOUT_S = 3.0  # a new worker's health check over mutual TLS
RETIRE_GRACE_S = 120.0  # a departed worker's streams may run this long (its drain + grace)
REFRESH_WAIT_S = 0.2  # between reads of a registry that is unreachable or empty
ABSENT_S = 30.0  # a worker away from the registry this long has its channel closed


_STUBS = {
    "prefill": worker_pb2_grpc.PrefillStub,
    "decode": worker_pb2_grpc.DecodeStub,
    "aggregated": worker_pb2_grpc.AggregatedStub,
}


@dataclass
class WorkerStub:
    """A worker as the gateway calls it: its registry entry and a stub on its channel."""

    info: WorkerInfo
    stub: Any  # PrefillStub, DecodeStub or AggregatedStub, after info.role


class Directory:
    def __init__(
        self, ledger: Ledger, interceptors: Sequence[Any] = (), tls: TlsFiles = PLAINTEXT
    ) -> None:
        self.ledger = ledger
        self._interceptors = interceptors
        self._tls = tls
        self._verified: set[tuple[str, str]] = set()  # (worker id, address) that passed mTLS
        self._workers: dict[str, WorkerInfo] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._absent: dict[str, float] = {}  # address -> when its worker left the registry
        self._retiring: set[asyncio.Task[None]] = set()  # channels closing after their calls
        self._suspect: dict[str, float] = {}
        self._reserved: dict[str, int] = defaultdict(int)  # blocks reserved since refresh
        self.outstanding: dict[str, int] = defaultdict(int)  # prefills in flight, per worker

    async def refresh(self) -> None:
        live = {w.worker_id: w for w in await self.ledger.workers()}
        if self._tls.enabled:
            live = await self._verify(live)
        now, listed = time.monotonic(), {w.address for w in live.values()}
        for address in listed:
            self._absent.pop(address, None)
        for gone in set(self._channels) - listed:
            # a worker leaves the registry when it starts draining, and every worker vanishes
            # from it for a heartbeat when Redis restarts empty: its channel closes (after its
            # calls, which a close would cancel) only once it stayed away ABSENT_S, since a
            # request may still start calls to it (a release, its decode stream)
            since = self._absent.setdefault(gone, now)
            if now - since >= ABSENT_S:
                del self._absent[gone]
                self._retire(self._channels.pop(gone))
        self._workers = live
        self._reserved.clear()

    async def refresh_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Refresh the view once, and again until ready() for up to timeout_s while the
        registry cannot be read or lists no worker at all (Redis restarting: the workers
        register again within a heartbeat)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self.refresh()
            except Exception as e:
                log.warning("the registry cannot be read: %s", e)
            else:
                if ready() or self._workers:
                    return
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(REFRESH_WAIT_S)

    async def run(self, period_s: float = 0.5) -> None:
        """Refresh the view and reap dead owners' blocks, until cancelled."""
        while True:
            with contextlib.suppress(Exception):
                await self.refresh()
                await self.ledger.reap()
            await asyncio.sleep(period_s)

    def models(self) -> set[str]:
        return {w.model for w in self._workers.values()}

    def workers(self, role: str) -> list[WorkerInfo]:
        return [w for w in self._workers.values() if w.role == role]

    def pick_target(self, model: str, exclude: set[str]) -> WorkerStub | None:
        """An aggregated worker, or a decode worker (pair it with pick_prefill) when a prefill
        worker is available: whichever has the most free KV, then the fewest sequences."""
        roles = ["aggregated"]
        if self._candidates("prefill", model, exclude):
            roles.append("decode")
        return self._most_free([w for r in roles for w in self._candidates(r, model, exclude)])

    def pick_prefill(self, model: str, exclude: set[str]) -> WorkerStub | None:
        candidates = self._candidates("prefill", model, exclude)
        if not candidates:
            return None
        best = min(
            candidates, key=lambda w: (w.queue_depth + self.outstanding[w.worker_id], w.running)
        )
        return self._worker(best)

    def any_worker(self, model: str) -> WorkerStub | None:
        """A live worker of model, of any role (they all answer Model and Inspect)."""
        candidates = [w for r in _STUBS for w in self._candidates(r, model, set())]
        return self._worker(candidates[0]) if candidates else None

    def note_reserved(self, worker_id: str, blocks: int) -> None:
        self._reserved[worker_id] += blocks

    def mark_suspect(self, worker_id: str) -> None:
        self._suspect[worker_id] = time.monotonic() + SUSPECT_S

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        for task in list(self._retiring):
            task.cancel()

    async def _verify(self, live: dict[str, WorkerInfo]) -> dict[str, WorkerInfo]:
        """The workers of `live` that answered a health check over mutual TLS (once each); one
        that did not is tried again after SUSPECT_S."""
        now = time.monotonic()
        new = [
            w for w in live.values()
            if (w.worker_id, w.address) not in self._verified
            and self._suspect.get(w.worker_id, 0.0) < now
        ]  # fmt: skip
        for w, ok in zip(new, await asyncio.gather(*map(self._handshake, new)), strict=True):
            if ok:
                self._verified.add((w.worker_id, w.address))
            else:
                self.mark_suspect(w.worker_id)
        self._verified &= {(w.worker_id, w.address) for w in live.values()}
        return {k: w for k, w in live.items() if (k, w.address) in self._verified}

    async def _handshake(self, info: WorkerInfo) -> bool:
        ch = self._worker_channel(info.address)
        try:
            await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=VERIFY_TIMEOUT_S
            )
            return True
        except grpc.aio.AioRpcError as e:
            log.warning("worker %s at %s refused: %s: %s (not routed to)", info.worker_id,
                        info.address, e.code().name, e.details())  # fmt: skip
            if self._channels.get(info.address) is ch:
                self._retire(self._channels.pop(info.address))
            return False

    def _worker_channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = channel(address, self._interceptors, self._tls)
        return ch

    def _retire(self, ch: grpc.aio.Channel) -> None:
        """Close ch once its in-flight calls end (at most RETIRE_GRACE_S), without waiting."""
        task = asyncio.ensure_future(ch.close(grace=RETIRE_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _candidates(self, role: str, model: str, exclude: set[str]) -> list[WorkerInfo]:
        now = time.monotonic()
        return [
            w for w in self._workers.values()
            if w.role == role and w.model == model and w.worker_id not in exclude
            and self._suspect.get(w.worker_id, 0.0) < now
        ]  # fmt: skip

    def _most_free(self, candidates: list[WorkerInfo]) -> WorkerStub | None:
        def score(w: WorkerInfo) -> tuple[float, int]:
            free = w.free_blocks - self._reserved[w.worker_id]
            return (-free / max(w.total_blocks, 1), w.running + w.queue_depth)

        return self._worker(min(candidates, key=score)) if candidates else None

    def _worker(self, info: WorkerInfo) -> WorkerStub:
        return WorkerStub(info, _STUBS[info.role](self._worker_channel(info.address)))
