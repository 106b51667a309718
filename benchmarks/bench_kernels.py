"""GPU benchmark of kernels/ against the card's ceilings and torch's own implementations.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--sweep] [--results benchmarks/RESULTS.md]

Ceilings are measured in the same run: device copy bandwidth (read + write bytes / time) and bf16
matmul TFLOP/s. Times are triton.testing.do_bench medians. The table is printed and written to
the "Kernels" section of the results file (card, date, commit).
"""

import argparse
import datetime
import functools
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.decode_attention import DecodeTuning, decode_attention, decode_attention_ref
from kernels.prefill_attention import _prefill_tuned, prefill_attention
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rope import Llama3RopeScaling, apply_rope, apply_rope_ref, rope_cos_sin

BF16 = torch.bfloat16
DEV = "cuda"


def ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


@dataclass
class Row:
    op: str
    impl: str
    time_ms: float
    rate: float  # TFLOP/s or GB/s
    unit: str
    of_ceiling: float  # fraction of the matching ceiling
    target: str = ""

    def line(self) -> str:
        return (
            f"| {self.op} | {self.impl} | {self.time_ms:.4f} | {self.rate:,.1f} {self.unit} "
            f"| {100 * self.of_ceiling:.0f}% | {self.target} |"
        )


def ceilings() -> tuple[float, float]:
    x = torch.empty(1 << 29, dtype=torch.uint8, device=DEV).random_()  # 512 MiB
    y = torch.empty_like(x)
    copy_gbs = 2 * x.numel() / ms(lambda: y.copy_(x)) / 1e6
    a = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    b = torch.randn(8192, 8192, dtype=BF16, device=DEV)
    mm_tflops = 2 * 8192**3 / ms(lambda: a @ b) / 1e9
    return copy_gbs, mm_tflops


