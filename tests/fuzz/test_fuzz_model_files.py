"""Fuzzing the model files a user can point kvmesh at: GGUF files, Hugging Face safetensors
directories (plain, and compressed-tensors quantized FP8 and INT8) and their config.json.

Tiny valid inputs are built here (a Llama of 2 layers, hidden 32, vocabulary 48) and mutated
with a seeded random.Random, one per input (input i of a fuzz is reproducible on its own):
bytes overwritten or a bit flipped, the file cut at a random offset, garbage inserted or
appended, a header's number fields (GGUF counts, string and array lengths, value types,
dimensions, tensor types and offsets; the safetensors header length) set to 0, huge or odd
values, and JSON values (config.json with its quantization_config, a safetensors header)
replaced by a wrong type, a negative or huge number, or removed. Every mutated input must either
load, the result sane (each tensor's shape and dtype what the config says, the config's sizes
positive), or raise ModelFileError naming the file and what is wrong: never another exception
(IndexError, KeyError, struct.error, UnicodeDecodeError, OverflowError, MemoryError, numpy's,
torch's, safetensors'), a hang (a deadline per input) or an allocation of gigabytes (the address
space is capped while fuzzing).

A full load_model of a mutated input (every tensor read, dequantized and assembled) costs a few
milliseconds, too slow for 10,000 per format in a quick run: each of the three parsers gets
FUZZ_INPUTS (10,000) mutated inputs through open_source, which runs the readers of the
untrusted bytes (the GGUF metadata and tensor index, config.json, the safetensors headers, the
quantization config), and FUZZ_LOADS (300) through load_model. A nightly run sets
KVMESH_FUZZ_INPUTS, e.g. KVMESH_FUZZ_INPUTS=1000000 (the loads scale with it: 3%, 300 at least).
The test_*_regression tests keep the inputs that broke the loader before it was fixed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import re
import resource
import shutil
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvmesh.kernels.quant import QuantizedWeight
from kvmesh.shared.model.checkpoint import write_checkpoint
from kvmesh.shared.model.config import ModelConfig
from kvmesh.shared.model.loader import LoadedModel, load_model, open_source
from kvmesh.shared.model.source import ModelFileError

FUZZ_INPUTS = int(os.environ.get("KVMESH_FUZZ_INPUTS", "10000"))  # per parser
FUZZ_LOADS = max(300, FUZZ_INPUTS * 3 // 100)
CPU = torch.device("cpu")
DEADLINE_S = 10.0  # for one input; a valid one parses in a millisecond, loads in a few
MEMORY_CAP = 2 << 30  # bytes of address space a fuzz may map beyond what it started with

H, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 2, 2, 1, 16, 64, 48

# ------------------------------------------------------------------------------ valid inputs


def _tensors(seed: int) -> dict[str, np.ndarray]:
    """A tiny Llama's tensors by Hugging Face name, float32."""
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "model.embed_tokens.weight": (VOCAB, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (VOCAB, H),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (FFN, H),
            p + "mlp.up_proj.weight": (FFN, H),
            p + "mlp.down_proj.weight": (H, FFN),
        }
    return {
        name: (
            1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)
        ).astype(np.float32)
        for name, s in shapes.items()
    }


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def write_gguf(path: Path) -> Path:
    """A tiny Llama GGUF as llama.cpp lays one out: tied embeddings, the vocabulary as
    tokenizer arrays (strings and float32), norms in F32, attention in F16, the MLP in Q8_0."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_scores([-float(i) for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, array in _tensors(0).items():
        if name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            linear, suffix = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_GGUF_NAMES[linear]}.{suffix}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight"}[name]  # fmt: skip
        if array.ndim == 1:
            w.add_tensor(gname, array)
        elif "mlp" in name:
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, array.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_dir(path: Path) -> Path:
    """A tiny Llama as a Hugging Face directory: config.json and model.safetensors (bf16,
    untied lm_head, llama3 rope scaling)."""
    path.mkdir()
    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _tensors(1).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": FFN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 3],
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The valid inputs: a .gguf file and HF directories plain, fp8 and int8."""
    root = tmp_path_factory.mktemp("valid")
    hf = write_hf_dir(root / "plain")
    made = {"gguf": write_gguf(root / "tiny.gguf"), "plain": hf}
    for scheme in ("fp8", "int8"):
        src = open_source(str(hf), torch.float32, CPU)
        made[scheme] = write_checkpoint(src, root / scheme, scheme, frozenset({"layers.1.o"})).path
    return made


