"""What kvmesh processes fetch: a mesh serving a synthetic model fetches nothing (its index is a
loopback server that records every request), and a process that needs the default model while
its index cannot be reached exits at once with one line saying what to pass instead."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from meshproc import generate, start_mesh
from package_index import PackageIndex

from kvmesh.protos import gateway_pb2
from kvmesh.shared.control.redis_server import RedisServer


def test_a_synthetic_mesh_fetches_nothing(tmp_path: Path) -> None:
    with PackageIndex() as index, RedisServer() as redis_server:
        env = {"KVMESH_CACHE": str(tmp_path), "PIP_INDEX_URL": index.url}
        mesh, address = start_mesh(redis_server.url, "--model", "synthetic:tiny", extra_env=env)
        try:
            request = gateway_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4)
            served = asyncio.run(generate(address, request))
            assert (served.code, len(served.tokens)) == (grpc.StatusCode.OK, 4), served
            text = asyncio.run(generate(address, gateway_pb2.GenerateRequest(prompt="Hi")))
            assert text.code == grpc.StatusCode.INVALID_ARGUMENT  # no tokenizer was fetched
            assert "prompt_token_ids" in text.details
        finally:
            assert mesh.stop(signal.SIGINT) == 0, "\n".join(mesh.lines[-30:])
        assert index.requests == []
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []


def closed_index() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/simple"  # refused once s is closed


def run_cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-P", "-m", "kvmesh.services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return done, time.monotonic() - start


def test_without_the_index_a_process_needing_the_default_model_exits_at_once(tmp_path) -> None:
    env = {**os.environ, "KVMESH_CACHE": str(tmp_path), "PIP_INDEX_URL": closed_index(),
           "REDIS_URL": "redis://127.0.0.1:1"}  # fmt: skip
    _, startup = run_cli("fetch", "--help", env=env)  # importing the command line, no more
    for role in ("gateway", "decode"):
        done, took = run_cli(role, "--port", "0", env=env)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and done.stdout == "" and len(lines) == 1, done
        assert "Connection refused" in lines[0] and "--model" in lines[0], lines[0]
        assert "synthetic:" in lines[0] and "KVMESH_CACHE" in lines[0], lines[0]
        assert took < startup + 2.0, (role, took, startup)
