"""Quantized checkpoints on a GPU: written on the card they hold the codes written on the CPU
(the grid does not depend on the device), and an engine serving one generates what the engine
quantizing at load generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from weights import assert_same_weights

from kvmesh.shared.engine.engine import Engine, EngineConfig
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.model.checkpoint import write_checkpoint
from kvmesh.shared.model.loader import load_model, open_source

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

CUDA = torch.device("cuda")
MODEL = "synthetic:llama3.2-1b"


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_written_on_the_card_as_on_the_cpu(scheme: str, tmp_path: Path) -> None:
    for device in ("cpu", "cuda"):
        src = open_source("synthetic:tiny", torch.bfloat16, torch.device(device))
        write_checkpoint(src, tmp_path / device, scheme, frozenset({"layers.0.o"}))
    cpu, gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        a, b = cpu[name], gpu[name]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_engine_serves_a_checkpoint_as_quantized_at_load(scheme: str, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    write_checkpoint(open_source(MODEL, torch.bfloat16, CUDA), out, scheme)
    loaded = load_model(str(out), torch.bfloat16, CUDA)
    at_load = load_model(MODEL, torch.bfloat16, CUDA, quantization=scheme)
    assert_same_weights(loaded.weights, at_load.weights)
    outputs = []
    for model in (loaded, at_load):
        engine = Engine(EngineConfig(model=MODEL, device="cuda", dtype="bfloat16",
                                     num_blocks=256), model)  # fmt: skip
        for i, n in enumerate((7, 300, 1)):
            engine.add_request(str(i), list(range(3, 3 + n)),
                               SamplingParams(max_tokens=16, ignore_eos=True))  # fmt: skip
        tokens: dict[str, list[int]] = {}
        while engine.has_work:
            for o in engine.step():
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        outputs.append(tokens)
        del engine
    assert outputs[0] == outputs[1]
