"""A mesh started with `kvmesh up --tls --api-keys-file F`: TLS to clients, mutual TLS between
the gateway and the workers, API keys at the gateway; real processes, a real Redis, loopback."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshproc import Mesh, generate, kvmesh, snapshot

from kvmesh.protos import gateway_pb2
from kvmesh.services.certs import Authority, write_mesh_files
from kvmesh.services.gateway.auth import DENIED, key_hash
from kvmesh.services.tls import TlsFiles, channel_credentials
from kvmesh.shared.control.redis_server import RedisServer

Code = grpc.StatusCode
KEY, REVOKED, ENV_KEY = "key-valid-7f3a", "key-revoked-91c2", "key-from-env-22d0"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# accepted keys\n{key_hash(KEY)}\n{key_hash(REVOKED)}\n")
    return path


@pytest.fixture(scope="module")
def mesh(redis_url: str, keys_file: Path) -> Iterator[Mesh]:
    env = {"KVMESH_API_KEY_HASHES": key_hash(ENV_KEY)}
    proc = kvmesh("up", "--tls", "--port", "0", "--api-keys-file", str(keys_file),
                  redis_url=redis_url, extra_env=env)  # fmt: skip
    line = proc.wait_for("kvmesh is up: gateway at", timeout=300)
    mesh = Mesh(proc, line.split("gateway at ", 1)[1].split()[0], redis_url)
    yield mesh
    mesh.proc.interrupt()


@pytest.fixture(scope="module")
def mesh_tls(mesh: Mesh) -> TlsFiles:
    """The files `kvmesh up --tls` made, from the line that tells clients how to connect."""
    ca = Path(mesh.proc.wait_for("--tls-ca", timeout=5).split("--tls-ca ", 1)[1].split()[0])
    return TlsFiles(ca.parent / "mesh.pem", ca.parent / "mesh.key", ca)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA of somebody else's, and a certificate of it for this host."""
    return write_mesh_files(
        tmp_path_factory.mktemp("foreign"), Authority.create("foreign CA"), ["127.0.0.1"]
    )


def _request(max_tokens: int = 4) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        prompt="The capital of France is", max_tokens=max_tokens, ignore_eos=True
    )


def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _trusting(ca: Path | None) -> grpc.ChannelCredentials:
    return channel_credentials(TlsFiles(ca=ca))


