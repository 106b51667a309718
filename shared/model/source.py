"""Model sources: the one string that names a model (see loader.py), told apart without loading
anything, the default model's file behind "" (fetched on first use), and the error a model file
that does not read raises."""

from __future__ import annotations

from pathlib import Path

from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig, default_model_path

SYNTHETIC_PREFIX = "synthetic:"


def is_default(source: str) -> bool:
    return source in ("", DEFAULT_MODEL)


def is_synthetic(source: str) -> bool:
    return source.startswith(SYNTHETIC_PREFIX)


def resolve_source(source: str, fetch: FetchConfig | None = None) -> str:
    """The source itself, or the default model's file (fetched on first use)."""
    return str(default_model_path(fetch)) if is_default(source) else source


class ModelFileError(ValueError):
    """A model file (a .gguf file, a checkpoint directory's config.json or safetensors) that
    does not read as a model: "<path>: <what is wrong>"."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # pickles (a worker's error)
        return type(self), (self.path, self.problem)
