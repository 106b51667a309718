"""Issue 7's speed figures: the kvmesh engine against HF transformers (same run) and the floors.

    python benchmarks/bench_speed.py [--skip-hf] [--skip-compile] [--skip-engine] [--mesh]
        [--results benchmarks/RESULTS.md]
    on a CPU (smoke test): python benchmarks/bench_speed.py --model synthetic:tiny \
        --device cpu --quick

Workload: a synthetic model (seeded random weights: the cost of the trained model of that shape,
default Llama-3-8B), bf16, prompts of 512 random token ids, 128 new tokens, greedy, ignore_eos.

  * ceilings, measured first: device copy bandwidth (bytes read + written) and matmul TFLOP/s;
  * HF transformers `generate` on LlamaForCausalLM of the same shape (random bf16 weights): eager,
    and static cache + torch.compile (generate compiles the decode step, mode reduce-overhead;
    warm-up runs keep compilation out of the timings). TPOT = (time of 128 new tokens - time of
    1) / 127. Each runs in a child process, so an error or a crash there becomes the row's text;
  * the kvmesh Engine: a batch of requests added at once; once every sequence has its first
    token, the steps in which all of them decode are timed (up to the first that finishes):
    TPOT = time / steps, decode tok/s = tokens / time; the median of 3 runs. Prefill: add one
    2,048-token request and step to its first token, median of 5. Host time outside GPU work:
    the GPU's idle time per decode step at batch 64 = TPOT - GPU busy time per step (union of
    kernel intervals in a profiled run, torch.profiler with CUDA activity only);
  * floors: a decode step reads every weight but the embedding table, plus the KV of every cached
    token, at the copy bandwidth; a prefill does its matmul and attention FLOPs at the matmul rate;
  * --mesh (2 GPUs): `kvmesh up --prefill 1 --decode 1 --device cuda` (round robin: prefill on
    cuda:0, decode on cuda:1), the batch-64 workload through `kvmesh bench` against the gateway,
    and the same workload against the in-process engine on cuda:0 (same client, same run).

The table is printed; a complete single-GPU run also writes it to the "Speed" section
of benchmarks/RESULTS.md (card, date, commit). Other runs write only with --results.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]

from common import (  # noqa: E402
    commit,
    copy_bandwidth_gbs,
    matmul_tflops,
    synchronize,
    table,
    write_section,
)

from kvmesh.kernels.pdl import pdl_enabled  # noqa: E402
from kvmesh.shared.engine.engine import Engine, EngineConfig  # noqa: E402
from kvmesh.shared.engine.sequence import SamplingParams  # noqa: E402
from kvmesh.shared.model.config import SHAPES, ModelConfig  # noqa: E402

T = TypeVar("T")
SECTION = "## Speed"
HF_TAG = "HF_RESULT "
HF_MODES = {
    "eager": "HF eager",
    "static": "HF static cache + torch.compile",
    # the peers of --quantization: torchao's quantize_ on the same model, static cache + compile
    "torchao-int8": "HF + torchao int8 weight-only, static + compile",
    "torchao-fp8": "HF + torchao float8 dynamic (per row), static + compile",
}


@dataclass(frozen=True)
class Plan:
    model: str = "synthetic:llama3-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    prompt: int = 512  # tokens per prompt
    new_tokens: int = 128
    batches: tuple[int, int, int] = (1, 64, 256)  # latency, versus HF, throughput
    prefill_tokens: int = 2048
    repeats: int = 5  # prefill timings; the median is reported
    decode_repeats: int = 3  # decode runs per batch; the median TPOT is reported
    max_batched_tokens: int = 8192
    quantization: str = "none"  # EngineConfig.quantization
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype

    @property
    def shape(self) -> ModelConfig:
        return SHAPES[self.model.removeprefix("synthetic:")]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def element_size(self) -> int:
        return self.engine_config().torch_dtype.itemsize

    def engine_config(self, device: str | None = None) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            device=device or self.device,
            dtype=self.dtype,
            max_num_seqs=max(self.batches),
            max_num_batched_tokens=max(self.max_batched_tokens, self.prefill_tokens),
            quantization=self.quantization,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def prompts(self, n: int, length: int, seed: int | str) -> list[list[int]]:
        rng = random.Random(seed)
        vocab = self.shape.vocab_size
        return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


QUICK = {"prompt": 64, "new_tokens": 16, "batches": (1, 8, 16), "prefill_tokens": 256, "repeats": 3}


# ------------------------------------------------------------------------------------ floors


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # bytes read + written per second / 1e9
    matmul_tflops: float


def measure_ceilings(plan: Plan) -> Ceilings:
    dtype = plan.engine_config().torch_dtype
    copy = copy_bandwidth_gbs(1 << 30 if plan.cuda else 1 << 28, device=plan.device)
    mm = matmul_tflops(8192 if plan.cuda else 1024, dtype, device=plan.device)
    return Ceilings(copy, mm)


def decode_floor_s(plan: Plan, ceil: Ceilings, batch: int, context: float) -> float:
    """A decode step reads every weight but the embedding table (its rows are gathered) and the
    K and V of every cached token of every sequence: bytes / copy bandwidth."""
    s, elt = plan.shape, plan.element_size
    weights = s.num_parameters() - (0 if s.tie_embeddings else s.vocab_size * s.hidden_size)
    nbytes = weights * elt + s.kv_bytes_per_token(elt) * batch * context
    return nbytes / (ceil.copy_gbs * 1e9)


def prefill_floor_s(plan: Plan, ceil: Ceilings, tokens: int) -> float:
    """Matmul FLOPs of every layer for every token, causal attention (QK^T and PV over half the
    square), one row of logits, at the measured matmul rate."""
    s = plan.shape
    per_token = (
        s.num_layers * s.hidden_size * (2 * s.q_size + 2 * s.kv_size + 3 * s.intermediate_size)
    )
    attention = s.num_layers * 2 * tokens**2 * s.q_size
    flops = 2 * tokens * per_token + attention + 2 * s.hidden_size * s.vocab_size
    return flops / (ceil.matmul_tflops * 1e12)


# -------------------------------------------------------------------------- HF transformers


@dataclass(frozen=True)
class HfResult:
    batch: int
    tpot_ms: float | None = None
    one_s: float | None = None  # generate of 1 new token
    full_s: float | None = None  # generate of new_tokens new tokens
    error: str = ""


def hf_model(shape: ModelConfig, dtype: torch.dtype, device: str) -> Any:
    """LlamaForCausalLM of this shape with HF's own random init, built on the device in dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling is not None:
        r = shape.rope_scaling
        rope |= {
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position,
        }
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position,
        rms_norm_eps=shape.rms_eps,
        tie_word_embeddings=shape.tie_embeddings,
        rope_parameters=rope,
        bos_token_id=shape.bos_token_id,
        eos_token_id=list(shape.eos_token_ids),
        pad_token_id=0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def hf_generate_s(model: Any, ids: torch.Tensor, new_tokens: int, static: bool) -> float:
    """Seconds of one greedy `generate` of exactly new_tokens tokens (EOS suppressed)."""
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": 0,
    }
    if static:
        from transformers import CompileConfig

        config = CompileConfig()  # generate's default: inductor, mode "reduce-overhead"
        # compile on CPU too (smoke test); a private flag of CompileConfig
        config._compile_all_devices = ids.device.type != "cuda"  # type: ignore[assignment]
        kwargs |= {"cache_implementation": "static", "compile_config": config}
    synchronize(ids.device)
    start = time.perf_counter()
    model.generate(ids, **kwargs)
    synchronize(ids.device)
    return time.perf_counter() - start


