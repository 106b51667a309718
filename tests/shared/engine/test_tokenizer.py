"""Incremental detokenization and stop strings, on the default model's tokenizer."""

from __future__ import annotations

import pytest

from kvmesh.shared.engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from kvmesh.shared.model.fetch import default_model_path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[str, bool]:
    text, stopped = "", False
    for i, t in enumerate(ids):
        stopped = detok.add(t)
        text += detok.delta(final=stopped or i == len(ids) - 1)
        if stopped:
            break
    return text, stopped


def test_deltas_concatenate_to_the_full_decode(tokenizer: Tokenizer) -> None:
    text = "Héllo wörld — naïve café 日本語 🙂 done."
    ids = tokenizer.encode(text)
    streamed, stopped = _stream(IncrementalDetokenizer(tokenizer), ids)
    assert not stopped
    assert streamed == tokenizer.decode(ids) == text


def test_stop_string_cuts_text_and_is_never_emitted(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta STOP gamma delta")
    detok = IncrementalDetokenizer(tokenizer, stop=("STOP",))
    streamed, stopped = _stream(detok, ids)
    assert stopped
    assert streamed == "alpha beta "


def test_possible_stop_prefix_is_held_back_until_resolved(tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, stop=("world peace",))
    pieces = [detok.add(t) or detok.delta(final=False) for t in tokenizer.encode("hello world")]
    assert "".join(p for p in pieces if isinstance(p, str)) == "hello "  # "world" may begin a stop
    detok.add(tokenizer.encode(" cup")[0])
    assert detok.delta(final=True) == "world cup"