# --------------------------------------------------------------------------------- the checks


def config_problems(c: ModelConfig) -> list[str]:
    """What is insane about a config that loaded: sizes not positive ints, heads that do not
    divide, norms' epsilon or rope theta not a positive float, token ids not ids."""
    sizes = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "intermediate_size", "vocab_size", "max_position")  # fmt: skip
    bad = [f"{s}={getattr(c, s)!r}" for s in sizes
           if type(getattr(c, s)) is not int or getattr(c, s) <= 0]  # fmt: skip
    if not bad and (c.num_heads % c.num_kv_heads or c.head_dim % 2):
        bad.append(f"heads {c.num_heads}/{c.num_kv_heads}, head_dim {c.head_dim}")
    for name in ("rope_theta", "rms_eps"):
        value = getattr(c, name)
        if type(value) is not float or not 0 < value < math.inf:
            bad.append(f"{name}={value!r}")
    ids = [*c.eos_token_ids, *([] if c.bos_token_id is None else [c.bos_token_id])]
    return bad + [f"token id {t!r}" for t in ids if type(t) is not int or t < 0]


def model_problems(m: LoadedModel, dtype: torch.dtype) -> list[str]:
    """What is insane about a model that loaded: each tensor's shape and dtype against the
    config's (a quantized projection: its codes' shape and one float32 scale a row)."""
    c = m.config
    if bad := config_problems(c):
        return bad
    if len(m.weights.layers) != c.num_layers:
        return [f"{len(m.weights.layers)} layers, the config says {c.num_layers}"]
    hidden, ffn = c.hidden_size, c.intermediate_size
    want: list[tuple[str, Any, tuple[int, ...] | None]] = [
        ("embed", m.weights.embed, (c.vocab_size, hidden)),
        ("lm_head", m.weights.lm_head, (c.vocab_size, hidden)),
        ("norm", m.weights.norm, (hidden,) if c.tie_embeddings else None),
    ]
    for i, layer in enumerate(m.weights.layers):
        want += [
            (f"layers.{i}.qkv", layer.qkv, (c.q_size + 2 * c.kv_size, hidden)),
            (f"layers.{i}.o", layer.o, (hidden, c.q_size)),
            (f"layers.{i}.gate_up", layer.gate_up, (2 * ffn, hidden)),
            (f"layers.{i}.down", layer.down, (hidden, ffn)),
            (f"layers.{i}.qkv_gain", layer.qkv_gain,
             (hidden,) if isinstance(layer.qkv, QuantizedWeight) else None),
            (f"layers.{i}.gate_up_gain", layer.gate_up_gain,
             (hidden,) if isinstance(layer.gate_up, QuantizedWeight) else None),
        ]  # fmt: skip
    bad = []
    for name, w, shape in want:
        if isinstance(w, QuantizedWeight):
            assert shape is not None
            if tuple(w.codes.shape) != shape or tuple(w.scale.shape) != (shape[0], 1):
                bad.append(f"{name}: codes {list(w.codes.shape)}, scale {list(w.scale.shape)}")
            elif w.scale.dtype != torch.float32:
                bad.append(f"{name}: scale {w.scale.dtype}")
        elif (None if w is None else tuple(w.shape)) != shape:
            bad.append(f"{name}: {None if w is None else list(w.shape)}, expected {shape}")
        elif w is not None and w.dtype != dtype:
            bad.append(f"{name}: {w.dtype}, expected {dtype}")
    return bad


def parse(source: Path) -> list[str]:
    """open_source of `source` (the readers of its untrusted bytes): its config's problems."""
    return config_problems(open_source(str(source), torch.float32, CPU).config)


def load(source: Path) -> list[str]:
    """load_model of `source` (every tensor read too): its problems."""
    return model_problems(load_model(str(source), torch.float32, CPU), torch.float32)


