"""Tokenization and chat templates exactly as the model defines them (HF tokenizers stack).

A GGUF file carries its tokenizer and chat template; converting it takes seconds, so the converted
tokenizer is saved in the cache once (under a lock, renamed into place whole) and loaded from
there afterwards. Nothing here touches the network.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.shared.model.fetch import default_cache, locked


class Tokenizer:
    def __init__(self, hf: Any) -> None:
        self._hf = hf
        self.vocab_size = len(hf)
        self.eos_token_id: int | None = hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._hf(text, add_special_tokens=False).input_ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not self._hf.chat_template:
            raise ValueError("this model has no chat template: send a raw prompt instead")
        text = self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        ids = [t for t in token_ids if t < self.vocab_size]  # synthetic models may exceed it
        return str(self._hf.decode(ids, skip_special_tokens=True))


def load_tokenizer(source: Path, cache: Path | None = None) -> Tokenizer:
    """Tokenizer of a .gguf file (converted once into `cache`) or a Hugging Face directory."""
    from transformers import AutoTokenizer

    if not source.is_dir():
        source = converted_tokenizer(source, cache or default_cache())
    return Tokenizer(AutoTokenizer.from_pretrained(str(source)))


def converted_path(gguf: Path, cache: Path) -> Path:
    """Where the tokenizer converted from a GGUF file is kept."""
    return cache / f"{gguf.stem}.tokenizer"


def converted_tokenizer(gguf: Path, cache: Path) -> Path:
    """The GGUF file's tokenizer as a Hugging Face directory in `cache`, converted on first use."""
    converted = converted_path(gguf, cache)
    if converted.exists():
        return converted
    cache.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".tokenizer.lock", f"the tokenizer of {gguf.name}"):
        if not converted.exists():
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            with tempfile.TemporaryDirectory(dir=cache, prefix=".tokenizer-") as tmp:
                hf.save_pretrained(Path(tmp) / "out")
                os.replace(Path(tmp) / "out", converted)
    return converted


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Text is emitted only once it is stable: a trailing replacement character means a multi-byte
    character is still incomplete. Stop strings are searched in the text; text that could still
    turn into a stop string is held back until it cannot.
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    text: str = ""  # all stable text so far
    emitted: int = 0  # characters of `text` already returned
    _prefix_offset: int = 0
    _read_offset: int = 0
    _ids: list[int] = field(default_factory=list)

    @classmethod
    def resumed(
        cls, tokenizer: Tokenizer, stop: tuple[str, ...], output: list[int], delivered: int
    ) -> IncrementalDetokenizer:  # fmt: skip
        """A detokenizer that has seen `output` (tokens an earlier attempt generated) and whose
        first `delivered` characters reached the client: what it held back (a character split
        across tokens, a possible stop-string prefix) comes out of the next delta."""
        detok = cls(tokenizer, stop)
        for token in output:
            detok.add(token)
        detok.emitted = min(delivered, len(detok.text))
        return detok

    def add(self, token_id: int) -> bool:
        """Feed one token; True when a stop string has been found (text is cut before it)."""
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = max(0, len(self.text) - self._longest_stop())
            self.text += full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return self._cut_at_stop(start)
        return False

    def delta(self, final: bool) -> str:
        """Text not yet returned; holds back a possible stop-string prefix unless final."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self._holdback())
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _longest_stop(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def _holdback(self) -> int:
        tail = self.text[-self._longest_stop() :] if self.stop else ""
        for keep in range(len(tail), 0, -1):
            if any(s.startswith(tail[-keep:]) for s in self.stop):
                return keep
        return 0

    def _cut_at_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True
