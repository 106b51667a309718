"""The engine every service runs: model + paged KV cache + scheduler + sampler.

The role decides what it admits (ARCHITECTURE.md invariant 4):
  * AGGREGATED takes prompts and generates to the end: both phases in one engine (an aggregated
    worker, the in-process engine; the baseline every disaggregated figure is compared with);
  * PREFILL takes prompts, computes them, samples the first token and finishes the sequence
    with FinishReason.HANDOFF; a layer hook exports each layer's K/V as soon as it is written;
  * DECODE reserves blocks for an incoming handoff, then `commit` turns the received KV plus the
    first token into a running sequence that decodes in the same batch as the others.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvmesh.kernels.linear import MAX_M
from kvmesh.kernels.quant import FP8_DTYPE
from kvmesh.shared.engine.batch import ForwardBatch, StepInputs
from kvmesh.shared.engine.block_hash import BlockHasher
from kvmesh.shared.engine.cuda_graphs import DecodeGraphs
from kvmesh.shared.engine.kv_cache import (
    BlockPool,
    allocate_kv_cache,
    blocks_for,
    bytes_per_block,
)
from kvmesh.shared.engine.kv_scales import calibrate_kv_scales, calibration_ids
from kvmesh.shared.engine.memory import card_memory, headroom_bytes, kv_bytes_on_card
from kvmesh.shared.engine.sampler import SamplingBatch, sample
from kvmesh.shared.engine.scheduler import FilledBlocks, ScheduledSeq, Scheduler, SchedulerConfig
from kvmesh.shared.engine.sequence import PENDING, FinishReason, SamplingParams, Sequence, Status
from kvmesh.shared.engine.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from kvmesh.shared.model.config import ModelConfig
from kvmesh.shared.model.fetch import FetchConfig
from kvmesh.shared.model.formats import KV_CACHE_DTYPES, QUANTIZATIONS
from kvmesh.shared.model.llama import LlamaModel
from kvmesh.shared.model.loader import LoadedModel, load_model
from kvmesh.shared.model.ops import ops_for

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    AGGREGATED = "aggregated"


@dataclass(frozen=True)
class EngineConfig:
    model: str = ""  # see kvmesh.shared.model.loader: "" is the default model
    role: Role = Role.AGGREGATED
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    kv_cache_bytes: int = 256 << 20  # CPU budget for the KV cache
    # of the card's total memory, for all this process puts there (shared/engine/memory.py)
    gpu_memory_share: float = 0.9
    num_blocks: int | None = None  # overrides the budget (tests)
    max_model_len: int | None = None  # default: the model's context, capped by the cache
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    use_kernels: bool = True  # Triton kernels on CUDA
    cuda_graphs: bool = True  # replay captured decode steps on CUDA
    overlap: bool = True  # launch step N+1 before processing step N's tokens (not for prefill)
    seed: int = 0  # weights of synthetic models
    # the decoder layers' projections: as loaded ("none"), or quantized at load to FP8 (W8A8)
    # or INT8 (weight-only) where the checkpoint is not quantized already (kernels/quant.py)
    quantization: str = "none"
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": E4M3 with per-head scales
    # reuse the KV blocks of prompt prefixes computed before (block_hash.py); not on a decode
    # engine yet: its blocks arrive by handoff, whole
    prefix_caching: bool = True
    fetch: FetchConfig = field(default_factory=FetchConfig)  # where the default model is kept

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        SchedulerConfig(self.block_size, self.max_num_batched_tokens, self.max_num_seqs)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")  # fmt: skip
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")  # fmt: skip
        if not 0 < self.gpu_memory_share <= 1:
            raise ValueError(f"gpu_memory_share must be in (0, 1], got {self.gpu_memory_share}")

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
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestError(ValueError):
    """A request the engine cannot serve as asked (a client error)."""


# (layer index, sequences whose prompt completes this step) -> None
ExportHook = Callable[[int, list[Sequence]], None]


@dataclass
class _Launched:
    """A step whose tokens are being sampled on the device; processed one step later."""

    epoch: int
    sampled: list[Sequence]  # in row order of tokens
    indices: list[int]  # where each sampled token goes in its sequence's token_ids
    tokens: torch.Tensor  # [S] int64 on the device (the next step may read them there)
    host_tokens: torch.Tensor  # [S] int64 on the host, filled when `ready` completes
    ready: torch.cuda.Event | None
    batch_size: int  # sequences computed in the step
    filled: list[FilledBlocks]  # blocks the step fills: cached once it completed


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
        loaded = loaded or load_model(
            config.model, dtype, self.device, config.seed, config.fetch, config.quantization
        )
        self.model_config = loaded.config
        self.model = LlamaModel(
            loaded.config, loaded.weights, ops_for(self.device, config.use_kernels)
        )
        if tokenizer is None and loaded.tokenizer_source is not None:
            tokenizer = load_tokenizer(loaded.tokenizer_source, config.fetch.cache)
        self.tokenizer = tokenizer
        # an FP8 cache: E4M3 codes and per-head scales, from the checkpoint or calibrated now
        self.kv_dtype = FP8_DTYPE if config.kv_cache_dtype == "fp8" else dtype
        if config.kv_cache_dtype == "fp8":
            with self._on_device():
                self.model.kv_scales = loaded.kv_scales
                if self.model.kv_scales is None:
                    ids = calibration_ids(tokenizer, loaded.config.vocab_size)
                    self.model.kv_scales = calibrate_kv_scales(self.model, ids, config.block_size)
        num_blocks = config.num_blocks or self._kv_bytes(loaded.config) // bytes_per_block(
            loaded.config, config.block_size, self.kv_dtype
        )
        self.pool = BlockPool(num_blocks)
        # one block more than the pool hands out: the scratch block padding rows write into
        # a decode engine's cache is shared: a prefill process of this host writes handed-off
        # KV straight into its reserved blocks (handoff/ipc)
        self.kv_cache = allocate_kv_cache(
            loaded.config, num_blocks + 1, config.block_size, self.kv_dtype, self.device,
            shared=config.role is Role.DECODE,
        )  # [L, 2, num_blocks + 1, block_size, kv_heads, head_dim]  # fmt: skip
        self.max_model_len = min(
            config.max_model_len or loaded.config.max_position, num_blocks * config.block_size
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.block_size, config.max_num_batched_tokens, config.max_num_seqs),
            self.pool,
            self._block_hasher(),
        )
        self.eos_ids = frozenset(loaded.config.eos_token_ids)
        self.export_hook: ExportHook | None = None
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._reserved: dict[str, list[int]] = {}
        self._arrivals = 0
        self._inputs = StepInputs(self.device, config.block_size, scratch_block=num_blocks)
        self._overlap = config.overlap and config.role is not Role.PREFILL
        self._in_flight: _Launched | None = None
        self._epoch = 0
        self._graphs: DecodeGraphs | None = None
        # the Triton ops are graph-safe; the torch references size tensors from values (syncs)
        graphable = self.device.type == "cuda" and config.use_kernels
        if config.cuda_graphs and graphable and config.role is not Role.PREFILL:
            self._graphs = DecodeGraphs(
                self.model, self.kv_cache, config.max_num_seqs,
                table_width=blocks_for(self.max_model_len, config.block_size),
                scratch_block=num_blocks,
            )  # fmt: skip
            with self._on_device():
                self._graphs.capture()
        if graphable and config.role is not Role.DECODE:
            with self._on_device():
                self._warm_up(scratch_block=num_blocks)

    def _block_hasher(self) -> BlockHasher | None:
        """Prefix caching's hasher, salted with all that decides a block's K/V besides its
        tokens; None where the engine does not cache."""
        c = self.config
        if not c.prefix_caching or c.role is Role.DECODE:
            return None
        salt = f"{c.model}|seed {c.seed}|{c.dtype}|{c.quantization}|kv {c.kv_cache_dtype}"
        return BlockHasher(salt, c.block_size)

    def _kv_bytes(self, model: ModelConfig) -> int:
        """The KV cache's budget: a byte count on CPU, this process's share of the card on a GPU
        (after the weights loaded: they count against the share)."""
        config = self.config
        if self.device.type != "cuda":
            return config.kv_cache_bytes
        graphs = config.cuda_graphs and config.use_kernels and config.role is not Role.PREFILL
        headroom = headroom_bytes(model, config.torch_dtype, config.max_num_batched_tokens,
                                  config.max_num_seqs, graphs)  # fmt: skip
        return kv_bytes_on_card(config.gpu_memory_share, card_memory(self.device), headroom)

    @torch.inference_mode()
    def _warm_up(self, scratch_block: int) -> None:
        """Compile and tune the prefill path's kernels now, not in the first requests (seconds of
        JIT each): prompts of every power-of-two length the projections' kernel takes (it is
        tuned per power-of-two row count; longer steps go to cuBLAS) and a full-budget one (the
        prefill attention's narrow launch, and its autotuned wide one where the budget reaches
        it), and the greedy argmax of their logits; each as a fresh step (the first-chunk attention
        on sm_90) and as one through the cache (later chunks, reused prefixes, steps with decodes).
        Every token lives in the scratch block.
        Later steps compile nothing new: the kernels take the step's varying counts unspecialized
        and its input views 16-byte aligned (StepInputs)."""
        bs = self.config.block_size
        longest = min(self.config.max_num_batched_tokens, self.max_model_len)
        lengths = {min(1 << i, longest) for i in range(MAX_M.bit_length())} | {longest}
        for n, fresh in itertools.product(sorted(lengths), (True, False)):
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            table = torch.full((blocks_for(n, bs),), scratch_block, dtype=torch.int32,
                               device=self.device)  # fmt: skip
            batch = ForwardBatch.one_prompt(ids, table, bs, fresh)
            self.model.ops.argmax(self.model.forward(batch, self.kv_cache))
        torch.cuda.synchronize(self.device)

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
        if params.output_offset >= n:
            raise RequestError(
                f"output_offset {params.output_offset} must be less than the prompt's {n} tokens"
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

    def add_request_if_room(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> bool:
        """add_request, unless the free blocks cannot hold this prompt beside what the waiting
        prompts still need (False: nothing added; the caller sends it elsewhere or later)."""
        bs = self.config.block_size
        wanted = sum(blocks_for(s.num_tokens, bs) - len(s.block_table)
                     for s in self.scheduler.waiting)  # fmt: skip
        if blocks_for(len(prompt_token_ids), bs) + wanted > self.pool.num_free:
            return False
        self.add_request(request_id, prompt_token_ids, params)
        return True

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

    def abort_all(self) -> list[RequestOutput]:
        """Abort every request (after a step failed): an ABORT output for each."""
        self._in_flight = None
        self.pool.release(self._epoch)  # nothing runs on the device for us any more
        outputs = [
            RequestOutput(seq.request_id, [], "", seq.num_prompt_tokens,
                          sum(t != PENDING for t in seq.output_ids), FinishReason.ABORT)
            for seq in self._seqs.values()
        ]  # fmt: skip
        for out in outputs:
            self.abort(out.request_id)
        return outputs

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
        seq.token_ids.append(first_token)
        detok = self._detok.get(request_id)
        if detok is not None:
            detok.add(first_token)
            detok.delta(final=False)  # the prefill worker already emitted this text
        self.scheduler.add(seq)

    # ---------------------------------------------------------------------------------- steps

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Launch the next step, then process the previous one while the device runs it; the
        outputs returned belong to the previous step when overlapping, else to this one."""
        with self._on_device():  # any thread: Triton and events use the current device
            launched = self._launch()
            outputs: list[RequestOutput] = []
            if self._in_flight is not None:
                outputs = self._process(self._in_flight)
            self._in_flight = launched
            if launched is not None and not self._overlap:
                outputs += self._process(launched)
                self._in_flight = None
        return outputs

    def _on_device(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

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
            self._detok[request_id] = IncrementalDetokenizer.resumed(
                self.tokenizer, params.stop, prompt[len(prompt) - params.output_offset :],
                params.text_offset,
            )  # fmt: skip
        return seq

    def _launch(self) -> _Launched | None:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return None
        self._epoch += 1
        self.pool.epoch = self._epoch
        now = time.perf_counter()
        for s in plan.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        prev = self._in_flight.tokens if self._in_flight is not None else None
        filled = self.scheduler.filled(plan.scheduled)
        graphed = self._graph_bucket(plan.scheduled)
        if graphed is not None:
            assert self._graphs is not None
            inputs, fill, sampled = self._inputs.decode(plan.scheduled, graphed)
            logits = self._graphs.run(inputs, fill, prev, len(sampled))
        else:
            batch, sampled = self._inputs.batch(plan.scheduled, prev)
            logits = self.model.forward(batch, self.kv_cache, self._layer_hook(sampled))
        for s in plan.scheduled:
            s.seq.num_computed += s.num_new_tokens
        tokens = self._sample(logits, sampled)
        host_tokens, ready = tokens, None
        if tokens.is_cuda:
            host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host_tokens.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        indices = []
        for row, seq in enumerate(sampled):
            indices.append(seq.num_tokens)
            seq.token_ids.append(PENDING)
            seq.pending_row = row
            if self._certainly_done(seq):  # stop scheduling it now; its output comes later
                self.scheduler.remove(seq)
        return _Launched(self._epoch, sampled, indices, tokens, host_tokens, ready,
                         len(plan.scheduled), filled)  # fmt: skip

    def _process(self, step: _Launched) -> list[RequestOutput]:
        if step.ready is not None:
            step.ready.synchronize()
        self.scheduler.cache(step.filled)  # before release: those freed join the cached ones
        self.pool.release(step.epoch)
        outputs = []
        for seq, index, token in zip(step.sampled, step.indices, step.host_tokens.tolist(),
                                     strict=True):  # fmt: skip
            if self._seqs.get(seq.request_id) is not seq:
                continue  # finished one step earlier, or aborted
            seq.token_ids[index] = token
            if seq.token_ids[-1] != PENDING:
                seq.pending_row = -1
            out = self._advance(seq, index)
            out.step_batch_size = step.batch_size
            outputs.append(out)
        return outputs

    def _graph_bucket(self, scheduled: list[ScheduledSeq]) -> int | None:
        """The graph bucket for a decode-only step, or None to run it eagerly."""
        # no graphs on prefill engines, so no export hook runs inside one
        if self._graphs is None or any(s.num_new_tokens != 1 for s in scheduled):
            return None
        return self._graphs.bucket_for(len(scheduled))

    def _certainly_done(self, seq: Sequence) -> bool:
        """True if seq finishes by length whatever its pending token is."""
        return (
            seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
        )

    def _layer_hook(self, sampled: list[Sequence]) -> Callable[[int], None] | None:
        hook = self.export_hook
        if self.config.role is not Role.PREFILL or hook is None:
            return None
        done = [s for s in sampled if s.num_output_tokens == 0]
        if not done:
            return None
        return lambda layer: hook(layer, done)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Token ids from logits in the model's dtype: greedy rows take the argmax as they are
        (the largest half-precision value is the largest fp32 one; no [S, V] fp32 copy), the
        sampler works in fp32."""
        if all(s.params.temperature == 0 for s in seqs):
            return self.model.ops.argmax(logits)
        pinned = self._inputs.pinned
        floats = pinned([[s.params.temperature for s in seqs], [s.params.top_p for s in seqs]],
                        torch.float32).to(self.device, non_blocking=True)  # fmt: skip
        ints = pinned([[s.params.top_k for s in seqs], [s.seed for s in seqs],
                       [s.num_output_tokens + s.params.output_offset for s in seqs]],
                      torch.int64).to(self.device, non_blocking=True)  # fmt: skip
        batch = SamplingBatch(
            temperature=floats[0],
            top_p=floats[1],
            top_k=ints[0],
            seeds=ints[1],
            steps=ints[2],
            all_greedy=False,
            any_top_p_or_k=any(s.params.top_p < 1 or s.params.top_k > 0 for s in seqs),
        )
        return sample(logits.float(), batch)

    def _finish_reason(self, seq: Sequence, index: int, stop_string: bool) -> FinishReason | None:
        """Whether seq ends with its token at token_ids[index]."""
        token, p = seq.token_ids[index], seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return FinishReason.STOP
        if stop_string:
            return FinishReason.STOP
        if index + 1 - seq.num_prompt_tokens >= p.max_tokens or index + 1 >= self.max_model_len:
            return FinishReason.LENGTH
        if self.config.role is Role.PREFILL:
            return FinishReason.HANDOFF
        return None

    def _advance(self, seq: Sequence, index: int) -> RequestOutput:
        """The token at token_ids[index] is known: detokenize it and decide whether seq ends."""
        token = seq.token_ids[index]
        detok = self._detok.get(seq.request_id)
        stop_string = detok.add(token) if detok is not None else False
        reason = self._finish_reason(seq, index, stop_string)
        text = detok.delta(final=reason is not None) if detok is not None else ""
        if reason is not None:
            self._finish(seq, reason)
        queued = (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time
        return RequestOutput(
            seq.request_id, [token], text, seq.num_prompt_tokens, index + 1 - seq.num_prompt_tokens,
            reason, queued, seq.num_preemptions, num_cached_tokens=seq.num_cached_tokens,
        )  # fmt: skip

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        del self._seqs[seq.request_id]
        self._detok.pop(seq.request_id, None)
