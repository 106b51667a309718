"""compose/ against the code.

- compose/docker-compose.yml validates against the compose-spec JSON schema (and with `docker
  compose config` where a compose client exists); the Kubernetes manifests validate against the
  Kubernetes OpenAPI schemas (kubernetes-validate, strict), and both say what the issue asks.
- The compose `cpu` profile's exact commands and environment run as local processes (service
  hostnames -> 127.0.0.1, the compose Redis -> a local one with the same password, the collector
  -> a local OTLP receiver) and serve a request, traced across all three roles.
- Workers started later from the Kubernetes args with only REDIS_URL set join the running mesh
  and get traffic; a decode worker stopped with SIGTERM mid-stream finishes that stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from meshproc import Proc, generate, inspect_all, snapshot
from otlp_collector import OtlpCollector

from kvmesh.protos import gateway_pb2
from kvmesh.services.gateway.server import GatewayConfig
from kvmesh.services.worker.registration import WorkerConfig
from kvmesh.shared.control.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
K8S = COMPOSE_DIR / "k8s"
KUSTOMIZE_ROOTS = (K8S, K8S / "autoscaling")
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())  # 1.27: grpc probes are GA
ROLES = ("gateway", "prefill", "decode")
PASSWORD = "pw-" + secrets.token_hex(12)
STARTUP_S = 120
STREAM_TIMEOUT_S = 30

# ------------------------------------------------------------------------------ compose model

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $VAR ${VAR} ${VAR:-d} ${VAR-d} ${VAR:?e} ${VAR?e} $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-") and unset:
            return arg
        if op in ("?", ":?") and unset:
            raise ValueError(f"compose would refuse to start: {name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: _walk(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, env) for v in node]
    return node


def compose_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with anchors merged and variables substituted from env."""
    return _walk(
        yaml.safe_load(COMPOSE_FILE.read_text()), {"REDIS_PASSWORD": PASSWORD, **(env or {})}
    )


def in_profile(service: dict[str, Any], profile: str) -> bool:
    return "profiles" not in service or profile in service["profiles"]


def kvmesh_role(service: dict[str, Any]) -> str | None:
    """The kvmesh role a compose service runs, or None for other images and client tools."""
    command = service.get("command") or []
    is_ours = "build" in service and service["build"]["dockerfile"] == "compose/Dockerfile"
    return command[0] if is_ours and command and command[0] in ROLES else None