def test_generate_command_with_the_ca_and_a_key_streams(mesh: Mesh, mesh_tls: TlsFiles) -> None:
    command = [sys.executable, "-P", "-m", "kvmesh.services.cli", "generate", "--addr",
               mesh.address, "--tls-ca", str(mesh_tls.ca), "--api-key", KEY, "--max-tokens", "5",
               "Hello"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "completion 5 tokens" in done.stderr


def test_plaintext_clients_and_clients_trusting_another_ca_are_refused(
    mesh: Mesh, foreign: TlsFiles
) -> None:
    plain = asyncio.run(generate(mesh.address, _request(), timeout=10, metadata=_bearer(KEY)))
    assert plain.code == Code.UNAVAILABLE and not plain.tokens
    other = asyncio.run(generate(mesh.address, _request(), timeout=10,
                                 credentials=_trusting(foreign.ca),
                                 metadata=_bearer(KEY)))  # fmt: skip
    assert other.code == Code.UNAVAILABLE and not other.tokens


def test_api_keys_missing_wrong_and_valid(mesh: Mesh, mesh_tls: TlsFiles) -> None:
    tls = _trusting(mesh_tls.ca)

    def run(metadata: tuple[tuple[str, str], ...]):
        return asyncio.run(generate(mesh.address, _request(), credentials=tls, metadata=metadata))

    for metadata in [(), _bearer(""), _bearer(KEY[:-1]), _bearer(key_hash(KEY)),
                     (("authorization", KEY),)]:  # fmt: skip
        refused = run(metadata)
        assert (refused.code, refused.details, refused.tokens) == (Code.UNAUTHENTICATED, DENIED, [])
    for key in (KEY, ENV_KEY):  # from the file and from KVMESH_API_KEY_HASHES
        served = run(_bearer(key))
        assert served.code == Code.OK and served.finish_reason == "length", served.details
        assert len(served.tokens) == 4


def test_health_stays_open_without_a_key(mesh: Mesh, mesh_tls: TlsFiles) -> None:
    async def check() -> int:
        async with grpc.aio.secure_channel(mesh.address, _trusting(mesh_tls.ca)) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            return int(reply.status)

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING


def test_workers_take_only_clients_with_a_certificate_of_the_mesh_ca(
    mesh: Mesh, mesh_tls: TlsFiles, foreign: TlsFiles
) -> None:
    workers = asyncio.run(snapshot(mesh.redis_url))["workers"]
    assert {w["role"] for w in workers} == {"prefill", "decode"}

    async def check(address: str, files: TlsFiles) -> Code:
        async with grpc.aio.secure_channel(address, channel_credentials(files)) as ch:
            try:
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            except grpc.aio.AioRpcError as e:
                return e.code()
        return Code.OK

    no_cert = TlsFiles(ca=mesh_tls.ca)
    foreign_cert = TlsFiles(foreign.cert, foreign.key, mesh_tls.ca)
    for w in workers:
        assert asyncio.run(check(w["address"], mesh_tls)) == Code.OK  # the mesh's own
        assert asyncio.run(check(w["address"], no_cert)) == Code.UNAVAILABLE
        assert asyncio.run(check(w["address"], foreign_cert)) == Code.UNAVAILABLE


def test_a_worker_with_a_foreign_certificate_is_never_routed_to(
    mesh: Mesh, mesh_tls: TlsFiles, foreign: TlsFiles
) -> None:
    """It registers in Redis (which anyone who reaches it can), but the gateway's handshake with
    it fails: its model never becomes servable and no request reaches it."""
    model = "synthetic:tiny"
    rogue = kvmesh("aggregated", "--model", model, "--host", "127.0.0.1", "--port", "0",
                   "--tls-cert", str(foreign.cert), "--tls-key", str(foreign.key),
                   "--tls-ca", str(mesh_tls.ca), redis_url=mesh.redis_url)  # fmt: skip
    try:
        rogue.wait_for("aggregated ready", timeout=120)
        registered = [w for w in asyncio.run(snapshot(mesh.redis_url))["workers"]
                      if w["model"] == model]  # fmt: skip
        assert len(registered) == 1
        mesh.proc.wait_for(f"worker {registered[0]['worker_id']} at", timeout=10)  # refused
        request = gateway_pb2.GenerateRequest(model=model, prompt_token_ids=[1, 2, 3],
                                              max_tokens=2)  # fmt: skip
        got = asyncio.run(generate(mesh.address, request, credentials=_trusting(mesh_tls.ca),
                                   metadata=_bearer(KEY)))  # fmt: skip
        assert got.code == Code.INVALID_ARGUMENT and "unknown model" in got.details
    finally:
        rogue.stop(signal.SIGTERM)


def _gateway_pid(mesh: Mesh) -> int:
    children = psutil.Process(mesh.proc.proc.pid).children()
    return next(c.pid for c in children if "gateway" in c.cmdline())


def test_sighup_revokes_a_removed_key_and_keeps_streams(
    mesh: Mesh, mesh_tls: TlsFiles, keys_file: Path
) -> None:
    tls = _trusting(mesh_tls.ca)
    before = asyncio.run(generate(mesh.address, _request(), credentials=tls,
                                  metadata=_bearer(REVOKED)))  # fmt: skip
    assert before.code == Code.OK

    async def revoke_mid_stream() -> tuple:
        stream = asyncio.create_task(generate(mesh.address, _request(48), credentials=tls,
                                              metadata=_bearer(KEY)))  # fmt: skip
        await asyncio.sleep(0.3)
        keys_file.write_text(f"{key_hash(KEY)}\n")
        psutil.Process(_gateway_pid(mesh)).send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)  # the gateway reads the file again on its event loop
        revoked = await generate(mesh.address, _request(), credentials=tls,
                                 metadata=_bearer(REVOKED))  # fmt: skip
        return await stream, revoked

    streamed, revoked = asyncio.run(revoke_mid_stream())
    assert streamed.code == Code.OK and len(streamed.tokens) == 48
    assert revoked.code == Code.UNAUTHENTICATED


def _served_serial(address: str, ca: Path) -> int:
    """The serial number of the certificate a TLS server at address presents."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=host) as tls:  # fmt: skip
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_gateway_reloads_its_certificate_on_sighup(redis_url: str, tmp_path: Path) -> None:
    """A rotation: new files, SIGHUP; new handshakes get the new certificate, while a
    connection made before keeps working."""
    authority = Authority.create()
    files = write_mesh_files(tmp_path, authority, ["127.0.0.1"])
    gateway = kvmesh("gateway", "--model", "synthetic:tiny", "--host", "127.0.0.1", "--port", "0",
                     "--tls-cert", str(files.cert), "--tls-key", str(files.key),
                     "--tls-ca", str(files.ca), redis_url=redis_url)  # fmt: skip
    try:
        address = gateway.wait_for("gateway ready", timeout=60).rsplit(" ", 1)[1]
        first = _served_serial(address, files.ca)

        async def rotate() -> tuple[int, int]:
            async with grpc.aio.secure_channel(address, channel_credentials(files)) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                rotated = write_mesh_files(tmp_path / "new", authority, ["127.0.0.1"])
                files.cert.write_bytes(rotated.cert.read_bytes())  # type: ignore[union-attr]
                files.key.write_bytes(rotated.key.read_bytes())  # type: ignore[union-attr]
                gateway.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 10
                while (serial := _served_serial(address, files.ca)) == first:
                    assert time.monotonic() < deadline, "the new certificate was never served"
                    await asyncio.sleep(0.1)
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                return serial, int(reply.status)

        (tmp_path / "new").mkdir()
        serial, status = asyncio.run(rotate())
        assert serial != first and status == health_pb2.HealthCheckResponse.SERVING
        assert gateway.proc.poll() is None
    finally:
        gateway.stop(signal.SIGTERM)
