"""The mesh on one GPU against the in-process engine, in one run, on one card.

    python benchmarks/bench_one_card.py [--model synthetic:llama3-8b --requests 256
        --concurrency 64 --prompt 512 --new-tokens 128 --gil-switch-ms 5,0.5]

Three ways to serve the same workload (token-id prompts, exactly `new_tokens` each, the
`kvmesh bench` client):
  * engine: the engine in this process (no gRPC, no Redis): the baseline;
  * aggregated: `kvmesh up --aggregated 1` (gateway -> one worker that prefills and decodes);
  * disaggregated: `kvmesh up --prefill 1 --decode 1` on the same card (the KV handed off by
    whatever transport the prefill picks there: CUDA IPC on one card).
Prints output tok/s (ratio to the engine), TTFT and TPOT p50/p99 and errors, and the floor of
a decode step at the workload's batch (weights + KV read once at the measured copy rate).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

from common import copy_bandwidth_gbs, header, table  # noqa: E402
from meshproc import start_mesh  # noqa: E402

from kvmesh.services.bench import Report, Workload, bench_engine, bench_mesh, percentile  # noqa: E402
from kvmesh.shared.control.redis_server import RedisServer  # noqa: E402
from kvmesh.shared.engine.engine import EngineConfig  # noqa: E402
from kvmesh.shared.model.config import SHAPES  # noqa: E402

MESHES = {
    "aggregated": ("--aggregated", "1"),
    "disaggregated": ("--prefill", "1", "--decode", "1"),
}


def serve_mesh(
    flags: tuple[str, ...], args: argparse.Namespace, workload: Workload, switch_ms: str
) -> Report:
    common = ("--model", args.model, "--device", args.device, "--max-seqs", str(args.concurrency),
              "--max-inflight", str(args.concurrency))  # fmt: skip
    with RedisServer() as server:
        mesh, address = start_mesh(
            server.url, *flags, *common, extra_env={"KVMESH_GIL_SWITCH_MS": switch_ms}
        )
        try:
            asyncio.run(bench_mesh(address, Workload(8, 8, args.prompt, 4), progress=False))
            return asyncio.run(bench_mesh(address, workload, progress=False))
        finally:
            mesh.stop()


def row(name: str, report: Report, base: Report | None) -> tuple[str, ...]:
    tok_s = report.output_tokens / report.seconds
    ratio = f"{tok_s / (base.output_tokens / base.seconds):.3f}x" if base else "1x"
    ms = [percentile(xs, q) * 1e3 for xs in (report.ttft, report.tpot) for q in (0.5, 0.99)]
    return (name, f"{tok_s:,.0f}", ratio, *(f"{x:.1f}" for x in ms), str(report.errors))


def decode_floor_ms(model: str, batch: int, context: int, device: str) -> float:
    """A decode step reads every weight but the embedding table (its rows are gathered) and the
    K and V of every cached token, in bf16, at the copy rate (as benchmarks/bench_speed.py)."""
    s = SHAPES[model.removeprefix("synthetic:")]
    weights = s.num_parameters() - (0 if s.tie_embeddings else s.vocab_size * s.hidden_size)
    nbytes = weights * 2 + s.kv_bytes_per_token(2) * batch * context
    return nbytes / (copy_bandwidth_gbs(device=device) * 1e9) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="synthetic:llama3-8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--meshes", default=",".join(MESHES), help="which meshes to run")
    parser.add_argument("--gil-switch-ms", default="5",
                        help="the workers' KVMESH_GIL_SWITCH_MS; several: a row each")  # fmt: skip
    args = parser.parse_args()
    workload = Workload(args.requests, args.concurrency, args.prompt, args.new_tokens)
    config = EngineConfig(
        model=args.model,
        device=f"{args.device}:0" if args.device == "cuda" else args.device,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",  # as the workers
        max_num_seqs=args.concurrency,
    )
    engine = asyncio.run(bench_engine(config, workload, progress=False,
                                      warmup=Workload(8, 8, args.prompt, 4)))  # fmt: skip
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = [row("engine in-process", engine, None)]
    print(rows[-1], flush=True)
    for name, flags in MESHES.items():
        if name not in args.meshes.split(","):
            continue
        for switch_ms in args.gil_switch_ms.split(","):
            label = f"kvmesh up {' '.join(flags)}, GIL switch {switch_ms} ms"
            try:
                rows.append(row(label, serve_mesh(flags, args, workload, switch_ms), engine))
            except Exception as exc:  # a mesh that cannot start is a row, not a lost run
                rows.append((label, f"failed: {exc}"[:120], "", "", "", "", "", ""))
            print(rows[-1], flush=True)
    floor = decode_floor_ms(
        args.model, args.concurrency, args.prompt + args.new_tokens // 2, args.device
    )
    print(header(f"one card: {args.model}, the engine vs the mesh"))
    print(f"{args.requests} requests, concurrency {args.concurrency}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; decode-step floor at batch {args.concurrency}: "
          f"{floor:.2f} ms, {args.concurrency / floor * 1e3:,.0f} tok/s\n")  # fmt: skip
    head = ("serving", "output tok/s", "vs engine", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
            "TPOT p99 ms", "errors")  # fmt: skip
    print(table(rows, head))


if __name__ == "__main__":
    main()
