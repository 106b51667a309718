"""The first contact of a process with Redis: one PING at start, so that a wrong password or an
unreachable server ends the process with one line that names the server, not a traceback from
deep inside its first registry call."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

# redis is imported inside the functions: the CLI imports this module for RedisUnavailable, and
# every command (clients included) would pay for the redis package at start

_CONNECT_TIMEOUT_S = 5.0
T = TypeVar("T")


class RedisUnavailable(RuntimeError):
    """Redis refused this process's credentials or could not be reached."""


def _where(kwargs: dict[str, object]) -> str:
    """HOST:PORT (or the socket path) of a client's connection settings, never the password."""
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


async def check_redis(url: str) -> None:
    """PING the server of url; RedisUnavailable with a one-line reason if that fails."""
    import redis.asyncio as redis
    from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

    client = redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT_S)
    kwargs = client.connection_pool.connection_kwargs
    where, has_password = _where(kwargs), bool(kwargs.get("password"))
    try:
        await client.ping()
    except AuthenticationError as e:
        reason = f"refused the password: {e}" if has_password else "requires a password"
        raise RedisUnavailable(
            f"Redis at {where} {reason} (REDIS_URL carries it: redis://:PASSWORD@HOST:PORT/0 "
            "or redis://USER:PASSWORD@HOST:PORT/0)"
        ) from None
    except (ConnectionError, TimeoutError, OSError) as e:
        raise RedisUnavailable(f"Redis at {where} is unreachable: {e}") from None
    finally:
        await client.aclose()


def redis_wait_s() -> float:
    """How long a request waits for an unreachable Redis before it fails (KVMESH_REDIS_WAIT_S,
    default 10 s): a restart or a short partition passes unnoticed by clients."""
    return float(os.environ.get("KVMESH_REDIS_WAIT_S", "10"))


async def patiently(call: Callable[[], Awaitable[T]], window_s: float) -> T:
    """call(), again after a pause while Redis cannot be reached (restarting, or partitioned
    away), for up to window_s seconds; then its error. Other errors at once."""
    from redis.exceptions import ConnectionError, TimeoutError

    deadline = time.monotonic() + window_s
    pause = 0.05
    while True:
        try:
            return await call()
        except (ConnectionError, TimeoutError, OSError):
            if time.monotonic() + pause > deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)
