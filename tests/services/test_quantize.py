"""`kvmesh quantize` as users run it (a subprocess, the default model): it ranks the projections,
keeps the most sensitive, writes a checkpoint that loads bit for bit as quantizing at load, and
a mesh (`kvmesh up --model DIR`: real gateway, prefill and decode processes and Redis) serves it
with the tokens an in-process engine gives."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from meshproc import Mesh, generate
from weights import assert_same_weights

from kvmesh.protos import gateway_pb2
from kvmesh.shared.control.redis_server import RedisServer
from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.loader import load_model
from kvmesh.shared.model.tensors import PROJECTIONS

# the fixture's `kvmesh quantize` ranks 120 projections on CPU: minutes on a busy machine
pytestmark = pytest.mark.timeout(900)
KEEP = 2
# the calibration text: one window, just above linear.MAX_M rows so FP8 runs as it prefills
CALIB_TOKENS = 72


@dataclass
class Quantized:
    path: Path
    stdout: str


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    out = tmp_path_factory.mktemp("quantize") / "smollm2-fp8"
    argv = [sys.executable, "-P", "-m", "kvmesh.services.cli", "quantize", "--scheme", "fp8",
            "--keep", str(KEEP), "--calib-tokens", str(CALIB_TOKENS),
            "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=os.environ)
    assert done.returncode == 0, done.stdout + done.stderr
    return Quantized(out, done.stdout)


def _kept(q: Quantized) -> frozenset[str]:
    """The projections the checkpoint keeps unquantized, from its `ignore` list."""
    ignore = json.loads((q.path / "config.json").read_text())["quantization_config"]["ignore"]
    linears = {hf: name for name, parts in PROJECTIONS.items() for hf in parts}
    return frozenset(
        f"layers.{n.split('.')[2]}.{linears[n.split('.', 3)[3]]}" for n in ignore if n != "lm_head"
    )


def test_ranking_table_and_summary(quantized: Quantized) -> None:
    lines = quantized.stdout.splitlines()
    assert lines[0].split() == ["rank", "projection", "KL", "(nats)", "kept"]
    rows = [line.split() for line in lines[1:] if line.lstrip()[:1].isdigit()]
    assert len(rows) == 30 * len(PROJECTIONS)  # every projection of SmolLM2's 30 layers
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    kls = [float(r[2]) for r in rows]
    assert kls == sorted(kls, reverse=True) and kls[-1] >= 0
    assert [r[3:] for r in rows[:KEEP]] == [["yes"]] * KEEP and all(
        len(r) == 3 for r in rows[KEEP:]
    )
    assert {r[1] for r in rows[:KEEP]} == _kept(quantized)
    assert lines[-1].startswith(f"{quantized.path}: fp8 (compressed-tensors, float-quantized)")


def test_checkpoint_loads_as_quantized_at_load(quantized: Quantized) -> None:
    cpu = torch.device("cpu")
    loaded = load_model(str(quantized.path), torch.float32, cpu)
    at_load = load_model("", torch.float32, cpu, quantization="fp8", keep=_kept(quantized))
    assert_same_weights(loaded.weights, at_load.weights)
    assert loaded.tokenizer_source == quantized.path  # the tokenizer travels with it


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def test_mesh_serves_the_checkpoint(quantized: Quantized, redis_url: str) -> None:
    """`kvmesh up --model DIR` generates greedily what Engine(EngineConfig(model=DIR)) does, a
    raw prompt and a chat one, each request alone so both run the same batches."""
    engine = Engine(EngineConfig(model=str(quantized.path)))
    assert engine.tokenizer is not None
    requests = [
        gateway_pb2.GenerateRequest(request_id="raw", prompt="The capital of France is",
                                    max_tokens=12),
        gateway_pb2.GenerateRequest(request_id="chat", max_tokens=12),
    ]  # fmt: skip
    requests[1].messages.add(role="user", content="Name three colours.")
    expected = []
    for r in requests:
        prompt = (
            engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": "Name three colours."}]
            )
            if r.messages
            else engine.tokenizer.encode(r.prompt)
        )
        engine.add_request(r.request_id, prompt, SamplingParams(max_tokens=r.max_tokens))
        tokens: list[int] = []
        while engine.has_work:
            for out in engine.step():
                tokens += out.new_token_ids
        expected.append(tokens)

    mesh = Mesh.start(redis_url, "--model", str(quantized.path))
    try:
        for r, want in zip(requests, expected, strict=True):
            got = asyncio.run(generate(mesh.address, r))
            assert got.code.name == "OK", got.details
            assert got.tokens == want and len(want) > 0, r.request_id
    finally:
        mesh.proc.interrupt()