def dockerfile_instruction(name: str) -> str:
    """The (last) Dockerfile instruction `name`'s arguments, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    assert found, f"no {name} in {DOCKERFILE}"
    return found[-1]


def cli_env_vars() -> set[str]:
    """Every environment variable services/cli.py reads."""
    source = (ROOT / "services" / "cli.py").read_text()
    return set(re.findall(r"""env(?:iron\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", source))


# --------------------------------------------------------------------------- k8s model


def kustomize_files(root: Path) -> list[Path]:
    """Manifest files a kustomization pulls in, following bases (what `kubectl kustomize` reads)."""
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    files: list[Path] = []
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        assert path.exists(), f"{root}/kustomization.yaml lists missing {entry}"
        files += kustomize_files(path) if path.is_dir() else [path]
    return files


def manifests(root: Path = K8S / "autoscaling") -> list[dict[str, Any]]:
    return [d for f in kustomize_files(root) for d in yaml.safe_load_all(f.read_text()) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"want one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    pod = find(docs, "Deployment", f"kvmesh-{role}")["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == role]
    return c


def env_value(c: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [e for e in c.get("env", []) if e["name"] == name]
    return entry


# ============================================================================ static checks


def test_compose_file_matches_the_compose_spec_schema() -> None:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendored / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    config = compose_config()
    assert not [e.message for e in validator.iter_errors(config)]
    # the validator is strict enough to catch a misspelt key
    broken = json.loads(json.dumps(config))
    broken["services"]["gateway"]["enviroment"] = {"X": "1"}
    assert list(validator.iter_errors(broken))


def test_docker_compose_config() -> None:
    """The compose client's own validation, where a compose client exists."""
    for client in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(client[0]) and subprocess.run(
            [*client, "version"], capture_output=True
        ).returncode == 0:  # fmt: skip
            break
    else:
        pytest.skip("no compose client here (docker has no compose plugin, no docker-compose)")
    argv = [*client, "-f", str(COMPOSE_FILE), "--profile", "cpu", "--profile", "gpu", "config"]
    env = {**os.environ, "REDIS_PASSWORD": PASSWORD}
    done = subprocess.run([*argv, "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    unset = subprocess.run(argv, env={**env, "REDIS_PASSWORD": ""}, capture_output=True)
    assert unset.returncode != 0, "compose must refuse to start Redis without a password"


def test_compose_topology() -> None:
    services = compose_config()["services"]
    roles = {name: kvmesh_role(s) for name, s in services.items()}
    cpu = {n: r for n, r in roles.items() if in_profile(services[n], "cpu")}
    gpu = {n: r for n, r in roles.items() if in_profile(services[n], "gpu")}
    for profile in (cpu, gpu):  # the same topology in both profiles
        assert sorted(r for r in profile.values() if r) == sorted(ROLES)
        assert {"redis", "otel-collector", "jaeger"} <= {n for n, r in profile.items() if not r}
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose_config({"REDIS_PASSWORD": ""})
    redis = services["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1] == PASSWORD
    known = cli_env_vars()
    for name, role in roles.items():
        if role is None:
            continue
        s = services[name]
        env = s["environment"]
        assert set(env) - known <= {n for n in env if n.startswith("OTEL_")}, name
        assert "OTEL_SERVICE_NAME" not in env, "each process names itself"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert f":{PASSWORD}@redis:6379" in env["REDIS_URL"]
        if role != "gateway":  # `--scale` needs workers without fixed names or host ports
            assert "container_name" not in s and "ports" not in s, name
            gpu_only = name in gpu and name not in cpu
            devices = s.get("deploy", {}).get("resources", {}).get("reservations", {})
            assert bool(devices) == gpu_only, name
            if gpu_only:
                assert devices["devices"][0]["capabilities"] == ["gpu"]
                assert env["KVMESH_DEVICE"] == "cuda" and s["build"]["args"]["VARIANT"] == "gpu"
            else:
                assert env["KVMESH_DEVICE"] == "cpu" and s["build"]["args"]["VARIANT"] == "cpu"
    # each GPU worker has a CPU twin with the same command
    assert sorted(services[n]["command"] for n in gpu if gpu[n] and gpu[n] != "gateway") == sorted(
        services[n]["command"] for n in cpu if cpu[n] and cpu[n] != "gateway"
    )


def test_dockerfile() -> None:
    assert json.loads(dockerfile_instruction("ENTRYPOINT")) == ["kvmesh"]
    assert dockerfile_instruction("USER") == "kvmesh"
    assert "kvmesh-healthcheck" in dockerfile_instruction("HEALTHCHECK")
    assert "compose/healthcheck.py /usr/local/bin/kvmesh-healthcheck" in DOCKERFILE.read_text()
    assert "kvmesh fetch" in dockerfile_instruction("RUN")  # model and tokenizer baked in
    assert "FROM base-${VARIANT}" in DOCKERFILE.read_text()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "Secret", "ConfigMap", "HorizontalPodAutoscaler",
    }  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    deployment = json.loads(json.dumps(find(docs, "Deployment", "kvmesh-decode")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: unknown keys fail
        kubernetes_validate.validate(deployment, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("root", KUSTOMIZE_ROOTS, ids=lambda p: p.name)
def test_kustomize_build(root: Path) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(manifests(root))
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "kvmesh"


def test_k8s_pools() -> None:
    docs = manifests()
    otel = find(docs, "ConfigMap", "kvmesh-otel")["data"]
    assert all(k.startswith("OTEL_") for k in otel) and "OTEL_SERVICE_NAME" not in otel
    drain_s = {
        "gateway": GatewayConfig.__dataclass_fields__["drain_timeout_s"].default,
        "prefill": WorkerConfig.__dataclass_fields__["drain_timeout_s"].default,
    }
    drain_s["decode"] = drain_s["prefill"]
    known = cli_env_vars() | {"REDIS_PASSWORD"}
    for role in ROLES:
        deployment = find(docs, "Deployment", f"kvmesh-{role}")
        pod = deployment["spec"]["template"]["spec"]
        c = container(docs, role)
        assert c["args"][0] == role and {e["name"] for e in c["env"]} <= known, role
        port = int(env_value(c, "KVMESH_PORT")["value"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (role, probe)
        # drain (stop admitting, finish in flight) + the gRPC server's grace, both drain_s
        assert pod["terminationGracePeriodSeconds"] > 2 * drain_s[role]
        assert {"configMapRef": {"name": "kvmesh-otel"}} in c["envFrom"]
        secret = env_value(c, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
        assert find(docs, "Secret", secret["name"])["stringData"][secret["key"]]
        assert "$(REDIS_PASSWORD)@kvmesh-redis:6379" in env_value(c, "REDIS_URL")["value"]
        assert [e["name"] for e in c["env"]].index("REDIS_PASSWORD") < [
            e["name"] for e in c["env"]
        ].index("REDIS_URL")  # $(VAR) expands only variables defined before it
        if role == "gateway":
            continue
        assert env_value(c, "KVMESH_ADVERTISE_HOST")["valueFrom"]["fieldRef"] == {
            "fieldPath": "status.podIP"
        }
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        hpa = find(docs, "HorizontalPodAutoscaler", f"kvmesh-{role}")["spec"]
        assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert {m["type"] for m in hpa["metrics"]} == {"Pods"}
    redis = find(docs, "Deployment", "kvmesh-redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert find(docs, "Service", "kvmesh-redis")["spec"]["ports"][0]["port"] == 6379


def hpa_metrics(role: str) -> set[str]:
    hpa = find(manifests(), "HorizontalPodAutoscaler", f"kvmesh-{role}")["spec"]
    return {m["pods"]["metric"]["name"] for m in hpa["metrics"]}


# ============================================================================ live mesh


@dataclass
class Service:
    name: str
    proc: Proc
    address: str  # 127.0.0.1:port of its gRPC server
    metrics_port: int


@dataclass
class Mesh:
    redis_url: str
    collector: OtlpCollector
    services: dict[str, Service]

    @property
    def gateway(self) -> str:
        return self.services["gateway"].address


def base_env() -> dict[str, str]:
    """This machine's environment minus everything kvmesh or OTel reads, plus what the image's
    ENV sets (PYTHONUNBUFFERED; KVMESH_CACHE: the image bakes the model, here the local cache)."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("KVMESH_", "OTEL_")) and k != "REDIS_URL"}  # fmt: skip
    if "KVMESH_CACHE" in os.environ:
        keep["KVMESH_CACHE"] = os.environ["KVMESH_CACHE"]
    return {**keep, "PYTHONUNBUFFERED": "1"}


def localize(value: str, hosts: dict[str, str]) -> str:
    """Compose service addresses (name:port after // or @) -> the local stand-ins."""

    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in hosts, f"no local stand-in for compose service {m.group(1)}"
        return hosts[m.group(1)]

    return re.sub(r"(?<=[/@])([a-z][a-z0-9-]*:\d+)", sub, value)


def kvmesh_argv(args: list[str]) -> list[str]:
    """The image's ENTRYPOINT (`kvmesh`) with args, as a local process."""
    return [sys.executable, "-P", "-m", "kvmesh.services.cli", *args]


def start(name: str, argv: list[str], env: dict[str, str]) -> tuple[Proc, str]:
    proc = Proc(argv, env)
    line = proc.wait_for(" ready ", timeout=STARTUP_S)
    return proc, "127.0.0.1:" + line.rsplit(":", 1)[1].strip()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    services = compose_config()["services"]
    redis_cmd = services["redis"]["command"]
    password = redis_cmd[redis_cmd.index("--requirepass") + 1]
    with RedisServer(password=password) as redis, OtlpCollector() as collector:
        hosts = {
            "redis:6379": f"127.0.0.1:{redis.port}",
            "otel-collector:4317": collector.endpoint.removeprefix("http://"),
        }
        procs: dict[str, tuple[Proc, int]] = {}
        try:
            for name, s in services.items():
                if not in_profile(s, "cpu") or kvmesh_role(s) is None:
                    continue
                env = {k: localize(str(v), hosts) for k, v in s["environment"].items()}
                # containers each have an IP; local processes share one: free ports instead
                assert {"KVMESH_PORT", "KVMESH_METRICS_PORT"} <= set(env), name
                metrics_port = free_port()
                env |= {"KVMESH_PORT": "0", "KVMESH_METRICS_PORT": str(metrics_port)}
                procs[name] = Proc(kvmesh_argv(s["command"]), {**base_env(), **env}), metrics_port
            started = {}
            for name, (proc, metrics_port) in procs.items():
                line = proc.wait_for(" ready ", timeout=STARTUP_S)
                address = "127.0.0.1:" + line.rsplit(":", 1)[1].strip()
                started[kvmesh_role(services[name])] = Service(name, proc, address, metrics_port)
            yield Mesh(redis.url, collector, started)
        finally:
            codes = {n: p.stop(signal.SIGTERM) for n, (p, _) in procs.items()}
        assert all(c in (0, None) for c in codes.values()), codes


def request(max_tokens: int, rid: str = "") -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        request_id=rid or secrets.token_hex(4), prompt="The three primary colors are",
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
    )  # fmt: skip


async def workers_at(redis_url: str) -> dict[str, str]:
    """address -> worker id of every registered worker."""
    return {w["address"].rsplit(":", 1)[1]: w["worker_id"] for w in
            (await snapshot(redis_url))["workers"]}  # fmt: skip


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


def healthcheck(address: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK script against a process."""
    script = COMPOSE_DIR / "healthcheck.py"
    env = {**base_env(), "KVMESH_PORT": port_of(address)}
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)


def test_cpu_profile_serves_a_traced_request(mesh: Mesh) -> None:
    result = asyncio.run(generate(mesh.gateway, request(8, "compose-1")))
    assert (result.code, result.finish_reason, len(result.tokens)) == (grpc.StatusCode.OK,
                                                                        "length", 8)  # fmt: skip
    ids = asyncio.run(workers_at(mesh.redis_url))
    assert (
        result.trailers["kvmesh-prefill-worker"] == ids[port_of(mesh.services["prefill"].address)]
    )
    assert result.trailers["kvmesh-decode-worker"] == ids[port_of(mesh.services["decode"].address)]

    def trace_of_request(spans: list) -> set[str]:
        roots = {s.trace_id for s in spans if s.attributes.get("kvmesh.request_id") == "compose-1"}
        return {s.service_name for s in spans if s.trace_id in roots}

    roles = {"kvmesh-gateway", "kvmesh-prefill", "kvmesh-decode"}
    spans = mesh.collector.wait_for(lambda spans: trace_of_request(spans) >= roles, timeout=15)
    assert len({s.trace_id for s in spans if s.service_name in roles}) == 1

    for role, service in mesh.services.items():
        check = healthcheck(service.address)
        assert (check.returncode, check.stdout.split()[-1]) == (0, "SERVING"), check.stderr
        url = f"http://127.0.0.1:{service.metrics_port}/metrics"
        exported = urllib.request.urlopen(url, timeout=5).read().decode()
        for name in hpa_metrics(role) if role != "gateway" else {"kvmesh_requests_in_flight"}:
            assert re.search(rf"^{name}\{{", exported, re.M), (role, name)


def test_late_workers_join_and_a_stopped_worker_drains(mesh: Mesh) -> None:
    docs = manifests()
    env = {**base_env(), "REDIS_URL": mesh.redis_url}  # REDIS_URL and nothing else of ours
    late = {}
    for role in ("prefill", "decode"):
        argv = kvmesh_argv([*container(docs, role)["args"], "--host", "127.0.0.1", "--port", "0"])
        late[role] = Proc(argv, env)
    try:
        addresses = {r: "127.0.0.1:" + p.wait_for(" ready ", STARTUP_S).rsplit(":", 1)[1].strip()
                     for r, p in late.items()}  # fmt: skip
        asyncio.run(_joins(mesh, addresses))
        decoders = [
            mesh.services["decode"],
            Service("late-decode", late["decode"], addresses["decode"], -1),
        ]
        stopped = asyncio.run(_drains(mesh, decoders))
        assert stopped.proc.proc.wait(60) == 0, "\n".join(stopped.proc.lines[-20:])
    finally:
        for proc in late.values():
            proc.stop(signal.SIGTERM)


async def _joins(mesh: Mesh, addresses: dict[str, str]) -> None:
    """Concurrent requests spread over both pools until each late worker has served some."""
    ids = await workers_at(mesh.redis_url)
    late_ids = {role: ids[port_of(a)] for role, a in addresses.items()}
    served: dict[str, set[str]] = {"prefill": set(), "decode": set()}
    deadline = time.monotonic() + 30
    while not all(late_ids[r] in served[r] for r in served):
        assert time.monotonic() < deadline, (late_ids, served)
        results = await asyncio.gather(*(generate(mesh.gateway, request(4)) for _ in range(4)))
        for r in results:
            assert r.code == grpc.StatusCode.OK, r.details
            for role in served:
                served[role].add(r.trailers[f"kvmesh-{role}-worker"])


async def _drains(mesh: Mesh, decoders: list[Service]) -> Service:
    """SIGTERM the decode worker serving a long stream: the stream finishes, new requests go to
    the other decode worker, the stopped one reports NOT_SERVING, leaves Redis and exits 0."""
    long_tokens = 100  # ~8 s on a busy CPU: the drain has to overlap it
    stream = asyncio.create_task(
        generate(mesh.gateway, request(long_tokens, "drain-me"), timeout=STREAM_TIMEOUT_S)
    )
    busy: list[Service] = []
    while not busy:
        await asyncio.sleep(0.05)
        assert not stream.done(), "the stream ended before it was seen running"
        states = {s.worker_id: s for s in await inspect_all(mesh.redis_url)}
        ids = await workers_at(mesh.redis_url)
        busy = [d for d in decoders if states[ids[port_of(d.address)]].running]
    (victim,) = busy
    victim_id = (await workers_at(mesh.redis_url))[port_of(victim.address)]
    victim.proc.proc.send_signal(signal.SIGTERM)
    check = await asyncio.to_thread(healthcheck, victim.address)
    assert check.stdout.split()[-1] == "NOT_SERVING" and check.returncode == 1, check
    assert not stream.done(), "the stream must still be running during the drain"
    meanwhile = await generate(mesh.gateway, request(4))
    assert meanwhile.code == grpc.StatusCode.OK, meanwhile.details
    assert meanwhile.trailers["kvmesh-decode-worker"] != victim_id
    drained = await stream
    logs = {name: proc.lines[-15:] for name, proc in
            (("victim", victim.proc), ("gateway", mesh.services["gateway"].proc))}  # fmt: skip
    assert (drained.code, drained.finish_reason, len(drained.tokens)) == (
        grpc.StatusCode.OK, "length", long_tokens), (drained.details, logs)  # fmt: skip
    assert drained.trailers["kvmesh-decode-worker"] == victim_id
    assert victim_id not in (await workers_at(mesh.redis_url)).values()
    return victim


def test_interpolation() -> None:
    env = {"A": "a", "E": ""}
    cases = {"${A}": "a", "${B:-d}": "d", "${E:-d}": "d", "${E-d}": "", "$$A": "$A", "$A/x": "a/x"}
    assert {k: interpolate(k, env) for k in cases} == cases
    with pytest.raises(ValueError, match="need B"):
        interpolate("${B:?need B}", env)
