"""What worker processes (prefill, decode, aggregated) share: the engine on its thread, the
Redis registration with a heartbeat that advertises capacity, the model description the
gateway asks for, and the checks of a request's prompt and sampling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as redis

from kvmesh.protos import worker_pb2
from kvmesh.services.rpc import abort
from kvmesh.services.tls import PLAINTEXT, TlsFiles
from kvmesh.shared.control.ledger import Ledger, WorkerInfo
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.kv_scales import scales_digest
from kvmesh.shared.engine.loop import EngineLoop
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.fetch import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineConfig
    redis_url: str
    host: str = "0.0.0.0"  # bind address of the gRPC server and the KV receiver
    port: int = 0  # 0 = any free port
    advertise_host: str = ""  # address others reach this worker at; default: hostname's IP
    worker_id: str = ""  # default: role-hostname-pid-random
    heartbeat_s: float = 1.0
    reservation_ttl_s: float = 30.0  # a reservation unused this long is released
    metrics_port: int = -1  # Prometheus endpoint; -1 = off, 0 = any free port
    drain_timeout_s: float = 30.0
    tls: TlsFiles = PLAINTEXT  # mutual TLS with the gateway and the other workers

    @property
    def model_id(self) -> str:
        return self.engine.model or DEFAULT_MODEL

    def resolved_worker_id(self) -> str:
        if self.worker_id:
            return self.worker_id
        return (
            f"{self.engine.role.value}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )

    def resolved_advertise_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.host not in ("0.0.0.0", "::", ""):
            return self.host
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


def sampling_from_proto(s: worker_pb2.Sampling) -> SamplingParams:
    """SamplingParams from the wire (ValueError if out of range); top_p 0 means off."""
    return SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k, seed=s.seed, stop=tuple(s.stop), ignore_eos=s.ignore_eos,
        output_offset=s.output_offset, text_offset=s.text_offset,
    )  # fmt: skip


async def checked_request(
    engine: Engine, request: Any, context: grpc.aio.ServicerContext
) -> tuple[list[int], SamplingParams]:
    """A request's prompt and sampling (it has `prompt_token_ids` and `sampling`), or
    INVALID_ARGUMENT where this engine cannot serve them as asked."""
    prompt = list(request.prompt_token_ids)
    try:
        params = sampling_from_proto(request.sampling)
        engine.validate(prompt, params)
    except ValueError as e:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    return prompt, params


def kv_layout(engine: Engine) -> worker_pb2.KVLayout:
    cfg = engine.model_config
    return worker_pb2.KVLayout(
        num_layers=cfg.num_layers, block_size=engine.config.block_size,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        dtype=str(engine.kv_dtype).removeprefix("torch."),
        kv_scales=scales_digest(engine.model.kv_scales),
    )  # fmt: skip


def model_response(engine: Engine, model_id: str) -> worker_pb2.ModelResponse:
    return worker_pb2.ModelResponse(
        model=model_id, context_length=engine.max_model_len,
        max_tokens_limit=engine.config.max_tokens_limit, layout=kv_layout(engine),
    )  # fmt: skip


async def inspect(
    loop: EngineLoop, worker_id: str, reservations: int
) -> worker_pb2.InspectResponse:
    """The engine's state and integrity check, taken between two steps."""

    def check(engine: Engine) -> str:
        try:
            engine.check_integrity()
        except AssertionError as e:
            return str(e) or "integrity check failed"
        return ""

    error = await loop.call(check)
    s = loop.stats()
    return worker_pb2.InspectResponse(
        worker_id=worker_id, free_blocks=s.free_blocks, total_blocks=s.total_blocks,
        running=s.running, waiting=s.waiting, reservations=reservations,
        integrity_ok=not error, integrity_error=error,
    )  # fmt: skip


class Registration:
    """A worker's record in Redis, kept alive by a heartbeat task carrying its capacity."""

    def __init__(self, config: WorkerConfig, loop: EngineLoop) -> None:
        self.config = config
        self.worker_id = config.resolved_worker_id()
        self.redis = redis.from_url(config.redis_url)
        self.ledger = Ledger(self.redis, heartbeat_ttl_s=3 * config.heartbeat_s)
        self._loop = loop
        self._info = WorkerInfo(
            worker_id=self.worker_id, role=config.engine.role.value, address="",
            kv_endpoint="", model=config.model_id,
            total_blocks=loop.engine.pool.num_blocks, free_blocks=loop.engine.pool.num_free,
        )  # fmt: skip
        self.generation = 0
        self._task: asyncio.Task[None] | None = None
        # run after the registry lost this worker's record and it registered again (Redis
        # restarted empty, or the worker was fenced), and after Redis came back from an outage
        self._rejoin: list[Callable[[], Awaitable[None]]] = []
        self._confirming = asyncio.Lock()

    def on_rejoin(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run hook() whenever the registry may have lost what this worker recorded there."""
        self._rejoin.append(hook)

    async def start(self, address: str, kv_endpoint: str) -> None:
        """Register as reachable at address (host:port of the gRPC server), with its KV
        data-plane endpoint (may be empty), and heartbeat."""
        self._info = dataclasses.replace(self._info, address=address, kv_endpoint=kv_endpoint)
        self.generation = await self.ledger.register(self._info)
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.ledger.deregister(self.worker_id, self.generation)
        await self.redis.aclose()

    async def _beat(self) -> None:
        unsure = False  # a heartbeat failed: what this worker recorded may be lost
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                await self.confirm(rejoin=unsure)
                unsure = False
            except Exception as e:  # Redis unreachable: keep serving, retry
                unsure = True
                log.warning("heartbeat failed: %s", e)

    async def confirm(self, rejoin: bool = False) -> None:
        """Heartbeat now; if the registry has no live record of this worker (Redis restarted
        empty, or the worker was fenced), register again. Either way, or with `rejoin`, run the
        rejoin hooks. Also called when a write fenced by the generation was refused."""
        async with self._confirming:  # one registration at a time: each makes a generation
            s = self._loop.stats()
            alive = await self.ledger.heartbeat(
                self.worker_id, self.generation, s.free_blocks, s.total_blocks, s.waiting,
                s.running,
            )  # fmt: skip
            if not alive:
                log.warning("the registry has no live record of this worker (Redis restarted, "
                            "or it was fenced); registering again")  # fmt: skip
                self.generation = await self.ledger.register(self._info)
            if rejoin or not alive:
                for hook in self._rejoin:
                    await hook()