def paged(ctx: int, batch: int, page: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """A shuffled paged cache holding `batch` contexts of `ctx` tokens: (kv_layer, table)."""
    nblk = batch * ctx // page
    kv = torch.randn(2, nblk + 16, page, kv_heads, dim, dtype=BF16, device=DEV)
    table = torch.randperm(nblk, device=DEV).view(batch, ctx // page).int()
    return kv, table


def bench_prefill(rows: list[Row], mm: float) -> None:
    seq, heads, kv_heads, dim = 4096, 32, 8, 128
    flops = 2 * seq * seq * dim * heads  # 4 * S^2 * D * H / 2 (causal)
    kv, table = paged(seq, 1, 16, kv_heads, dim)
    q = torch.randn(seq, heads, dim, dtype=BF16, device=DEV)
    cu = torch.tensor([0, seq], dtype=torch.int32, device=DEV)
    lens = torch.tensor([seq], dtype=torch.int32, device=DEV)
    scale = dim**-0.5

    def add(impl: str, t: float, target: str = "") -> None:
        rows.append(Row("prefill attn causal 4k, 32q/8kv, d128", impl, t, flops / t / 1e9,
                        "TFLOP/s", flops / t / 1e9 / mm, target))  # fmt: skip

    # torch: contiguous [1, H, S, D] K/V (no paging), GQA expanded up front
    qt = q.transpose(0, 1).unsqueeze(0)
    k = kv[0][table[0].long()].flatten(0, 1).transpose(0, 1).repeat_interleave(4, 0).unsqueeze(0)
    v = kv[1][table[0].long()].flatten(0, 1).transpose(0, 1).repeat_interleave(4, 0).unsqueeze(0)
    for name, backend in [("torch SDPA flash", SDPBackend.FLASH_ATTENTION),
                          ("torch SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)]:  # fmt: skip
        try:
            with sdpa_kernel(backend):
                t = ms(lambda: F.scaled_dot_product_attention(qt, k, v, is_causal=True))
            add(name, t)
        except RuntimeError as exc:
            print(f"{name}: unavailable ({str(exc).splitlines()[0]})")
    args = (q, kv[0], kv[1], table, cu, lens, scale)
    add("kvmesh Triton (paged)", ms(lambda: prefill_attention(*args)), ">= 350 TFLOP/s, > SDPA")
    print("prefill autotune pick:", _prefill_tuned.best_config)
    timings = getattr(_prefill_tuned, "configs_timings", None) or {}
    for cfg, t in sorted(timings.items(), key=lambda kv_: kv_[1][0]):
        print(f"  {cfg}: {t[0]:.4f} ms = {flops / t[0] / 1e9:.0f} TFLOP/s")


def bench_decode(rows: list[Row], copy_gbs: float, sweep: bool) -> None:
    batch, ctx, heads, kv_heads, dim, page = 64, 4096, 32, 8, 128, 16
    kv, table = paged(ctx, batch, page, kv_heads, dim)
    q = torch.randn(batch, heads, dim, dtype=BF16, device=DEV)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    nbytes = 2 * batch * ctx * kv_heads * dim * 2  # K and V read once

    def add(impl: str, t: float, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row("paged decode attn b64 ctx4k blk16", impl, t, gbs, "GB/s",
                        gbs / copy_gbs, target))  # fmt: skip

    kc = kv[0][table.long()].flatten(1, 2).transpose(1, 2).contiguous()  # [B, Hk, S, D]
    vc = kv[1][table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qs = q.unsqueeze(2)
    add("torch SDPA, contiguous cache",
        ms(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)))  # fmt: skip
    scale = dim**-0.5
    args = (q, kv[0], kv[1], table, lens, scale)
    add("torch gather + SDPA (ref)", ms(lambda: decode_attention_ref(*args)))
    add("kvmesh Triton (paged)", ms(lambda: decode_attention(*args)), ">= 75% of copy")
    if sweep:
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3, 4):
                    for min_split in (256, 512):
                        tn = DecodeTuning(block_n=bn, num_warps=warps, num_stages=stages,
                                          min_split=min_split)  # fmt: skip
                        t = ms(functools.partial(decode_attention, *args, tuning=tn))
                        print(f"  decode {tn}: {t:.4f} ms = {nbytes / t / 1e6:,.0f} GB/s")


def bench_fused(rows: list[Row], copy_gbs: float) -> None:
    tokens, hidden = 8192, 4096

    def add(op: str, impl: str, t: float, nbytes: int, target: str = "") -> None:
        gbs = nbytes / t / 1e6
        rows.append(Row(op, impl, t, gbs, "GB/s", gbs / copy_gbs, target))

    x = torch.randn(tokens, hidden, dtype=BF16, device=DEV)
    res = torch.randn_like(x)
    w = torch.randn(hidden, dtype=BF16, device=DEV)
    nbytes = 4 * x.numel() * 2  # read x, residual; write normed, new residual
    op = "rms-norm + residual 8192x4096"
    add(op, "torch eager", ms(lambda: rms_norm_ref(x, w, 1e-5, res)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: rms_norm(x, w, 1e-5, res)), nbytes, ">= 80% of copy")

    heads, kv_heads, dim = 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=BF16, device=DEV)
    qv = qkv[:, : heads * dim].view(tokens, heads, dim)
    kv = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    cos_sin = rope_cos_sin(dim, 8192, 500000.0, scaling, DEV)
    pos = torch.randperm(8192, device=DEV)[:tokens]
    nbytes = 2 * (qv.numel() + kv.numel()) * 2 + tokens * dim * 4  # q, k in + out; cos/sin rows
    op = "rope q+k in place 8192x(32+8)x128"
    add(op, "torch eager", ms(lambda: apply_rope_ref(qv, kv, pos, cos_sin)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: apply_rope(qv, kv, pos, cos_sin)), nbytes,
        ">= 80% of copy")  # fmt: skip

    gu = torch.randn(tokens, 2 * hidden, dtype=BF16, device=DEV)
    nbytes = 3 * tokens * hidden * 2
    op = "silu-and-mul 8192x(2x4096)"
    add(op, "torch eager", ms(lambda: silu_and_mul_ref(gu)), nbytes)
    add(op, "kvmesh Triton", ms(lambda: silu_and_mul(gu)), nbytes, ">= 80% of copy")


def commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the '## Kernels' section of the results file, keeping the others."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find("## Kernels")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time every decode tuning variant")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    card = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    copy_gbs, mm = ceilings()
    rows = [
        Row("ceiling: device copy (read+write)", "torch copy_ 512 MiB", 0, copy_gbs, "GB/s", 1),
        Row("ceiling: bf16 matmul 8192^3", "torch matmul (cuBLAS)", 0, mm, "TFLOP/s", 1),
    ]
    bench_prefill(rows, mm)
    bench_decode(rows, copy_gbs, args.sweep)
    bench_fused(rows, copy_gbs)
    header = [
        "## Kernels",
        "",
        f"Card: {card}; date: {date}; commit: {commit()}; {versions}.",
        "Command: `PYTHONPATH=. python benchmarks/bench_kernels.py`. Times: do_bench medians (ms).",
        "% = of the ceiling measured in the same run (bf16 matmul for attention prefill, "
        "device copy bandwidth for the rest).",
        "",
        "| op | implementation | ms | rate | % of ceiling | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    section = "\n".join(header + [r.line() for r in rows]) + "\n"
    print(section)
    write_section(args.results, section)


if __name__ == "__main__":
    main()
