"""Helpers shared by the benchmark scripts: environment header and table printing."""

from __future__ import annotations

import datetime
import platform
import subprocess
import time

import torch


def header(title: str) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (
        f"# {title}\n{datetime.date.today()}  commit {commit or '?'}  torch {torch.__version__}  "
        f"{device or platform.machine()}  {torch.get_num_threads()} threads"
    )


def table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows]  # fmt: skip
    return "\n".join([line, sep, *body])


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) on CPU or CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9