def hf_timings(model: Any, plan: Plan, batch: int, static: bool) -> HfResult:
    ids = torch.tensor(plan.prompts(batch, plan.prompt, seed=batch), device=plan.device)
    n = plan.new_tokens
    hf_generate_s(model, ids, 1, static)  # warm-up: kernels, allocator
    one = hf_generate_s(model, ids, 1, static)
    for _ in range(2 if static else 0):  # compilation, then CUDA graph recording
        hf_generate_s(model, ids, n, static)
    full = min(hf_generate_s(model, ids, n, static) for _ in range(2 if static else 1))
    if static and not compiled_graphs():
        raise RuntimeError("generate did not compile the decode step")
    return HfResult(batch, (full - one) / (n - 1) * 1e3, one, full)


def compiled_graphs() -> int:
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def hf_child(job: str) -> None:
    """Child process: time one HF mode at each batch, one HF_RESULT json line per batch."""
    spec = json.loads(job)
    plan = Plan(**{**spec["plan"], "batches": tuple(spec["plan"]["batches"])})
    static = spec["mode"] != "eager"

    def emit(result: HfResult) -> None:
        print(HF_TAG + json.dumps(asdict(result)), flush=True)

    try:
        model = hf_model(plan.shape, plan.engine_config().torch_dtype, plan.device)
        if spec["mode"].startswith("torchao-"):
            torchao_quantize(model, spec["mode"].removeprefix("torchao-"))
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        for batch in spec["batches"]:
            emit(HfResult(batch, error=f"building the model: {describe(exc)}"))
        return
    for batch in spec["batches"]:
        try:
            emit(hf_timings(model, plan, batch, static))
        except Exception as exc:  # noqa: BLE001 (reported in the table)
            emit(HfResult(batch, error=describe(exc)))
        gc.collect()
        if plan.cuda:
            torch.cuda.empty_cache()


