"""A worker or gateway whose REDIS_URL carries a wrong password, or none, stops at start with one
line naming the server, before it loads a model or opens a port; `kvmesh status` does the same."""

import asyncio
import time
from collections.abc import Iterator

import pytest
from meshproc import Proc, kvmesh

from kvmesh.shared.control.connect import RedisUnavailable, check_redis
from kvmesh.shared.control.redis_server import RedisServer, free_port

START_S = 30.0  # importing torch on a busy 2-core machine; the refusal itself is one round trip


def _refused(proc: Proc, line: str) -> str:
    """The process's output once it exited with status 1 and printed line (AssertionError if not
    within START_S)."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        out = "\n".join(proc.lines)
        if proc.proc.poll() is not None and line in out:
            break
        time.sleep(0.05)
    assert proc.proc.poll() == 1 and line in out, out
    return out


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.mark.parametrize(
    ("password", "reason"),
    [(":wrong@", "refused the password: invalid username-password pair"),
     ("", "requires a password")],
)  # fmt: skip
@pytest.mark.parametrize("role", ["decode", "gateway"])
def test_start_refused(server: RedisServer, role: str, password: str, reason: str) -> None:
    url = f"redis://{password}127.0.0.1:{server.port}/0"
    proc = kvmesh(role, "--model", "synthetic:tiny", "--host", "127.0.0.1", "--port", "0",
                  redis_url=url)  # fmt: skip
    out = _refused(proc, f"kvmesh: Redis at 127.0.0.1:{server.port} {reason}")
    assert "Traceback" not in out and "wrong" not in out and "ready" not in out, out


def test_status_refused(server: RedisServer) -> None:
    proc = kvmesh("status", redis_url=f"redis://:wrong@127.0.0.1:{server.port}/0")
    _refused(proc, f"kvmesh: Redis at 127.0.0.1:{server.port} refused the password")


def test_check_redis(server: RedisServer) -> None:
    asyncio.run(check_redis(server.url))
    with pytest.raises(RedisUnavailable, match=r"^Redis at 127\.0\.0\.1:\d+ is unreachable"):
        asyncio.run(check_redis(f"redis://127.0.0.1:{free_port()}/0"))
