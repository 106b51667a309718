"""gRPC server plumbing every kvmesh process shares: health, reflection, graceful shutdown.

server, port, health = create_server("0.0.0.0:0", [(add_Fn, servicer, "pkg.Service")], ...)
await server.start(); ...; await serve_until_signal(server, health, drain)

A stop is bounded: given `deadline_s`, a process still running that long after its signal is
ended, and `exit_now` ends a process whose service has closed without the interpreter's
teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.services.tls import PLAINTEXT, ServerTls, TlsFiles, add_port, aio_channel

# (add_XServicer_to_server, servicer, full service name)
ServiceSpec = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]

MAX_MESSAGE_BYTES = 64 << 20
# HTTP/2 pings on the mesh's open calls (`channel`): a peer silent this long after a ping is gone
KEEPALIVE_S = 2
KEEPALIVE_TIMEOUT_S = 3


def install_uvloop() -> None:
    """Use uvloop's event loop where it is installed (Linux/macOS)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def create_server(
    address: str,
    services: Sequence[ServiceSpec],
    interceptors: Sequence[Any] = (),
    tls: ServerTls | None = None,
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """A grpc.aio server bound to address (port 0 = any free port) with health checking and
    reflection for every service, over TLS with `tls`; returns (server, bound port, health
    servicer)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # the mesh's channels ping every KEEPALIVE_S while a call is open (`channel`): accept it
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = grpc.aio.server(interceptors=list(interceptors), options=options)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health.SERVICE_NAME, reflection.SERVICE_NAME]
    for add, servicer, name in services:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    port = add_port(server, address, tls)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def on_reload_signal(*reloads: Callable[[], object]) -> None:
    """Run each of `reloads` on SIGHUP (certificates, API keys read again from their files)."""

    def reload() -> None:
        for fn in reloads:
            fn()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


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
    deadline_s: float | None = None,
) -> None:
    """Serve until `stop` is set, then: report NOT_SERVING, run `drain` (stop admitting, let
    in-flight work finish), stop the server with a grace period, and return. With `deadline_s`,
    the process ends (status 1) if it still runs that long after the signal, whatever step of
    its shutdown holds it."""
    await stop.wait()
    if deadline_s is not None:
        exit_deadline(deadline_s)
    health_servicer.enter_graceful_shutdown()
    if drain is not None:
        await drain()
    await server.stop(grace_s)


def exit_deadline(seconds: float) -> None:
    """End the process with status 1 and one log line if it still runs `seconds` from now."""

    def expire() -> None:  # no logging or flushing: a stuck thread may hold their locks
        os.write(2, f"kvmesh: shutdown took over {seconds:.0f} s: exiting now\n".encode())
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def exit_now(code: int) -> NoReturn:
    """End the process at once, once its service has closed what it holds (server, channels,
    Redis, telemetry). The interpreter's teardown is skipped: with torch and transformers
    loaded it takes seconds, and a stopped service should take its drain and no longer."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def channel(
    address: str, interceptors: Sequence[Any] = (), tls: TlsFiles = PLAINTEXT
) -> grpc.aio.Channel:
    """A channel to another mesh process: mutual TLS with `tls`'s files, else plaintext. While
    a call is open it pings the peer every KEEPALIVE_S: a peer that does not answer within
    KEEPALIVE_TIMEOUT_S (stopped, or its host gone, where no connection reset ever comes) fails
    the call with UNAVAILABLE, and the gateway resumes the request elsewhere (route.py)."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        # newer gRPC cores wait for a ping's ack this long instead (default one minute)
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
        ("grpc.http2.max_pings_without_data", 0),  # a stalled stream sends no data: ping anyway
    ]
    return aio_channel(address, tls, options, list(interceptors))


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents an API key to the gateway (none without a key)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the RPC with a status; typed NoReturn so callers narrow their types after it."""
    await context.abort(code, message)
    raise AssertionError("context.abort returned")
