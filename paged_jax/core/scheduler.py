"""The scheduler: token-centric continuous batching with FCFS admission and preemption.

Each step hands out a token budget (`max_num_batched_tokens`) and a sequence budget
(`max_num_seqs`). Running requests go first, oldest first: a decoding sequence needs one
token, a sequence part-way through its prompt needs the rest of it (chunked when the budget is
short). When the cache cannot hold the next tokens, the latest-arrived running request is
preempted, all of its sequences together: by recompute (its blocks are freed and it waits to
be prefilled again, prompt + output) or by swap (its blocks move to host memory and come back,
before any new admission, when there is room). Then waiting requests are admitted in arrival
order while the budgets and a watermark of free blocks allow; the first that does not fit
stops admission (FCFS). With the prefix cache on, a waiting request starts after its
longest cached prefix, unless it asks for its prompt's logprobs. A request with n > 1 runs
one sequence until its prompt is computed, then forks (core/forks.py); it is counted as n
sequences from admission on.

Speculative decoding (num_speculative_tokens = k): once every running sequence has its token,
each that decodes and whose request can speculate gets up to k lookahead slots from what is
left of the budget, tokens of its chunk and blocks for them, which a proposer (spec_decode/)
fills with draft tokens before the step runs and which the step verifies; what the model
rejects the engine rolls back (LLMEngine: _roll_back).

The memory manager decides admission (`admit`) and growth: any KVCacheManager (kv/interface.py,
the one thing of kv/ the scheduler knows), the paged BlockManager or, for the paper's baselines,
Orca's per-request reservations. With batching="static" a new batch is admitted only once the
running one is done, the way FasterTransformer and Hugging Face `generate` serve.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from paged_jax.kv.interface import KVCacheManager, Tables
from paged_jax.sequence import Sequence, SequenceGroup, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    preemption_mode: str = "recompute"  # or "swap"
    # "static": a new batch is admitted only when the last one is done (FasterTransformer and
    # Hugging Face generate; the paper's baseline), instead of at every step.
    batching: str = "continuous"
    num_speculative_tokens: int = 0  # lookahead slots per decoding sequence (0: no speculation)


@dataclass
class ScheduledChunk:
    """seq computes tokens [num_cached, num_cached + num_new) this step; the last num_lookahead
    of them are speculative: slots for draft tokens (draft_token_ids, once proposed), which
    follow the sequence's own tokens."""

    seq: Sequence
    group: SequenceGroup
    num_cached: int
    num_new: int
    num_lookahead: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step samples its next one."""
        return self.num_cached + self.num_new - self.num_lookahead == self.seq.num_tokens

    def propose(self, drafts: list[int]) -> None:
        """Fill the lookahead slots with draft tokens (at most num_lookahead); slots left
        empty are dropped from the chunk (their blocks go back after the step: _roll_back)."""
        assert len(drafts) <= self.num_lookahead
        self.num_new -= self.num_lookahead - len(drafts)
        self.num_lookahead = len(drafts)
        self.draft_token_ids = list(drafts)

    def token_ids(self) -> list[int]:
        """The tokens the chunk computes: the sequence's, then its drafts."""
        end = self.num_cached + self.num_new - self.num_lookahead
        return self.seq.tokens(self.num_cached, end) + self.draft_token_ids

    @property
    def samplers(self) -> list[Sequence]:
        """The sequences that take a token from this chunk's logits: its own, and at the end of
        a prompt the siblings that will fork from it (n > 1)."""
        return [self.seq] + self.group.unborn if self.samples else []


