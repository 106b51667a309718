"""Model sources: the one string that names a model (see loader.py), told apart without loading
anything, and the default model's file behind "" (fetched on first use)."""

from __future__ import annotations

from kvmesh.shared.model.fetch import DEFAULT_MODEL, FetchConfig, default_model_path

SYNTHETIC_PREFIX = "synthetic:"


def is_default(source: str) -> bool:
    return source in ("", DEFAULT_MODEL)


def is_synthetic(source: str) -> bool:
    return source.startswith(SYNTHETIC_PREFIX)


def resolve_source(source: str, fetch: FetchConfig | None = None) -> str:
    """The source itself, or the default model's file (fetched on first use)."""
    return str(default_model_path(fetch)) if is_default(source) else source
