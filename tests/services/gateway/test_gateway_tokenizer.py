"""The gateway's tokenizer choice: synthetic models borrow the default model's tokenizer, and
start without one (token-id prompts only) when it cannot be had; real models must have theirs."""

import pytest

from kvmesh.services.gateway import server


def test_synthetic_model_starts_without_the_default_tokenizer(monkeypatch):
    def offline(source: str) -> str:
        raise RuntimeError("could not download the default model")

    monkeypatch.setattr(server, "resolve_source", offline)
    assert server.gateway_tokenizer("synthetic:llama3-8b") is None
    with pytest.raises(RuntimeError, match="could not download"):
        server.gateway_tokenizer("")  # the default model itself: no silent fallback
