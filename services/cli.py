"""The `kvmesh` command line. Flags and environment are parsed here, and only here."""

from __future__ import annotations

import argparse
import os
import sys

from shared.engine import EngineConfig, Role
from shared.sequence import SamplingParams


def _engine_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--model",
        default=env("KVMESH_MODEL", ""),
        help="model source (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--device", default=env("KVMESH_DEVICE", "cpu"), help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype",
        default=env("KVMESH_DTYPE", ""),
        help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument("--block-size", type=int, default=int(env("KVMESH_BLOCK_SIZE", "16")))
    p.add_argument(
        "--max-batched-tokens", type=int, default=int(env("KVMESH_MAX_BATCHED_TOKENS", "512"))
    )
    p.add_argument("--max-seqs", type=int, default=int(env("KVMESH_MAX_SEQS", "64")))
    p.add_argument(
        "--kv-cache-mb",
        type=int,
        default=int(env("KVMESH_KV_CACHE_MB", "256")),
        help="KV cache budget on CPU (MiB)",
    )
    p.add_argument(
        "--gpu-memory-fraction",
        type=float,
        default=float(env("KVMESH_GPU_MEMORY_FRACTION", "0.85")),
    )


def engine_config(args: argparse.Namespace, role: Role) -> EngineConfig:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return EngineConfig(
        model=args.model,
        role=role,
        device=args.device,
        dtype=dtype,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_batched_tokens,
        max_num_seqs=args.max_seqs,
        kv_cache_bytes=args.kv_cache_mb << 20,
        gpu_memory_fraction=args.gpu_memory_fraction,
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.local:
        from services.local_generate import generate_local

        return generate_local(
            engine_config(args, Role.COLOCATED), args.prompt, args.chat, sampling_params(args)
        )
    from services.client import generate_remote

    return generate_remote(args.addr, args.prompt, args.chat, sampling_params(args), args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion from a mesh (or --local)")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--addr", default=os.environ.get("KVMESH_GATEWAY", "127.0.0.1:50051"))
    _engine_args(gen)
    _sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"kvmesh: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