def torchao_quantize(model: Any, scheme: str) -> None:
    """torchao's quantization of every decoder nn.Linear (lm_head kept, as kvmesh keeps it)."""
    from torch import nn
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    config = (
        Int8WeightOnlyConfig()
        if scheme == "int8"
        else Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    )

    def decoder_linear(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and "lm_head" not in name

    quantize_(model, config, filter_fn=decoder_linear)


def describe(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def run_hf(plan: Plan, mode: str, batches: list[int], timeout_s: float) -> dict[int, HfResult]:
    """Run hf_child in a child process; batches it did not report get its exit as the error."""
    job = json.dumps({"mode": mode, "batches": batches, "plan": asdict(plan)})
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--hf-child", job],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    results: dict[int, HfResult] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith(HF_TAG):
                result = HfResult(**json.loads(line[len(HF_TAG) :]))
                results[result.batch] = result
                log(
                    f"  {HF_MODES[mode]}, batch {result.batch}: "
                    + (f"TPOT {result.tpot_ms:.2f} ms" if result.tpot_ms else result.error)
                )
            else:
                tail = [*tail[-30:], line.rstrip()]
    finally:
        proc.wait()
        timer.cancel()
    if len(results) < len(batches):
        why = f"timed out after {timeout_s:.0f} s" if expired.is_set() else "exited"
        why += f" ({proc.returncode})"
        log("\n".join(f"  [hf] {t}" for t in tail))
        last = next((t for t in reversed(tail) if t.strip()), "")
        for batch in batches:
            results.setdefault(batch, HfResult(batch, error=f"child {why}: {last[:160]}"))
    return results


def hf_part(plan: Plan, skip_compile: bool) -> dict[str, dict[int, HfResult]]:
    b1, mid = plan.batches[0], plan.batches[1]
    out = {"eager": run_hf(plan, "eager", [b1, mid], timeout_s=300)}
    if skip_compile:
        skipped = "skipped (--skip-compile)"
        out["static"] = {b: HfResult(b, error=skipped) for b in (b1, mid)}
        return out
    # one process per batch: a second batch size in the same process would recompile the
    # decode step with dynamic shapes
    out["static"] = {}
    for batch in (b1, mid):
        out["static"] |= run_hf(plan, "static", [batch], timeout_s=300)
    return out


# ---------------------------------------------------------------------------- kvmesh engine


@dataclass(frozen=True)
class Decode:
    batch: int
    steps: int  # decode steps timed: every sequence computed one token in each
    tokens: int  # tokens those steps returned
    seconds: float
    context: float  # mean tokens per sequence over those steps
    gpu_busy_s: float | None = None  # union of kernel intervals over those steps (profiled)
    kernels: tuple[tuple[str, float, int], ...] = ()  # profiled: (name, seconds, launches)

    @property
    def tpot_s(self) -> float:
        return self.seconds / self.steps

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def decode(engine: Engine, plan: Plan, batch: int, tag: str, profile: bool = False) -> Decode:
    """Add `batch` requests; step until each has its first token (prefill, with the decodes of
    sequences already started); then time the steps up to the first that finishes a sequence."""
    params = SamplingParams(max_tokens=plan.new_tokens, ignore_eos=True)
    for i, prompt in enumerate(plan.prompts(batch, plan.prompt, seed=tag)):
        engine.add_request(f"{tag}-{i}", prompt, params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step())
    steps = tokens = context = 0
    profiler = kernel_profiler() if profile and plan.cuda else contextlib.nullcontext()
    with profiler as prof:
        synchronize(plan.device)
        start = time.perf_counter()
        finished = False
        while engine.has_work and not finished:
            outputs = engine.step()
            steps, tokens = steps + 1, tokens + len(outputs)
            context += sum(o.num_prompt_tokens + o.num_output_tokens for o in outputs)
            finished = any(o.finished for o in outputs)
        synchronize(plan.device)
        seconds = time.perf_counter() - start
    while engine.has_work:  # the tail, untimed
        engine.step()
    if not steps or not tokens:
        raise RuntimeError(f"batch {batch}: no decode step left to time")
    if prof is None:
        return Decode(batch, steps, tokens, seconds, context / tokens)
    spans = device_spans(prof)
    return Decode(batch, steps, tokens, seconds, context / tokens, busy_s(spans), by_name(spans))


def kernel_profiler() -> torch.profiler.profile:
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])


Span = tuple[float, float, str]  # start, end (microseconds), kernel / copy / memset name


def device_spans(prof: torch.profiler.profile) -> list[Span]:
    """What ran on the device during a profiled run."""
    from torch.autograd import DeviceType

    with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle"
        warnings.simplefilter("ignore")
        events = prof.events()
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type == DeviceType.CUDA)  # fmt: skip


def exclusive_s(spans: list[Span]) -> list[tuple[str, float]]:
    """(name, seconds) of each span, counting only time no earlier span covers. With PDL a
    kernel's span opens while its predecessor still runs (it waits on chip), so its own span
    would count that wait twice; clipped, the seconds add up to the device's busy time."""
    out, reach = [], float("-inf")
    for start, end, name in spans:  # sorted by start
        out.append((name, max(0.0, end - max(start, reach)) / 1e6))
        reach = max(reach, end)
    return out


def busy_s(spans: list[Span]) -> float | None:
    """Seconds in which at least one kernel, copy or memset ran on the device."""
    return sum(t for _, t in exclusive_s(spans)) if spans else None


def by_name(spans: list[Span]) -> tuple[tuple[str, float, int], ...]:
    """(name, exclusive seconds, launches) per kernel name, the most time first."""
    seconds: dict[str, float] = collections.defaultdict(float)
    launches: collections.Counter[str] = collections.Counter()
    for name, t in exclusive_s(spans):
        seconds[name] += t
        launches[name] += 1
    return tuple(sorted(((n, t, launches[n]) for n, t in seconds.items()), key=lambda r: -r[1]))


