"""The engine every service runs: model + paged KV cache + scheduler + sampler.

The role decides what it admits (DESIGN invariant 4):
  * COLOCATED takes prompts and generates to the end (the single-device baseline);
  * PREFILL takes prompts, computes them, samples the first token and finishes the sequence
    with FinishReason.HANDOFF; a layer hook exports each layer's K/V as soon as it is written;
  * DECODE reserves blocks for an incoming handoff, then `commit` turns the received KV plus the
    first token into a running sequence that decodes in the same batch as the others.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shared.batch import ForwardBatch
from shared.kv_cache import (
    BlockPool,
    allocate_kv_cache,
    blocks_for,
    num_blocks_for_budget,
)
from shared.models.llama import LlamaModel
from shared.models.loader import LoadedModel, load_model
from shared.ops import ops_for
from shared.sampler import SamplingBatch, sample
from shared.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from shared.sequence import FinishReason, SamplingParams, Sequence, Status
from shared.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # see shared.models.loader: "" is the default model
    role: Role = Role.COLOCATED
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    kv_cache_bytes: int = 256 << 20  # CPU budget for the KV cache
    gpu_memory_fraction: float = 0.85  # of the memory free after the weights load
    num_blocks: int | None = None  # overrides the budget (tests)
    max_model_len: int | None = None  # default: the model's context, capped by the cache
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    use_kernels: bool = True  # Triton kernels on CUDA
    seed: int = 0  # weights of synthetic models

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        SchedulerConfig(self.block_size, self.max_num_batched_tokens, self.max_num_seqs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str  # new text in this output
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    queue_seconds: float = 0.0  # arrival to first scheduled step
    num_preemptions: int = 0
    step_batch_size: int = 0  # sequences computed in the step that produced this output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestError(ValueError):
    """A request the engine cannot serve as asked (a client error)."""


# (layer index, sequences whose prompt completes this step) -> None
ExportHook = Callable[[int, list[Sequence]], None]


@dataclass
class _Step:
    batch: ForwardBatch
    sampled: list[Sequence] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        loaded = loaded or load_model(config.model, dtype, self.device, config.seed)
        self.model_config = loaded.config
        self.model = LlamaModel(
            loaded.config, loaded.weights, ops_for(self.device, config.use_kernels)
        )
        if tokenizer is None and loaded.tokenizer_source is not None:
            tokenizer = load_tokenizer(loaded.tokenizer_source)
        self.tokenizer = tokenizer
        num_blocks = config.num_blocks or num_blocks_for_budget(
            loaded.config,
            config.block_size,
            dtype,
            self.device,
            config.kv_cache_bytes,
            config.gpu_memory_fraction,
        )
        self.pool = BlockPool(num_blocks)
        self.kv_cache = allocate_kv_cache(
            loaded.config, num_blocks, config.block_size, dtype, self.device
        )  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position, num_blocks * config.block_size
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.block_size, config.max_num_batched_tokens, config.max_num_seqs),
            self.pool,
        )
        self.eos_ids = frozenset(loaded.config.eos_token_ids)
        self.export_hook: ExportHook | None = None
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._reserved: dict[str, list[int]] = {}
        self._arrivals = 0

    # ------------------------------------------------------------------------------- requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request cannot be served as asked."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens; this model's context holds {self.max_model_len}, "
                "and at least one must be left to generate"
            )
        if params.max_tokens > self.config.max_tokens_limit:
            raise RequestError(
                f"max_tokens {params.max_tokens} is over this server's limit of "
                f"{self.config.max_tokens_limit}"
            )
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise RequestError(
                f"token id {bad} is outside the vocabulary (0..{self.model_config.vocab_size - 1})"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if self.config.role is Role.DECODE:
            raise RequestError("a decode engine takes sequences through reserve() and commit()")
        self.validate(prompt_token_ids, params)
        seq = self._new_sequence(request_id, list(prompt_token_ids), params)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks; False if unknown."""
        if request_id in self._reserved:
            self.pool.free(self._reserved.pop(request_id))
            return True
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self._detok.pop(request_id, None)
        return True

    # ------------------------------------------------------------------------ decode handoff

    def reserve(self, request_id: str, num_prompt_tokens: int) -> list[int] | None:
        """Blocks to receive a prompt's KV into, or None if the pool is short right now."""
        if request_id in self._reserved or request_id in self._seqs:
            raise RequestError(f"request {request_id!r} is already on this engine")
        n = blocks_for(num_prompt_tokens, self.config.block_size)
        if n > self.pool.num_free:
            return None
        self._reserved[request_id] = self.pool.allocate(n)
        return list(self._reserved[request_id])

    def commit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        params: SamplingParams,
    ) -> None:
        """The reserved blocks now hold the prompt's KV: decode from the first token on.
        params.seed must be the seed prefill sampled the first token with."""
        blocks = self._reserved.pop(request_id)
        # the prefill worker drew the first token from params.seed's stream: continue it
        seq = self._new_sequence(request_id, list(prompt_token_ids), params)
        seq.block_table = blocks
        seq.num_computed = len(prompt_token_ids)
        self._append(seq, first_token)
        detok = self._detok.get(request_id)
        if detok is not None:
            detok.delta(final=False)  # the prefill worker already emitted this text
        self.scheduler.add(seq)

    # ---------------------------------------------------------------------------------- steps

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        now = time.perf_counter()
        for s in plan.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        step = self._prepare(plan.scheduled)
        hook = self._layer_hook(step.sampled)
        logits = self.model.forward(step.batch, self.kv_cache, hook)
        for s in plan.scheduled:
            s.seq.num_computed += s.num_new_tokens
        tokens = sample(logits, self._sampling_batch(step.sampled)).tolist()
        outputs = [self._advance(seq, t) for seq, t in zip(step.sampled, tokens, strict=True)]
        for out in outputs:
            out.step_batch_size = len(plan.scheduled)
        return outputs

    def check_integrity(self) -> None:
        owners = [s.block_table for s in self._seqs.values()] + list(self._reserved.values())
        self.pool.check_integrity(owners)

    # -------------------------------------------------------------------------------- helpers

    def _new_sequence(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        self._arrivals += 1
        seq = Sequence(request_id, prompt, len(prompt), params, seed, self._arrivals)
        seq.arrival_time = time.perf_counter()
        self._seqs[request_id] = seq
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return seq

    def _prepare(self, scheduled: list[ScheduledSeq]) -> _Step:
        bs = self.config.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for s in scheduled:
            seq, start, end = s.seq, s.seq.num_computed, s.seq.num_computed + s.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            cu.append(cu[-1] + s.num_new_tokens)
            seq_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(cu[-1] - 1)
                sampled.append(seq)
        width = max(len(s.seq.block_table) for s in scheduled)
        tables = [s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in scheduled]
        dev = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        batch = ForwardBatch(
            input_ids=tensor(ids, torch.int64),
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            block_table=tensor(tables, torch.int32),
            cu_seqlens_q=tensor(cu, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            sample_indices=tensor(sample_rows, torch.int64),
            max_q_len=max(s.num_new_tokens for s in scheduled),
        )
        return _Step(batch, sampled)

    def _layer_hook(self, sampled: list[Sequence]) -> Callable[[int], None] | None:
        hook = self.export_hook
        if self.config.role is not Role.PREFILL or hook is None:
            return None
        done = [s for s in sampled if s.num_output_tokens == 0]
        if not done:
            return None
        return lambda layer: hook(layer, done)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        dev = self.device
        temps = [s.params.temperature for s in seqs]
        return SamplingBatch(
            temperature=torch.tensor(temps, dtype=torch.float32, device=dev),
            top_p=torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev),
            top_k=torch.tensor([s.params.top_k for s in seqs], dtype=torch.int64, device=dev),
            seeds=torch.tensor([s.seed for s in seqs], dtype=torch.int64, device=dev),
            steps=torch.tensor([s.num_output_tokens for s in seqs], dtype=torch.int64, device=dev),
            all_greedy=all(t == 0 for t in temps),
            any_top_p_or_k=any(s.params.top_p < 1 or s.params.top_k > 0 for s in seqs),
        )

    def _append(self, seq: Sequence, token: int) -> FinishReason | None:
        """Append a sampled token and decide whether the sequence is finished."""
        seq.token_ids.append(token)
        detok = self._detok.get(seq.request_id)
        hit_stop_string = detok.add(token) if detok is not None else False
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return FinishReason.STOP
        if hit_stop_string:
            return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        if self.config.role is Role.PREFILL:
            return FinishReason.HANDOFF
        return None

    def _advance(self, seq: Sequence, token: int) -> RequestOutput:
        reason = self._append(seq, token)
        detok = self._detok.get(seq.request_id)
        text = detok.delta(final=reason is not None) if detok is not None else ""
        if reason is not None:
            self._finish(seq, reason)
        queued = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
        return RequestOutput(
            seq.request_id, [token], text, seq.num_prompt_tokens, seq.num_output_tokens, reason,
            queued, seq.num_preemptions,
        )  # fmt: skip

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        del self._seqs[seq.request_id]
        self._detok.pop(seq.request_id, None)
