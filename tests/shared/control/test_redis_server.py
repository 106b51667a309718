"""RedisServer starts a real valkey/redis-server on loopback and leaves nothing behind."""

import os
import socket
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvmesh.shared.control.redis_server import RedisServer, RedisServerError, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_serves_and_stops_cleanly() -> None:
    with RedisServer() as server:
        pid, port = server.pid, server.port
        assert pid is not None and server.url == f"redis://:{server.password}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(server.url)
        client.set("k", b"v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.close()
    assert server.pid is None and not _alive(pid) and not _accepts(port)


def test_given_port_and_password() -> None:
    port = free_port()
    with RedisServer(port=port, password="s3cr/t") as server:
        assert server.port == port
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"PING\r\n")
            assert raw.recv(100).startswith(b"-NOAUTH")
        assert redis.Redis.from_url(server.url).ping()


def test_random_password_on_loopback_only() -> None:
    """The default server is open to no one without its password, which is random per server and
    kept off the command line; it listens on 127.0.0.1 only."""
    with RedisServer() as server, RedisServer() as other:
        assert len(server.password) >= 32 and server.password != other.password
        # redis-py retries an AuthenticationError (a ConnectionError) with backoff: once is enough
        once = Retry(NoBackoff(), 0)
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, retry=once)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        wrong = redis.Redis(host="127.0.0.1", port=server.port, password=other.password, retry=once)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        client = redis.Redis.from_url(server.url)
        assert client.ping() and client.config_get("bind") == {"bind": "127.0.0.1"}
        assert server.password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        for c in (anonymous, wrong, client):
            c.close()


def test_without_password() -> None:
    with RedisServer(password="") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert redis.Redis(host="127.0.0.1", port=server.port).ping()


def test_stops_when_the_body_raises() -> None:
    server = RedisServer()
    with pytest.raises(KeyError), server:
        pid = server.pid
        raise KeyError("boom")
    assert pid is not None and not _alive(pid)


def test_clear_errors() -> None:
    with pytest.raises(RedisServerError, match="not found"):
        RedisServer(binary="/nonexistent/valkey-server").start()
    with RedisServer() as taken, pytest.raises(RedisServerError, match="exited at startup"):
        RedisServer(port=taken.port).start()
