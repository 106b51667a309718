"""The life of a worker process, shared by every role (prefill, decode, aggregated):

telemetry -> engine thread -> role parts (servicer, KV transport) -> gRPC server ->
register in Redis -> "<role> ready HOST:PORT" -> ... SIGTERM/SIGINT -> NOT_SERVING, leave
the registry, wait until the role is idle (bounded), stop the server, close everything.

If the engine thread dies, the process must not stay registered with nothing to serve: it goes
NOT_SERVING, leaves the registry, stops the server and exits with status 1 (the launcher or the
orchestrator starts a new one; the registry reclaims whatever blocks it held).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from kvmesh.services.rpc import (
    ServiceSpec,
    create_server,
    on_reload_signal,
    serve_until_signal,
    shutdown_signal,
)
from kvmesh.services.tls import ServerTls
from kvmesh.services.worker.registration import Registration, WorkerConfig
from kvmesh.shared.control.connect import check_redis
from kvmesh.shared.engine.engine import Engine
from kvmesh.shared.engine.loop import EngineLoop, publish_gauges
from kvmesh.shared.telemetry import TracingServerInterceptor
from kvmesh.shared.telemetry.process import ProcessTelemetry, start_process_telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """What a role's parts are built from."""

    config: WorkerConfig
    loop: EngineLoop
    registration: Registration
    telemetry: ProcessTelemetry


@dataclass
class WorkerParts:
    """What a role adds to the process."""

    servicer: Any  # has `draining: bool` and an `idle: bool` property
    service: ServiceSpec
    kv_endpoint: str = ""  # data-plane endpoint advertised in the registry (decode)
    tasks: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = ()  # run until shutdown
    close: Callable[[], None] = field(default=lambda: None)  # after the server stopped


async def serve_worker(config: WorkerConfig, build: Callable[[WorkerContext], WorkerParts]) -> None:
    """Run a worker of config.engine.role until SIGTERM/SIGINT, then drain and exit."""
    role = config.engine.role.value
    await check_redis(config.redis_url)  # a wrong password ends the process before the model loads
    telemetry = start_process_telemetry(f"kvmesh-{role}", role, config.metrics_port)
    died = asyncio.Event()
    aio = asyncio.get_running_loop()
    loop = EngineLoop(Engine(config.engine), on_death=lambda _: aio.call_soon_threadsafe(died.set))
    loop.start()
    registration = Registration(config, loop)
    parts = build(WorkerContext(config, loop, registration, telemetry))
    # only peers with a certificate of the mesh's CA: the gateway and the other workers
    tls = ServerTls(config.tls, require_client_auth=True) if config.tls.enabled else None
    server, port, health = create_server(
        f"{config.host}:{config.port}", [parts.service],
        [TracingServerInterceptor(telemetry.tracing.tracer)], tls,
    )  # fmt: skip
    await server.start()
    if tls is not None:
        on_reload_signal(tls.reload)
    host = config.resolved_advertise_host()
    await registration.start(f"{host}:{port}", parts.kv_endpoint)
    jobs = [*parts.tasks, lambda: publish_gauges(loop, telemetry.metrics)]
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(job()) for job in jobs]
    log.info("%s worker %s serving on %s:%d %s", role, registration.worker_id, host, port,
             parts.kv_endpoint)  # fmt: skip
    stop = shutdown_signal()
    print(f"{role} ready {host}:{port}", flush=True)

    async def drain() -> None:
        parts.servicer.draining = True
        await registration.stop()  # gateways stop routing here
        deadline = time.monotonic() + config.drain_timeout_s
        while not died.is_set() and not parts.servicer.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    await _first_of(stop, died)
    stop.set()
    grace_s = 1.0 if died.is_set() else config.drain_timeout_s  # dead: nothing will finish
    await serve_until_signal(server, health, stop, drain, grace_s=grace_s)
    for task in tasks:
        task.cancel()
    parts.close()
    loop.stop()
    telemetry.stop()
    if died.is_set():
        raise SystemExit(f"{role} worker {registration.worker_id}: the engine thread died")


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
