"""In-flight batching under a per-step token budget, with chunked prefill and recompute
preemption.

Each step: running sequences first, oldest first (decodes need one token, unfinished prompts
their next chunk), then waiting sequences in arrival order while budget and blocks last. When a
running sequence cannot get a block, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the queue with num_computed = 0, to be recomputed later.

Prefix caching (with a BlockHasher): a sequence admitted without blocks first takes the cached
blocks of its longest cached prefix of full blocks, and computes only the tokens after it (at
least its last token, whose logits are sampled). A recomputed (preempted) sequence finds its own
blocks again unless they were evicted meanwhile. The engine hands back the blocks a step filled
once that step completed (`cache`): only then may a later sequence read them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvmesh.shared.engine.block_hash import BlockHasher
from kvmesh.shared.engine.kv_cache import BlockPool, blocks_for
from kvmesh.shared.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # tokens computed per step, over all sequences
    max_num_seqs: int = 256  # sequences in the running batch

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError(f"scheduler limits must be positive: {self}")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed


@dataclass(frozen=True)
class FilledBlocks:
    """Blocks a step fills: seq.block_table[first : first + len(blocks)] as it was at launch."""

    seq: Sequence
    first: int
    blocks: list[int]


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, pool: BlockPool, hasher: BlockHasher | None = None
    ) -> None:
        self.config = config
        self.pool = pool
        self.hasher = hasher  # None: no prefix caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_prompt_tokens = 0  # of sequences admitted (first admission only)
        self.num_cached_tokens = 0  # of those, found in the prefix cache

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this pass
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow_or_preempt(seq, n, plan):
                break
            plan.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting seq its cached prefix and the blocks for its next tokens under
        `budget`; the number of tokens to compute, 0 if the pool is short."""
        hits = self._match(seq) if not seq.block_table else []
        start = seq.num_computed + len(hits) * self.config.block_size
        n = min(seq.num_tokens - start, budget)
        need = blocks_for(start + n, self.config.block_size) - len(seq.block_table) - len(hits)
        if need + self.pool.num_free_in(hits) > self.pool.num_free:
            return 0
        if hits:
            self.pool.take(hits)
            seq.block_table = hits
            seq.num_computed = start
        if seq.num_preemptions == 0 and not seq.num_output_tokens:
            seq.num_cached_tokens = start
            self.num_prompt_tokens += seq.num_prompt_tokens
            self.num_cached_tokens += start
        self._grow(seq, n)
        return n

    def _match(self, seq: Sequence) -> list[int]:
        """The cached blocks of seq's longest cached prefix, short of its last token."""
        if self.hasher is None:
            return []
        limit = (seq.num_tokens - 1) // self.config.block_size
        return self.pool.match(self.hasher.extend(seq, limit)[:limit])

    def filled(self, scheduled: list[ScheduledSeq]) -> list[FilledBlocks]:
        """The blocks each scheduled sequence fills in this step (call before num_computed
        advances); the engine passes them to `cache` once the step completed."""
        if self.hasher is None:
            return []
        bs, out = self.config.block_size, []
        for s in scheduled:
            first, end = s.seq.num_computed // bs, (s.seq.num_computed + s.num_new_tokens) // bs
            if end > first:
                out.append(FilledBlocks(s.seq, first, s.seq.block_table[first:end]))
        return out

    def cache(self, filled: list[FilledBlocks]) -> None:
        """A step completed: the blocks it filled get their content hashes (those whose tokens
        are all known; a sequence aborted meanwhile may keep a PENDING one)."""
        hasher = self.hasher
        if hasher is None:
            return
        for f in filled:
            end = f.first + len(f.blocks)
            hashes = hasher.extend(f.seq, end)[f.first : end]
            self.pool.cache(f.blocks[: len(hashes)], hashes)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Give seq the blocks for n more tokens; False if the pool is short."""
        need = blocks_for(seq.num_computed + n, self.config.block_size) - len(seq.block_table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.block_table.extend(self.pool.allocate(need))
        return True

    def _grow_or_preempt(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        while not self._grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
