"""The gateway's tokenizer: a synthetic model fetches nothing (it borrows the default model's
tokenizer only from the cache, else takes token-id prompts only); the default model itself has no
silent fallback. The index is a closed loopback port: any fetch fails at once."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from kvmesh.services.gateway.server import gateway_tokenizer
from kvmesh.shared.engine.tokenizer import converted_tokenizer
from kvmesh.shared.model.fetch import FetchConfig, FetchError, default_cache, default_model_path


def offline(cache: Path) -> FetchConfig:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return FetchConfig(cache=cache, index_url=f"http://127.0.0.1:{port}/simple")


def test_a_synthetic_model_without_the_default_model_cached_has_no_tokenizer(tmp_path) -> None:
    assert gateway_tokenizer("synthetic:llama3-8b", offline(tmp_path)) is None
    assert not (tmp_path / ".fetch.lock").exists()  # no fetch was tried


def test_a_synthetic_model_borrows_the_cached_default_tokenizer(tmp_path) -> None:
    converted = converted_tokenizer(default_model_path(), default_cache())  # this machine's
    shutil.copytree(converted, tmp_path / converted.name)
    tokenizer = gateway_tokenizer("synthetic:tiny", offline(tmp_path))
    assert tokenizer is not None and tokenizer.encode("Hello world")
    assert not (tmp_path / ".fetch.lock").exists()


def test_the_default_model_offline_is_an_error(tmp_path) -> None:
    with pytest.raises(FetchError, match="Connection refused"):
        gateway_tokenizer("", offline(tmp_path))
