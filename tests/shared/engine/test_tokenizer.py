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


@pytest.mark.parametrize("cut", range(1, 10))
def test_a_resumed_detokenizer_sends_what_the_first_held_back(
    tokenizer: Tokenizer, cut: int
) -> None:
    """A stream that moved to another worker after `cut` tokens (the gateway's failover): the
    new worker's detokenizer, resumed with those tokens and the characters the client got,
    sends the rest: a character split across tokens (the hieroglyph is four byte tokens), a
    held-back stop-string prefix, the stop found across the cut."""
    ids = tokenizer.encode("Un café 𓀀 and world peace talks")
    assert len(ids) == 11 and tokenizer.decode(ids[3:4]) == "\ufffd"
    first = IncrementalDetokenizer(tokenizer, stop=("world peace",))
    sent = ""
    for t in ids[:cut]:  # the stop completes at token 9, after every cut
        assert not first.add(t)
        sent += first.delta(final=False)
    second = IncrementalDetokenizer.resumed(tokenizer, ("world peace",), ids[:cut], len(sent))
    rest, stopped = _stream(second, ids[cut:])
    assert stopped and sent + rest == "Un café 𓀀 and "
