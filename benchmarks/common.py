"""Helpers shared by the benchmark scripts: environment header and table printing."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def header(title: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return (
        f"# {title}\n{datetime.date.today()}  commit {commit() or '?'}  torch {torch.__version__}  "
        f"{device or platform.machine()}  {torch.get_num_threads()} threads"
    )


def table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows]  # fmt: skip
    return "\n".join([line, sep, *body])


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5, device: str | None = None) -> float:
    """Device copy bandwidth (bytes read + written per second, GB/s) on CPU or CUDA."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                  device: str | None = None) -> float:  # fmt: skip
    """Dense n x n x n matmul rate (TFLOP/s, best of `repeats`) on CPU or CUDA."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up (cuBLAS picks its kernel)
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def commit() -> str:
    """Short HEAD commit, '+uncommitted' when the tree has changes; $GIT_COMMIT overrides."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty.stdout.strip() else "")


def write_section(path: Path, section: str) -> None:
    """Replace the results file's section with the same '## ' title as `section` (or append it),
    keeping every other section."""
    title = section.splitlines()[0]
    assert title.startswith("## "), "a section starts with its '## ' title line"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(title + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text)
