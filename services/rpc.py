"""gRPC server plumbing every kvmesh process shares: health, reflection, graceful shutdown.

server, port, health = create_server("0.0.0.0:0", [(add_Fn, servicer, "pkg.Service")], ...)
await server.start(); ...; await serve_until_signal(server, health, drain)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# (add_XServicer_to_server, servicer, full service name)
ServiceSpec = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]

MAX_MESSAGE_BYTES = 64 << 20


def install_uvloop() -> None:
    """Use uvloop's event loop where it is installed (Linux/macOS)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def create_server(
    address: str, services: Sequence[ServiceSpec], interceptors: Sequence[Any] = ()
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """A grpc.aio server bound to address (port 0 = any free port) with health checking and
    reflection for every service; returns (server, bound port, health servicer)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=list(interceptors), options=options)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def shutdown_signal() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT; install it before announcing readiness."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.HealthServicer,
    stop: asyncio.Event,
    drain: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 30.0,
) -> None:
    """Serve until `stop` is set, then: report NOT_SERVING, run `drain` (stop admitting, let
    in-flight work finish), stop the server with a grace period, and return."""
    await stop.wait()
    health_servicer.enter_graceful_shutdown()
    if drain is not None:
        await drain()
    await server.stop(grace_s)


def channel(address: str, interceptors: Sequence[Any] = ()) -> grpc.aio.Channel:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.insecure_channel(address, options=options, interceptors=list(interceptors))


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with a status; typed NoReturn so callers narrow their types after it."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")