SamplerRow = tuple[int, ScheduledChunk, Sequence]  # (chunk index, chunk, sequence that samples)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, host) blocks
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, device) blocks
    copies: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) device blocks
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)

    @property
    def decode_only(self) -> bool:
        return all(c.num_new == 1 for c in self.chunks)

    def sampler_rows(self) -> list[SamplerRow]:
        """(chunk index, chunk, sequence) for every token this step samples, in the order
        results come."""
        return [(i, c, seq) for i, c in enumerate(self.chunks) for seq in c.samplers]


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: KVCacheManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # over first admissions, for the prefix-cache hit rate
        self.num_cached_prompt_tokens = 0

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def abort(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.waiting, self.running, self.swapped):
            for group in list(queue):
                if group.request_id == request_id:
                    queue.remove(group)
                    self._release(group)
                    return group
        return None

    def finish(self, group: SequenceGroup) -> None:
        """A running request is done: free its blocks."""
        self.running.remove(group)
        self._release(group)

    def free_finished_seqs(self, group: SequenceGroup) -> None:
        """Sequences of a still-running request that are done give their blocks back."""
        done = [s for s in group.seqs if s.finished and s.block_tables]
        self.blocks.free(done)

    def _release(self, group: SequenceGroup) -> None:
        if group.status == Status.SWAPPED:
            self.blocks.free_swapped(group.seqs)
        else:
            self.blocks.free(group.seqs)
        group.status = Status.FINISHED

    # -- one step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._add_lookahead(out, self._schedule_running(out, budget))
        if out.num_preempted == 0:
            budget = self._schedule_swapped(out, budget)
        if out.num_preempted == 0 and not self.swapped and (self.config.batching == "continuous" or not self.running):
            self._schedule_waiting(out, budget)
        out.copies = self.blocks.take_copies()
        return out

    def _fits(self, group: SequenceGroup, plan, seqs_in_use: int) -> bool:
        """Every sequence gets a token, and the sequence limit holds."""
        return all(n > 0 for _, n in plan) and seqs_in_use + group.num_running_seqs <= self.config.max_num_seqs

    def _running_seqs(self) -> int:
        return sum(g.num_running_seqs for g in self.running)

    def _start(self, group: SequenceGroup) -> None:
        """Join the running set in arrival order, so its last member is the latest arrival
        (the preemption victim) whatever order requests were readmitted in."""
        group.status = Status.RUNNING
        bisect.insort(self.running, group, key=lambda g: g.metrics.arrival_time)

    def _plan(self, group: SequenceGroup, budget: int, starts: list[int] | None = None) -> list[tuple[Sequence, int]]:
        """Tokens each active sequence of the group computes within budget, from starts (default:
        what it has computed); all sequences of a group advance together, so the budget is
        split evenly."""
        seqs = group.active
        share = min(budget // max(1, len(seqs)), self.blocks.max_tokens_per_step or budget)
        starts = starts or [s.num_computed_tokens for s in seqs]
        return [(s, min(s.num_tokens - start, share)) for s, start in zip(seqs, starts)]

    def _add_lookahead(self, out: SchedulerOutput, budget: int) -> int:
        """Draft slots for the running sequences that decode, from the budget left once every
        running sequence has its token: up to num_speculative_tokens each, never past
        max_tokens (the token after the drafts comes from the model). A sequence whose blocks
        cannot grow for them goes without: speculation never preempts anyone."""
        k = self.config.num_speculative_tokens
        for chunk in out.chunks if k else ():
            seq, params = chunk.seq, chunk.group.params
            if chunk.num_new != 1 or not chunk.samples or not chunk.group.speculates \
                    or len(seq.output_token_ids) < params.min_tokens:
                continue
            slots = min(k, budget, params.max_tokens - len(seq.output_token_ids) - 1)
            if slots > 0 and self.blocks.grow([(seq, seq.num_tokens + slots)]):
                chunk.num_new += slots
                chunk.num_lookahead = slots
                budget -= slots
        return budget

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i, in_use = 0, 0
        while i < len(self.running):
            group = self.running[i]
            plan = self._plan(group, budget)
            if not self._fits(group, plan, in_use):
                i += 1
                continue
            growth = [(s, s.num_computed_tokens + n) for s, n in plan]
            while not self.blocks.grow(growth):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is group:
                    break
            else:
                self._add_chunks(out, group, plan)
                budget -= sum(n for _, n in plan)
                in_use += group.num_running_seqs
                i += 1
        return budget

    def _schedule_swapped(self, out: SchedulerOutput, budget: int) -> int:
        in_use = self._running_seqs()
        while self.swapped:
            group = self.swapped[0]
            plan = self._plan(group, budget)
            if not self._fits(group, plan, in_use):
                break
            growth = [(s, s.num_computed_tokens + n) for s, n in plan]
            if not self.blocks.can_swap_in(growth):
                break
            self.swapped.popleft()
            out.swap_in += self.blocks.swap_in(group.seqs)
            assert self.blocks.grow(growth)
            self._start(group)
            self._add_chunks(out, group, plan)
            budget -= sum(n for _, n in plan)
            in_use += group.num_running_seqs
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        in_use = self._running_seqs()
        bs = self.blocks.block_size
        while self.waiting and budget > 0:
            group = self.waiting[0]  # nothing of it is in the cache
            hits = self._common_hits(group)
            starts = [len(hit[0]) * bs for hit in hits]
            plan = self._plan(group, budget, starts)
            if not self._fits(group, plan, in_use):
                break
            if not self.blocks.admit(group, hits, [start + n for (_, n), start in zip(plan, starts)]):
                break
            if group.num_cached_tokens is None:
                group.num_cached_tokens = min(starts[0], len(group.prompt_token_ids))
                self.num_prompt_tokens += len(group.prompt_token_ids)
                self.num_cached_prompt_tokens += group.num_cached_tokens
            self.waiting.popleft()
            self._start(group)
            self._add_chunks(out, group, plan)
            budget -= sum(n for _, n in plan)
            in_use += group.num_running_seqs

    def _common_hits(self, group: SequenceGroup) -> list[Tables]:
        """The active sequences' cached prefixes, all of one length: a group advances together.
        None for a request that wants its prompt's logprobs: a cached position has no logits
        to score the prompt token after it (vLLM does not look either)."""
        seqs = group.active
        if group.params.prompt_logprobs is not None:
            return [self.blocks.cached_prefix(s, 0) for s in seqs]
        hits = [self.blocks.cached_prefix(s) for s in seqs]
        common = min(len(hit[0]) for hit in hits)
        if any(len(hit[0]) != common for hit in hits):
            hits = [self.blocks.cached_prefix(s, common) for s in seqs]
        if any(len(hit[0]) != common for hit in hits):  # a window found at one length and not another
            hits = [self.blocks.cached_prefix(s, 0) for s in seqs]
        return hits

    @staticmethod
    def _add_chunks(out: SchedulerOutput, group: SequenceGroup, plan) -> None:
        for seq, n in plan:
            out.chunks.append(ScheduledChunk(seq, group, seq.num_computed_tokens, n))

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Evict a whole running request: swap it out if asked to and there is host room,
        else free its blocks so it is recomputed from its tokens later."""
        self.running.remove(group)
        scheduled = [c for c in out.chunks if c.group is group]
        for chunk in scheduled:
            out.chunks.remove(chunk)
        group.metrics.num_preemptions += 1
        self.num_preemptions += 1
        out.num_preempted += 1
        seqs = group.active
        if self.config.preemption_mode == "swap" and self.blocks.can_swap_out(seqs):
            self.blocks.free([s for s in group.seqs if s.finished])
            out.swap_out += self.blocks.swap_out(seqs)
            group.status = Status.SWAPPED
            self.swapped.appendleft(group)
        else:
            self.blocks.free(group.seqs)
            for seq in seqs:
                seq.num_computed_tokens = 0
            group.status = Status.WAITING
            self.waiting.appendleft(group)