def assert_names(e: ModelFileError, source: Path) -> None:
    """The error names the model file (`source`, or a file inside the directory `source`) and
    says what is wrong with it."""
    path = Path(e.path)
    assert path == source or source in path.parents, f"{e} does not name {source}"
    assert str(e).startswith(f"{path}: ") and len(e.problem) >= 10, f"{e}: what is wrong?"


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    def expire(*_: object) -> None:
        raise AssertionError(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def memory_capped() -> Iterator[None]:
    """The address space capped at what the process maps now plus MEMORY_CAP: an allocation of
    gigabytes is a MemoryError (which the fuzz reports as leaked), not a swapping machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        cap = int(f.read().split()[0]) * resource.getpagesize() + MEMORY_CAP
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else
                                            min(cap, hard), hard))  # fmt: skip
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fuzz(
    name: str, n: int, mutate: Callable[[random.Random], Path], attempt: Callable[[Path], list[str]]
) -> Counter[str]:
    """`attempt` (the problems of what loaded) on `n` inputs, input i written by `mutate` from
    random.Random(seed + i) and its model source returned. Each loads sane or raises a
    ModelFileError naming the source; returns the outcomes counted: 'loaded' or 'refused:
    <the problem, numbers as N, cut short>'."""
    seed = int.from_bytes(name.encode()[:8], "little")
    outcomes: Counter[str] = Counter()
    with memory_capped():
        for i in range(n):
            what = f"{name} input {i} (random.Random({seed} + {i}))"
            source = mutate(random.Random(seed + i))
            try:
                with deadline(DEADLINE_S, what):
                    problems = attempt(source)
            except ModelFileError as e:
                assert_names(e, source)
                outcomes["refused: " + re.sub(r"\d+", "N", e.problem)[:60]] += 1
                continue
            except Exception as e:
                raise AssertionError(f"{what}: {type(e).__name__} leaked: {e}") from e
            assert not problems, f"{what}: loaded, insane: {problems}"
            outcomes["loaded"] += 1
    return outcomes


def check_mix(outcomes: Counter[str], n: int) -> None:
    """The fuzz reached both sides: some inputs load, more are refused, for several reasons."""
    assert sum(outcomes.values()) == n
    assert n // 200 < outcomes["loaded"] < 0.9 * n, outcomes
    assert len(outcomes) > 5, outcomes


# ---------------------------------------------------------------------------------- mutations

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, -(2**31), 2**31, 2**63, 2**64, 10**30, 1.5, -0.0, 1e308,
    float("nan"), float("inf"), "", "32", "llama3", "F16", "BF16", "I32", "F8_E4M3", "U8", [],
    [0], [1, 2, 3], [2**40, 2], {}, {"rope_type": "llama3"},
]  # fmt: skip


def odd_number(rng: random.Random, size: int, old: int) -> int:
    """An unsigned `size`-byte value a corrupt header might hold instead of `old`."""
    top = (1 << (8 * size)) - 1
    return rng.choice([0, 1, 2, old + 1, old - 1, old * 2, old << 16, top, top >> 1,
                       top >> 8, 1 << (8 * size - 1), rng.randrange(top)]) & top  # fmt: skip


def mutate_bytes(
    rng: random.Random, data: bytes, hot: int, numbers: list[tuple[int, int]]
) -> bytes:
    """`data` with 1 to 3 mutations, most of them within the first `hot` bytes (the header;
    0: anywhere); `numbers`: the (offset, size) of the header's little-endian number fields."""
    buf = bytearray(data)

    def at(end: int) -> int:  # an offset in [0, end], mostly in the header
        return rng.randrange(max(min(hot, end) if hot and rng.random() < 0.85 else end + 1, 1))

    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        end = len(buf)
        kind = rng.randrange(7)
        if kind == 0 and numbers:
            offset, size = rng.choice(numbers)
            old = int.from_bytes(buf[offset : offset + size], "little")
            buf[offset : offset + size] = odd_number(rng, size, old).to_bytes(size, "little")
        elif kind == 1 and end:
            buf[at(end) % end] ^= 1 << rng.randrange(8)
        elif kind == 2 and end:
            for _ in range(rng.randint(1, 8)):
                buf[at(end) % end] = rng.randrange(256)
        elif kind == 3:
            del buf[at(end) :]
        elif kind == 4:
            i = at(end)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif kind == 5:
            i = at(end)
            del buf[i : i + rng.randint(1, 16)]
        else:
            buf += rng.randbytes(rng.randint(1, 64))
    return bytes(buf)


