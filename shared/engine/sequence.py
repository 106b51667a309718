"""Request state: a small dataclass of counters. Scheduling brings num_computed up to num_tokens;
there is no separate prefill or decode phase."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.StrEnum):
    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full
    ABORT = "abort"  # cancelled by the client or the server
    HANDOFF = "handoff"  # prefill role: the prompt is computed, its KV goes to a decode worker


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a random seed drawn at admission
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # a request resumed after an earlier attempt failed (the gateway's failover): the last
    # output_offset prompt tokens are output already generated; the counter-based random stream
    # and the detokenizer (stop strings, characters split across tokens) continue after them,
    # and text_offset characters of their text were delivered already
    output_offset: int = 0
    text_offset: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.output_offset < 0 or self.text_offset < 0:
            raise ValueError("output_offset and text_offset must be >= 0")


# a token sampled by a step still running on the device; its value arrives when the step's
# outputs are processed (Sequence.pending_row is its row among that step's sampled tokens)
PENDING = -1


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by every generated token
    num_prompt_tokens: int
    params: SamplingParams
    seed: int  # the effective sampling seed
    arrival: int  # admission order; later arrivals are preempted first
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    arrival_time: float = 0.0  # time.perf_counter() when it entered the engine
    first_scheduled_time: float | None = None
    pending_row: int = -1  # see PENDING
    # content hashes of the first full blocks of token_ids (block_hash.py), grown as they fill
    block_hashes: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