def prefill_s(engine: Engine, plan: Plan) -> float:
    """Median seconds from adding one prefill_tokens-token request to its first token."""
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for r in range(plan.repeats + 1):  # the first is a warm-up (autotuning at this length)
        prompt = plan.prompts(1, plan.prefill_tokens, seed=1000 + r)[0]  # no prefix reuse
        synchronize(plan.device)
        start = time.perf_counter()
        engine.add_request(f"prefill-{r}", prompt, params)
        while engine.has_work:
            engine.step()
        synchronize(plan.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def warm_up(engine: Engine, plan: Plan, batch: int) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(plan.prompts(batch, plan.prompt, seed=-batch)):
        engine.add_request(f"warm{batch}-{i}", prompt, params)
    while engine.has_work:
        engine.step()


@dataclass(frozen=True)
class EngineFigures:
    startup_s: float
    decodes: dict[int, Decode]
    host: Decode  # the profiled run at the middle batch
    prefill_s: float


def engine_part(plan: Plan) -> EngineFigures:
    start = time.perf_counter()
    engine = Engine(plan.engine_config())
    startup = time.perf_counter() - start
    log(f"  engine up in {startup:.1f} s")
    for batch in plan.batches:
        warm_up(engine, plan, batch)
    decodes = {}
    for batch in plan.batches:
        runs = [decode(engine, plan, batch, f"b{batch}-{r}") for r in range(plan.decode_repeats)]
        decodes[batch] = d = sorted(runs, key=lambda run: run.tpot_s)[len(runs) // 2]
        log(
            f"  batch {batch}: TPOT {d.tpot_s * 1e3:.2f} ms, {d.tok_s:,.0f} tok/s "
            f"({d.steps} steps, context {d.context:.0f})"
        )
    host = decode(engine, plan, plan.batches[1], "host", profile=True)
    prefill = prefill_s(engine, plan)
    log(f"  prefill {plan.prefill_tokens} tokens: {prefill * 1e3:.2f} ms")
    engine.check_integrity()
    del engine
    release_memory(plan)
    return EngineFigures(startup, decodes, host, prefill)


def release_memory(plan: Plan) -> None:
    gc.collect()
    if plan.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class MeshFigures:
    mesh_tpot_ms: float  # p50 over requests, measured by the client
    colocated_tpot_ms: float  # the same workload on the in-process engine
    errors: int


def mesh_preflight(plan: Plan) -> None:
    """Fail before any timing if the mesh cannot start here."""
    try:
        import grpc  # noqa: F401
        import redis  # noqa: F401

        from kvmesh.shared.control.redis_server import RedisServerError, find_binary
    except ImportError as exc:
        raise SystemExit(f"--mesh: a mesh dependency is missing: {exc}") from exc
    try:
        find_binary()
    except RedisServerError as exc:
        raise SystemExit(f"--mesh: {exc}") from exc
    if plan.cuda and torch.cuda.device_count() < 2:
        raise SystemExit(
            f"--mesh needs 2 GPUs (prefill on cuda:0, decode on cuda:1); "
            f"this machine has {torch.cuda.device_count()}"
        )


def mesh_part(plan: Plan) -> MeshFigures:
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from meshproc import start_mesh

    from kvmesh.services.bench import Workload, bench_engine, bench_mesh, percentile
    from kvmesh.shared.control.redis_server import RedisServer

    batch = plan.batches[1]
    workload = Workload(batch, batch, plan.prompt, plan.new_tokens)
    config = plan.engine_config("cuda:0" if plan.cuda else plan.device)
    warmup = Workload(4, 4, plan.prompt, 4)  # both sides alike
    colocated = asyncio.run(bench_engine(config, workload, progress=False, warmup=warmup))
    log(f"  colocated engine: TPOT p50 {percentile(colocated.tpot, 0.5) * 1e3:.2f} ms")
    release_memory(plan)
    args = [
        "--prefill",
        "1",
        "--decode",
        "1",
        "--model",
        plan.model,
        "--dtype",
        plan.dtype,
        "--device",
        "cuda" if plan.cuda else plan.device,  # round robin: P cuda:0, D cuda:1
        "--max-seqs",
        str(config.max_num_seqs),
        "--max-batched-tokens",
        str(config.max_num_batched_tokens),
        "--max-inflight",
        str(max(64, batch)),
    ]
    env = {
        "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
    }
    with RedisServer() as server:
        mesh, address = start_mesh(server.url, *args, extra_env=env)
        try:
            log(f"  mesh up, gateway at {address}")
            asyncio.run(bench_mesh(address, warmup, progress=False))
            report = asyncio.run(bench_mesh(address, workload, progress=False))
        finally:
            mesh.stop()
    mesh_ms = percentile(report.tpot, 0.5) * 1e3
    log(f"  mesh: TPOT p50 {mesh_ms:.2f} ms, {report.errors} errors")
    for why, n in report.failures.most_common(3):
        log(f"    {n} x {why}")
    return MeshFigures(mesh_ms, percentile(colocated.tpot, 0.5) * 1e3, report.errors)


# ------------------------------------------------------------------------------------ table

HEAD = ("figure", "kvmesh", "HF eager", "HF static+compile", "floor", "target", "met")
Row = tuple[str, ...]  # one cell per HEAD column


def num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def met(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def hf_cell(result: HfResult | None, tok_s_batch: int | None = None) -> str:
    """TPOT in ms, or tok/s at tok_s_batch, or the error."""
    if result is None:
        return "-"
    if result.tpot_ms is None:
        return result.error[:70]
    return num(tok_s_batch * 1e3 / result.tpot_ms, 0) if tok_s_batch else num(result.tpot_ms)


def hf_tok_s(result: HfResult | None) -> float | None:
    if result is None or result.tpot_ms is None:
        return None
    return result.batch * 1e3 / result.tpot_ms


def decode_rows(
    plan: Plan, ceil: Ceilings, eng: EngineFigures | None, hf: dict[str, dict[int, HfResult]]
) -> list[Row]:
    b1, mid, big = plan.batches
    rows: list[Row] = []

    def decode_of(batch: int) -> tuple[Decode | None, float]:
        d = eng.decodes[batch] if eng else None
        context = d.context if d else plan.prompt + plan.new_tokens / 2
        return d, decode_floor_s(plan, ceil, batch, context)

    def hf_of(mode: str, batch: int) -> HfResult | None:
        return hf.get(mode, {}).get(batch)

    def tpot_row(batch: int, bound_ms: float, target: str) -> tuple[Decode | None, float]:
        """The TPOT row of a batch against the HF baselines; (its figures, its floor)."""
        d, floor = decode_of(batch)
        tpot = d.tpot_s * 1e3 if d else None
        rows.append(
            (
                f"TPOT batch {batch} (ms)",
                num(tpot),
                hf_cell(hf_of("eager", batch)),
                hf_cell(hf_of("static", batch)),
                num(floor * 1e3),
                target,
                met(tpot <= bound_ms if tpot else None),
            )
        )
        return d, floor

    tpot_row(b1, 6.0, "<= 6.0 ms")
    bound = 1.25 * decode_of(mid)[1] * 1e3
    d, floor = tpot_row(mid, bound, f"<= 1.25x floor = {bound:.2f} ms")
    tok_s, base = (d.tok_s if d else None), hf_tok_s(hf_of("static", mid))
    want = f">= 3.5x HF static+compile = {3.5 * base:,.0f}" if base else "3.5x HF static+compile"
    rows.append(
        (
            f"decode tok/s batch {mid}",
            num(tok_s, 0),
            hf_cell(hf_of("eager", mid), mid),
            hf_cell(hf_of("static", mid), mid),
            num(mid / floor, 0),
            want,
            met(tok_s >= 3.5 * base if tok_s and base else None),
        )
    )
    d, floor = decode_of(big)
    rows.append(
        (
            f"TPOT batch {big} (ms)",
            num(d.tpot_s * 1e3 if d else None),
            "-",
            "-",
            num(floor * 1e3),
            "",
            "",
        )
    )
    tok_s = d.tok_s if d else None
    rows.append(
        (
            f"decode tok/s batch {big}",
            num(tok_s, 0),
            "-",
            "-",
            num(big / floor, 0),
            ">= 14,000",
            met(tok_s >= 14000 if tok_s else None),
        )
    )
    return rows


def engine_rows(plan: Plan, ceil: Ceilings, eng: EngineFigures | None) -> list[Row]:
    floor = prefill_floor_s(plan, ceil, plan.prefill_tokens) * 1e3
    prefill = eng.prefill_s * 1e3 if eng else None
    rows: list[Row] = [
        (
            f"prefill {plan.prefill_tokens:,} tokens (ms)",
            num(prefill),
            "-",
            "-",
            num(floor),
            f"<= 49 ms (1.3x floor = {1.3 * floor:.1f} ms)",
            met(prefill <= 49 if prefill else None),
        )
    ]
    idle = host_idle_ms(eng)
    rows.append(
        (
            f"host time outside GPU work per step, batch {plan.batches[1]} (ms)",
            num(idle, 3),
            "-",
            "-",
            "0",
            "<= 0.5 ms",
            met(idle <= 0.5 if idle is not None else None),
        )
    )
    return rows


def host_idle_ms(eng: EngineFigures | None) -> float | None:
    """Unprofiled TPOT minus the profiled GPU busy time per step, at the same batch."""
    if eng is None or eng.host.gpu_busy_s is None:
        return None
    busy = eng.host.gpu_busy_s / eng.host.steps
    return max(eng.decodes[eng.host.batch].tpot_s - busy, 0.0) * 1e3


def mesh_rows(plan: Plan, mesh: MeshFigures | str | None) -> list[Row]:
    label = f"TPOT p50 batch {plan.batches[1]}, mesh on 2 GPUs (ms)"
    if mesh is None:
        return []
    if isinstance(mesh, str):
        return [(label, mesh[:70], "-", "-", "-", "<= 1.1x colocated", "")]
    bound = 1.1 * mesh.colocated_tpot_ms
    return [
        (
            f"TPOT p50 batch {plan.batches[1]}, colocated engine, same client (ms)",
            num(mesh.colocated_tpot_ms),
            "-",
            "-",
            "-",
            "",
            "",
        ),
        (
            label,
            num(mesh.mesh_tpot_ms),
            "-",
            "-",
            "-",
            f"<= 1.1x colocated = {bound:.2f} ms",
            met(mesh.mesh_tpot_ms <= bound and not mesh.errors),
        ),
    ]


# ---------------------------------------------------------------------------------- section


def card(plan: Plan) -> str:
    if plan.cuda:
        return torch.cuda.get_device_name(plan.device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers"):
        with contextlib.suppress(ImportError):
            out.append(f"{name} {__import__(name).__version__}")
    return ", ".join(out)


def notes(
    plan: Plan,
    eng: EngineFigures | None,
    hf: dict[str, dict[int, HfResult]],
    mesh: MeshFigures | str | None,
    seconds: dict[str, float],
) -> list[str]:
    took = ", ".join(f"{name} {t:.0f} s" for name, t in seconds.items())
    out = [f"- Run time: {took}."]
    if eng:
        windows = ", ".join(
            f"batch {d.batch}: {d.steps} steps at context {d.context:.0f}"
            for d in eng.decodes.values()
        )
        out.append(
            f"- Engine start-up (weights, KV cache, graphs): {eng.startup_s:.1f} s. "
            f"Timed decode steps: {windows}. Programmatic dependent launch (kernels/pdl.py): "
            f"{'on' if pdl_enabled(torch.device('cuda')) else 'off (KVMESH_PDL=0)'}."
        )
        h = eng.host
        if h.gpu_busy_s is not None:
            out.append(
                f"- Host: GPU busy {h.gpu_busy_s / h.steps * 1e3:.3f} ms per decode step "
                f"at batch {h.batch} (profiled run; wall {h.tpot_s * 1e3:.3f} ms per step "
                f"under the profiler); idle = unprofiled TPOT - busy."
            )
            top = "; ".join(f"{name[:48]} {t / h.steps * 1e6:.0f} us ({n / h.steps:.0f})"
                            for name, t, n in h.kernels[:10])  # fmt: skip
            out.append(f"- Where a batch-{h.batch} step goes (profiled; per step: time no "
                       f"earlier kernel overlaps (launches)): {top}.")  # fmt: skip
    out += [f"- {HF_MODES[m]}, batch {r.batch}: {hf_note(plan, r)}" for m, by_batch in hf.items()
            for r in by_batch.values()]  # fmt: skip
    if isinstance(mesh, MeshFigures) and mesh.errors:
        out.append(f"- Mesh: {mesh.errors} requests failed.")
    elif isinstance(mesh, str):
        out.append(f"- Mesh: {mesh}")
    return out


def hf_note(plan: Plan, r: HfResult) -> str:
    if r.one_s is None or r.full_s is None:
        return r.error
    return f"generate of 1 token {r.one_s:.3f} s, of {plan.new_tokens} tokens {r.full_s:.3f} s"


def section(plan: Plan, ceil: Ceilings, rows: list[Row], extra: list[str], skipped: str) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python benchmarks/bench_speed.py", *sys.argv[1:]])
    lines = [
        SECTION,
        "",
        f"Card: {card(plan)}; date: {date}; commit: {commit()}; {versions()}.",
        f"Command: `{command}`{skipped}. Method: see the script's docstring.",
        f"Workload: {plan.model} (random weights), {plan.dtype}, prompts of {plan.prompt} random "
        f"token ids, {plan.new_tokens} new tokens, greedy, ignore_eos.",
        f"Ceilings measured in this run: device copy {ceil.copy_gbs:,.0f} GB/s (read+write), "
        f"{plan.dtype} matmul {ceil.matmul_tflops:,.1f} TFLOP/s; floors use them.",
        "",
        table(rows, HEAD),
    ]
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


# -------------------------------------------------------------------------------------- main


# ------------------------------------------------------------------ --quantization (issue 27)

QUANT_SECTION = "## Quantization speed"
QUANT_TARGETS = {  # (TPOT batch 1 ms, decode tok/s at the middle batch vs bf16, prefill ms)
    "fp8": ("<= 3.0", ">= 1.6x", "<= 30"),
    "int8": ("<= 3.2", "", ""),
}


def weight_bytes(plan: Plan) -> int:
    """Bytes of weight a decode step reads: the decoder projections in the plan's format (one
    byte a code plus a float32 scale a row when quantized), lm_head and the norms in its dtype;
    not the embedding table (its rows are gathered)."""
    s, elt = plan.shape, plan.element_size
    rows = s.q_size + 2 * s.kv_size + s.hidden_size + 2 * s.intermediate_size + s.hidden_size
    per_layer = s.hidden_size * (s.q_size + 2 * s.kv_size + 2 * s.intermediate_size)
    per_layer += s.q_size * s.hidden_size + s.intermediate_size * s.hidden_size
    layers = per_layer * elt if plan.quantization == "none" else per_layer + rows * 4
    other = (s.vocab_size + 2 * s.num_layers + 1) * s.hidden_size * elt
    return s.num_layers * layers + other


def quant_floor_s(plan: Plan, ceil: Ceilings, batch: int, context: float) -> float:
    kv_elt = 1 if plan.kv_cache_dtype == "fp8" else plan.element_size
    kv = plan.shape.kv_bytes_per_token(kv_elt) * batch * context
    return (weight_bytes(plan) + kv) / (ceil.copy_gbs * 1e9)


def long_context_s(plan: Plan, requests: int, context: int) -> tuple[float, int]:
    """Seconds to serve `requests` requests of context - new_tokens prompt tokens and
    new_tokens new ones (prefill included), and the most sequences running at once."""
    config = dataclasses.replace(plan.engine_config(), max_num_seqs=requests,
                                 max_num_batched_tokens=8192)  # fmt: skip
    engine = Engine(config)
    params = SamplingParams(max_tokens=plan.new_tokens, ignore_eos=True)
    prompts = plan.prompts(requests, context - plan.new_tokens, seed="long")
    synchronize(plan.device)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"long-{i}", prompt, params)
    most = 0
    while engine.has_work:
        outputs = engine.step()
        most = max(most, max((o.step_batch_size for o in outputs), default=0))
    synchronize(plan.device)
    seconds = time.perf_counter() - start
    engine.check_integrity()
    del engine
    release_memory(plan)
    return seconds, most


def quant_part(plan: Plan, ceil: Ceilings, schemes: list[str], peers: bool, kv: bool) -> str:
    """The engine in bf16 and in each scheme (same run), torchao's peers, the FP8 KV cache at
    long contexts; the section's text."""
    b1, mid, big = plan.batches
    figures: dict[str, EngineFigures | str] = {}
    for scheme in ("none", *schemes):
        log(f"kvmesh engine, quantization {scheme} ...")
        try:
            figures[scheme] = engine_part(dataclasses.replace(plan, quantization=scheme))
        except Exception as exc:  # noqa: BLE001 (the other rows still count)
            figures[scheme] = describe(exc)
            log(f"  failed: {figures[scheme]}")
            release_memory(plan)
    base = figures["none"]
    rows = []
    for scheme, fig in figures.items():
        if isinstance(fig, str):
            rows.append((scheme, fig, "", "", "", "", ""))
            continue
        q = dataclasses.replace(plan, quantization=scheme)
        d1, dm, db = fig.decodes[b1], fig.decodes[mid], fig.decodes[big]
        floor1 = quant_floor_s(q, ceil, b1, d1.context)
        ratio = "" if isinstance(base, str) else f"{dm.tok_s / base.decodes[mid].tok_s:.2f}x"
        target = QUANT_TARGETS.get(scheme, ("", "", ""))
        rows.append((
            "bf16" if scheme == "none" else scheme,
            f"{d1.tpot_s * 1e3:.2f} (floor {floor1 * 1e3:.2f}; {target[0]})",
            f"{dm.tok_s:,.0f} ({ratio} bf16; {target[1]})",
            f"{db.tok_s:,.0f}" + (" (>= 25,000)" if scheme == "fp8" else ""),
            f"{fig.prefill_s * 1e3:.1f}" + (f" ({target[2]})" if target[2] else ""),
            f"{weight_bytes(q) / 1e9:.2f}",
            f"{fig.startup_s:.0f}",
        ))  # fmt: skip
    text = [
        QUANT_SECTION,
        "",
        f"{card(plan)}; {datetime.date.today()}; commit {commit()}; {plan.model}, prompt "
        f"{plan.prompt}, {plan.new_tokens} new tokens, greedy; `python benchmarks/bench_speed.py "
        f"--quantization {','.join(schemes)}`. Copy {ceil.copy_gbs:,.0f} GB/s.",
        "",
        table(
            rows,
            (
                "weights",
                f"TPOT b{b1} ms",
                f"tok/s b{mid}",
                f"tok/s b{big}",
                f"prefill {plan.prefill_tokens} ms",
                "GB read/step",
                "start s",
            ),
        ),  # fmt: skip
    ]
    if peers:
        peer_rows = []
        for scheme in schemes:
            results: dict[int, HfResult] = {}
            for batch in (b1, mid):  # one process per batch (static shapes)
                results |= run_hf(plan, f"torchao-{scheme}", [batch], timeout_s=600)
            fig = figures.get(scheme)
            for batch, r in sorted(results.items()):
                ours = fig.decodes[batch].tpot_s * 1e3 if isinstance(fig, EngineFigures) else None
                vs = f"{r.tpot_ms / ours:.2f}x" if r.tpot_ms and ours else ""
                peer_rows.append((HF_MODES[f"torchao-{scheme}"], str(batch),
                                  hf_cell(r), num(ours), vs))  # fmt: skip
        text += ["", table(peer_rows, ("peer", "batch", "peer TPOT ms", "kvmesh TPOT ms",
                                       "peer / kvmesh"))]  # fmt: skip
    if kv:
        requests, context = big, 4096
        kv_rows = []
        base_tok_s = None
        for dtype in ("auto", "fp8"):
            q = dataclasses.replace(plan, quantization=schemes[0], kv_cache_dtype=dtype)
            log(f"long contexts, kv cache {dtype} ...")
            try:
                seconds, most = long_context_s(q, requests, context)
            except Exception as exc:  # noqa: BLE001
                kv_rows.append((dtype, describe(exc), "", ""))
                release_memory(plan)
                continue
            tok_s = requests * plan.new_tokens / seconds
            base_tok_s = base_tok_s or tok_s
            kv_rows.append((dtype, f"{tok_s:,.0f}", f"{tok_s / base_tok_s:.2f}x", str(most)))
        text += ["", f"{requests} requests of {context} tokens ({plan.new_tokens} new), weights "
                 f"{schemes[0]}; output tok/s over the whole run (prefill included); target fp8 "
                 ">= 1.3x:", "",
                 table(kv_rows, ("KV cache", "output tok/s", "vs model dtype",
                                 "most running at once"))]  # fmt: skip
    return "\n".join(text) + "\n"


def log(message: str) -> None:
    print(message, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=Plan.model, help="a synthetic:<shape> model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small workload (prompt 64, 16 new tokens, batches 1/8/16)",
    )
    p.add_argument("--skip-hf", action="store_true", help="no HF transformers baselines")
    p.add_argument("--skip-compile", action="store_true", help="no HF static+compile baseline")
    p.add_argument("--skip-engine", action="store_true", help="no single-GPU engine figures")
    p.add_argument("--mesh", action="store_true", help="also the 2-GPU mesh figure")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results file to write (default: benchmarks/RESULTS.md for a complete "
        "single-GPU run, else none)",
    )
    p.add_argument(
        "--quantization",
        default="",
        help="comma list of fp8,int8: the engine in bf16 and in each (same run) instead of the "
        "standard table; with --peers torchao's too, with --kv-fp8 the long-context FP8 KV rows",
    )
    p.add_argument("--peers", action="store_true", help="--quantization: torchao peers")
    p.add_argument("--kv-fp8", action="store_true", help="--quantization: FP8 KV at long context")
    p.add_argument("--hf-child", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def make_plan(args: argparse.Namespace) -> Plan:
    if not args.model.startswith("synthetic:"):
        raise SystemExit("--model must be synthetic:<shape> (HF builds the same shape)")
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    plan = Plan(model=args.model, device=args.device, dtype=dtype)
    if args.quick:
        plan = Plan(**{**{f.name: getattr(plan, f.name) for f in fields(plan)}, **QUICK})
    if plan.cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --model synthetic:tiny)")
    return plan


def main() -> None:
    args = parse_args()
    if args.hf_child:
        hf_child(args.hf_child)
        return
    plan = make_plan(args)
    if args.mesh:
        mesh_preflight(plan)
    seconds: dict[str, float] = {}

    def part(name: str, fn: Callable[[], T]) -> T:
        log(f"{name} ...")
        start = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[name] = time.perf_counter() - start

    ceil = part("ceilings", lambda: measure_ceilings(plan))
    release_memory(plan)
    log(f"  copy {ceil.copy_gbs:,.0f} GB/s, matmul {ceil.matmul_tflops:,.1f} TFLOP/s")
    if args.quantization:
        schemes = args.quantization.split(",")
        text = quant_part(plan, ceil, schemes, args.peers, args.kv_fp8)
        log("\n" + text)
        target = args.results or (ROOT / "benchmarks" / "RESULTS.md" if plan.cuda else None)
        if target is not None and not args.quick:
            write_section(target, text)
            log(f"written to {target}")
        return
    hf = {} if args.skip_hf else part("HF transformers", lambda: hf_part(plan, args.skip_compile))
    eng = None if args.skip_engine else part("kvmesh engine", lambda: engine_part(plan))
    mesh: MeshFigures | str | None = None
    if args.mesh:
        try:
            mesh = part("mesh (prefill cuda:0, decode cuda:1)", lambda: mesh_part(plan))
        except Exception as exc:  # noqa: BLE001 (the other figures still count)
            mesh = describe(exc)
            log(f"  mesh failed: {exc}")
    rows = decode_rows(plan, ceil, eng, hf) + engine_rows(plan, ceil, eng) + mesh_rows(plan, mesh)
    flags = {"HF": args.skip_hf, "HF compile": args.skip_compile, "engine": args.skip_engine}
    skips = [name for name, skipped in flags.items() if skipped]
    skipped = f" (skipped: {', '.join(skips)})" if skips else ""
    text = section(plan, ceil, rows, notes(plan, eng, hf, mesh, seconds), skipped)
    log("\n" + text)
    complete = plan.cuda and not args.quick and not skips
    target = args.results or (ROOT / "benchmarks" / "RESULTS.md" if complete else None)
    if target is None:
        log("not written to a results file (partial, quick or CPU run; pass --results to write)")
    else:
        write_section(target, text)
        log(f"written to {target}")


if __name__ == "__main__":
    main()