def json_paths(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path (keys and indices) of every value in a JSON document, the root's ()."""
    yield path
    items = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, value in items:
        yield from json_paths(value, (*path, key))


def mutate_json(rng: random.Random, doc: Any, paths: list[tuple]) -> Any:
    """A copy of `doc` with the value at one of its `paths` (json_paths) replaced by an odd one
    or a number changed, the value removed, or its key renamed."""
    doc = json.loads(json.dumps(doc))  # a deep copy, quicker
    path = rng.choice(paths)
    if not path:
        return rng.choice(ODD_VALUES)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, roll, value = path[-1], rng.random(), parent[path[-1]]
    if roll < 0.15:
        del parent[key]
    elif roll < 0.2 and isinstance(key, str):
        parent[key + "_"] = parent.pop(key)
    elif roll < 0.5 and type(value) in (int, float):
        parent[key] = rng.choice([-value, value * 1000, value + 1, value - 1, 0, 2**62])
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return doc


def gguf_layout(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """A valid GGUF file's header end (where the tensors' data starts) and the (offset, size)
    of each number of its header: counts, lengths, value types, dimensions, tensor types,
    offsets (read with gguf's own reader)."""
    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    numbers = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
                numbers += [(part.ctypes.data - base + k * part.dtype.itemsize,
                             part.dtype.itemsize) for k in range(min(part.size, 4))]  # fmt: skip
    return reader.data_offset, numbers


def mutate_safetensors(rng: random.Random, data: bytes, paths: list[tuple]) -> bytes:
    """A safetensors file with its header's JSON mutated (the header length fixed up, mostly)
    or its bytes mutated (the header length among the number fields); `paths`: the header's
    json_paths."""
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.5:
        text = json.dumps(mutate_json(rng, json.loads(data[8 : 8 + n]), paths)).encode()
        length = len(text) if rng.random() < 0.9 else odd_number(rng, 8, len(text))
        return length.to_bytes(8, "little") + text + data[8 + n :]
    return mutate_bytes(rng, data, 8 + n, [(0, 8), (0, 4), (4, 4)])


def write(path: Path, data: bytes) -> None:
    """`data` as a new file at `path` (a reader's memory map of the old file stays valid)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# -------------------------------------------------------------------------------------- fuzz


def test_guards_catch_a_hang_and_gigabytes() -> None:
    with pytest.raises(AssertionError, match="a hang"), deadline(0.05, "spinning"):
        while True:
            pass
    with memory_capped(), pytest.raises(MemoryError):
        np.ones(MEMORY_CAP + (1 << 30), np.uint8)


def test_valid_inputs_load_sane(valid: dict[str, Path]) -> None:
    """The unmutated inputs load, and the sanity checks pass them but not a wrong shape."""
    for kind, path in valid.items():
        m = load_model(str(path), torch.float16, CPU)
        assert model_problems(m, torch.float16) == [], kind
        quantized = isinstance(m.weights.layers[0].qkv, QuantizedWeight)
        assert quantized == (kind in ("fp8", "int8")), kind
    m = load_model(str(valid["plain"]), torch.float16, CPU)
    m.weights.layers[1].down = m.weights.layers[1].down[:, :-1]
    assert model_problems(m, torch.float16) == [
        f"layers.1.down: [{H}, {FFN - 1}], expected ({H}, {FFN})"
    ]
    config = copy.copy(m.config)
    object.__setattr__(config, "rms_eps", float("nan"))  # past ModelConfig's own checks
    assert config_problems(config) == ["rms_eps=nan"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN scales
def test_fuzz_gguf(valid: dict[str, Path], tmp_path: Path) -> None:
    original = valid["gguf"].read_bytes()
    hot, numbers = gguf_layout(valid["gguf"])
    path = tmp_path / "model.gguf"

    def mutate(rng: random.Random, anywhere: bool = False) -> Path:
        write(path, mutate_bytes(rng, original, 0 if anywhere else hot, numbers))
        return path

    check_mix(fuzz("gguf", FUZZ_INPUTS, mutate, parse), FUZZ_INPUTS)
    loads = fuzz("gguf load", FUZZ_LOADS, lambda rng: mutate(rng, rng.random() < 0.5), load)
    check_mix(loads, FUZZ_LOADS)


def work_dirs(valid: dict[str, Path], root: Path) -> dict[str, Path]:
    """Copies of the valid safetensors directories (plain, fp8, int8) to mutate."""
    return {k: shutil.copytree(valid[k], root / k) for k in ("plain", "fp8", "int8")}


def test_fuzz_safetensors(valid: dict[str, Path], tmp_path: Path) -> None:
    """A directory's model.safetensors mutated (plain or quantized), its config.json valid."""
    work = work_dirs(valid, tmp_path)
    originals = {k: (valid[k] / "model.safetensors").read_bytes() for k in work}
    paths = {k: list(json_paths(json.loads(d[8 : 8 + int.from_bytes(d[:8], "little")])))[1:]
             for k, d in originals.items()}  # fmt: skip

    def mutate(rng: random.Random, anywhere: bool = False) -> Path:
        kind = rng.choice(list(work))
        data = originals[kind]
        if anywhere:  # the tensors' data mostly
            data = mutate_bytes(rng, data, 0, [])
        else:
            data = mutate_safetensors(rng, data, paths[kind])
        write(work[kind] / "model.safetensors", data)
        return work[kind]

    check_mix(fuzz("safetensors", FUZZ_INPUTS, mutate, parse), FUZZ_INPUTS)
    loads = fuzz("st load", FUZZ_LOADS, lambda rng: mutate(rng, rng.random() < 0.5), load)
    check_mix(loads, FUZZ_LOADS)


def test_fuzz_config_json(valid: dict[str, Path], tmp_path: Path) -> None:
    """A directory's config.json mutated (its quantization_config too): values or text."""
    work = work_dirs(valid, tmp_path)
    originals = {k: json.loads((valid[k] / "config.json").read_text()) for k in work}
    paths = {k: list(json_paths(doc)) for k, doc in originals.items()}

    def mutate(rng: random.Random) -> Path:
        kind = rng.choice(list(work))
        doc = originals[kind]
        if rng.random() < 0.75:
            text = json.dumps(mutate_json(rng, doc, paths[kind])).encode()
        else:
            text = mutate_bytes(rng, json.dumps(doc).encode(), 0, [])
        write(work[kind] / "config.json", text)
        return work[kind]

    check_mix(fuzz("config.json", FUZZ_INPUTS, mutate, parse), FUZZ_INPUTS)
    check_mix(fuzz("config load", FUZZ_LOADS, mutate, load), FUZZ_LOADS)


# -------------------------------------------------------------------------------- regressions
# Inputs that broke the loader before it was fixed (what it raised is in each comment).


def _patched(src: Path, dst: Path, offset: int, value: int, size: int = 8) -> Path:
    data = bytearray(src.read_bytes())
    data[offset : offset + size] = value.to_bytes(size, "little")
    dst.write_bytes(data)
    return dst


def _gguf_offset(path: Path, key: str, part: int) -> int:
    """Where part `part` of the metadata field `key` of a GGUF file is (gguf's reader)."""
    reader = gguf.GGUFReader(str(path))
    return reader.fields[key].parts[part].ctypes.data - reader.data.ctypes.data


def _refused(source: Path, message: str, read: Callable[[Path], object] = load) -> None:
    with deadline(DEADLINE_S, str(source)), pytest.raises(ModelFileError) as e:
        read(source)
    assert_names(e.value, source)
    assert re.search(message, e.value.problem), e.value


def test_gguf_regressions(valid: dict[str, Path], tmp_path: Path) -> None:
    gguf_file = valid["gguf"]
    scores = _gguf_offset(gguf_file, "tokenizer.ggml.scores", 4)  # parts: key, type, item, count
    # gguf's reader looped on the claimed count past the file's end (a hang, memory growing)
    _refused(_patched(gguf_file, tmp_path / "a.gguf", scores, 2**40),
             r"4398046511104 bytes at byte \d+ run past the end of the file", parse)  # fmt: skip
    # IndexError (a read past the end gave an empty array)
    _refused(_patched(gguf_file, tmp_path / "b.gguf", 16, 2**62), "truncated", parse)
    # ValueError from numpy, naming no file (a tensor's data cut short)
    cut = tmp_path / "c.gguf"
    cut.write_bytes(gguf_file.read_bytes()[:-100])
    _refused(cut, r"tensor 'blk.1.ffn_down.weight': 2176 bytes at byte \d+ run past the end",
             parse)  # fmt: skip
    # a model whose tensors were not the config's shapes loaded (hidden size 64, tensors 32)
    hidden = _gguf_offset(gguf_file, "llama.embedding_length", 3)  # key, type, value
    _refused(_patched(gguf_file, tmp_path / "d.gguf", hidden, 64, 4),
             r"tensor model.layers.0.self_attn.q_proj.weight has shape \[32, 32\], not the "
             r"\[32, 64\] its config gives")  # fmt: skip
    # KeyError: 'llama.attention.layer_norm_rms_epsilon' (its key renamed)
    data = gguf_file.read_bytes().replace(b"layer_norm_rms_epsilon", b"layer_norm_rms_epsilom")
    (renamed := tmp_path / "e.gguf").write_bytes(data)
    _refused(renamed, "missing 'llama.attention.layer_norm_rms_epsilon'", parse)


def _edited(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("kind", "edit", "message"),
    [
        # ZeroDivisionError: integer modulo by zero
        ("plain", lambda c: c.update(num_key_value_heads=0),
         "num_kv_heads must be a positive integer below 2**31, got 0"),
        # TypeError: unsupported operand type(s) for //: 'str' and 'int'
        ("plain", lambda c: c.update(hidden_size="32", head_dim=None),
         "hidden_size must be a positive integer below 2**31, got '32'"),
        # OverflowError: Python int too large to convert to C ssize_t (tqdm, at load)
        ("plain", lambda c: c.update(num_hidden_layers=2**64),
         f"num_layers must be a positive integer below 2**31, got {2**64}"),
        # AttributeError: 'list' object has no attribute 'get'
        ("plain", lambda c: c.update(rope_scaling=["llama3"]), "rope_scaling must be a JSON obj"),
        # ValueError: could not convert string to float: 'x' (naming no file)
        ("plain", lambda c: c["rope_scaling"].update(factor="x"),
         "rope scaling's factor must be a finite number above 0, got 'x'"),
        # KeyError: 'vocab_size'
        ("plain", lambda c: c.pop("vocab_size"), "missing 'vocab_size'"),
        # loaded: a NaN epsilon, a token id that is no token
        ("plain", lambda c: c.update(rms_norm_eps=float("nan")), "rms_eps must be a finite"),
        ("plain", lambda c: c.update(eos_token_id=[2, "x"]), "token ids must be integers"),
        # AttributeError: 'list' object has no attribute 'items'
        ("fp8", lambda c: c["quantization_config"].update(config_groups=["x"]),
         "without config_groups"),
        # AttributeError: 'str' object has no attribute 'get'
        ("int8", lambda c: c["quantization_config"]["config_groups"].update(group_0="x"),
         "group_0: a config group of 'x' is not supported"),
    ],
)  # fmt: skip
def test_config_json_regressions(
    valid: dict[str, Path], tmp_path: Path, kind: str, edit: Callable[[dict], object],
    message: str,
) -> None:  # fmt: skip
    _refused(_edited(valid[kind], tmp_path / "m", edit), re.escape(message), parse)


def test_safetensors_regressions(valid: dict[str, Path], tmp_path: Path) -> None:
    # SafetensorError naming no file
    huge = shutil.copytree(valid["plain"], tmp_path / "huge")
    _patched(valid["plain"] / "model.safetensors", huge / "model.safetensors", 0, 2**63)
    _refused(huge, "header too large", parse)
    # KeyError: 'model.layers.1.mlp.up_proj.weight'
    missing = tmp_path / "missing"
    shutil.copytree(valid["plain"], missing)
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    _refused(missing, "no tensor model.layers.1.mlp.up_proj.weight")
    # a config.json that is JSON but no object: AttributeError: 'list' object has no ...
    listed = shutil.copytree(valid["plain"], tmp_path / "listed")
    (listed / "config.json").write_text("[1]")
    _refused(listed, "not a JSON object but list", parse)
