"""`kvmesh up`: a whole mesh on this machine as separate processes.

Starts a local Redis server (unless REDIS_URL is set), the prefill, decode and aggregated
workers, then the gateway; prints the gateway address once every process reports ready; on
Ctrl-C or SIGTERM stops the gateway first, then the workers (each drains), then Redis, and leaves
no process.

With `tls`, a throwaway CA and a certificate for this host are made into a private temporary
directory (services/certs.py), passed to every process (mutual TLS between them, TLS to clients)
and removed when the mesh stops; the launcher prints how a client connects.

Workers take the devices round robin; the k workers on one GPU each get 1/k of the mesh's share
of it (`--gpu-memory-share`), whatever order they start in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from kvmesh.services.certs import local_mesh_tls
from kvmesh.services.tls import PLAINTEXT, TlsFiles
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.lifetime import die_with_parent

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 40.0
MAX_RESTARTS = 20  # crashed workers replaced over the mesh's life


@dataclass(frozen=True)
class MeshPlan:
    prefill: int
    decode: int
    gateway_args: list[str]
    worker_args: list[str]  # passed to every worker (model, dtype, ...)
    devices: list[str] = field(default_factory=lambda: ["cpu"])  # assigned round robin
    host: str = "127.0.0.1"
    aggregated: int = 0
    gpu_memory_share: float = 0.9  # of each GPU, split among the workers on it
    tls: bool = False  # a throwaway CA and certificates, passed to every process

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.aggregated) < 0:
            raise ValueError(f"worker counts must be >= 0: {self}")
        if (self.prefill == 0) != (self.decode == 0):
            raise ValueError(
                f"prefill and decode workers serve in pairs: {self.prefill} prefill and "
                f"{self.decode} decode workers cannot serve (use --aggregated alone instead)"
            )
        if self.prefill + self.aggregated == 0:
            raise ValueError("the mesh needs a prefill and a decode worker, or an aggregated one")

    def workers(self) -> list[WorkerSpec]:
        """Every worker process: its name, role, device and, on a GPU, its memory share."""
        roles = ["prefill"] * self.prefill + ["decode"] * self.decode
        roles += ["aggregated"] * self.aggregated
        devices = [self.devices[i % len(self.devices)] for i in range(len(roles))]
        specs, seen = [], dict.fromkeys(roles, 0)
        for role, device in zip(roles, devices, strict=True):
            share = self.gpu_memory_share / devices.count(device)
            specs.append(WorkerSpec(f"{role}-{seen[role]}", role, device, share))
            seen[role] += 1
        return specs


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # role-index, e.g. "decode-0"
    role: str
    device: str
    gpu_memory_share: float  # of its device's total memory (ignored on a CPU)

    def argv(self, plan: MeshPlan, tls: list[str] | None = None) -> list[str]:
        share = f"{self.gpu_memory_share:.6f}"
        where = ["--device", self.device, "--host", plan.host, "--gpu-memory-share", share]
        return _service(self.role, [*plan.worker_args, *where, *(tls or [])])


class Child:
    """A service process whose output is echoed with a prefix; `ready` is set when it prints
    its '<role> ready HOST:PORT' line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.marker = name.split("-")[0] + " ready "  # e.g. "decode ready HOST:PORT"
        self.argv = argv
        self.address = ""
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops us in order
            preexec_fn=die_with_parent,  # and a killed launcher leaves no orphan behind
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self.marker) and not self.ready.is_set():
                self.address = line.rsplit(" ", 1)[-1].strip()
                self.ready.set()
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    def stop(self, timeout: float) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _service(role: str, args: list[str]) -> list[str]:
    return [sys.executable, "-P", "-m", "kvmesh.services.cli", role, *args]


def run_mesh(plan: MeshPlan, on_ready: threading.Event | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    redis_server = None
    env = dict(os.environ)
    if not env.get("REDIS_URL"):
        redis_server = RedisServer().start()
        env["REDIS_URL"] = redis_server.url
    children: list[Child] = []
    tls_dir, tls = local_mesh_tls(plan.host) if plan.tls else (None, PLAINTEXT)
    tls_args = _tls_args(tls)
    try:
        for spec in plan.workers():
            children.append(Child(spec.name, spec.argv(plan, tls_args), env))
        gateway = Child(
            "gateway", _service("gateway", [*plan.gateway_args, "--host", plan.host, *tls_args]),
            env,
        )  # fmt: skip
        children.append(gateway)
        if not _wait_ready(children, stop):
            return 1
        print(f"kvmesh is up: gateway at {gateway.address} (Ctrl-C to stop)", flush=True)
        if tls.ca is not None:
            print(f"clients connect with TLS, trusting this mesh's CA: kvmesh generate --addr "
                  f"{gateway.address} --tls-ca {tls.ca} 'Hello'", flush=True)  # fmt: skip
        if on_ready is not None:
            on_ready.set()
        restarts = 0
        while not stop.is_set():
            if gateway.proc.poll() is not None:
                print("kvmesh: the gateway exited; stopping the mesh", file=sys.stderr)
                return 1
            for i, child in enumerate(children):
                if child.proc.poll() is not None and restarts < MAX_RESTARTS:
                    # a crashed worker is replaced; the registry reclaims its blocks meanwhile
                    print(f"kvmesh: {child.name} exited ({child.proc.returncode}); restarting",
                          file=sys.stderr)  # fmt: skip
                    children[i] = Child(child.name, child.argv, env)
                    restarts += 1
            stop.wait(0.5)
        return 0
    finally:
        _stop_all(children)
        if redis_server is not None:
            redis_server.stop()
        if tls_dir is not None:
            shutil.rmtree(tls_dir, ignore_errors=True)


def _tls_args(tls: TlsFiles) -> list[str]:
    names = (("--tls-cert", tls.cert), ("--tls-key", tls.key), ("--tls-ca", tls.ca))
    return [arg for flag, path in names if path is not None for arg in (flag, str(path))]


def _wait_ready(children: list[Child], stop: threading.Event) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(c.ready.is_set() for c in children):
        failed = [c.name for c in children if c.proc.poll() is not None]
        if failed or stop.is_set() or time.monotonic() > deadline:
            why = f"{', '.join(failed)} exited" if failed else "interrupted or timed out"
            print(f"kvmesh: the mesh did not start: {why}", file=sys.stderr)
            return False
        time.sleep(0.1)
    return True


def _stop_all(children: list[Child]) -> None:
    """Gateway first (no new requests), then the workers in parallel (each drains)."""
    gateway = [c for c in children if c.name == "gateway"]
    for child in gateway:
        child.stop(STOP_TIMEOUT_S)
    threads = [
        threading.Thread(target=c.stop, args=(STOP_TIMEOUT_S,))
        for c in children
        if c not in gateway
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)  # anything a child left behind
