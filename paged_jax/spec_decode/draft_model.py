"""A draft model proposes: a smaller model with the target's vocabulary runs in the same
engine, over the same block tables, in a paged cache of its own (the same block ids, its own
pages), and proposes its greedy continuation.

Its cache follows the target's step by step. Each step it computes what the target computes
(the same chunks, the same block moves: swaps and copy-on-write copies apply to both caches),
then, for each sequence with lookahead slots, the draft tokens: the first from the chunk's
logits, the others from a decode loop of its own that feeds each draft back (its K/V lands in
the lookahead slots the target is about to verify). A draft the target rejects leaves wrong
K/V in the draft's cache at its position, which the next step's chunk, starting there,
overwrites. When every draft is kept, the last was never fed to the draft: its next chunk
starts one token earlier. Where the target finds a prefix in its cache, the draft takes its own
pages of the same blocks as computed (a block's last token may be missing there when a
sequence's drafts were all kept as the block filled: a worse draft, never a wrong output, as
the target verifies every token).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence as Seq

import jax

from paged_jax.core.scheduler import ScheduledChunk, SchedulerOutput
from paged_jax.engine_args import EngineArgs, SpeculativeConfig
from paged_jax.model.cache import layout_of
from paged_jax.model.loader import read_config
from paged_jax.outputs import RequestMetrics
from paged_jax.sampling_params import SamplingParams
from paged_jax.sequence import Sequence, SequenceGroup
from paged_jax.worker.executor import Executor
from paged_jax.worker.loading import load_runner
from paged_jax.worker.model_runner import ModelRunner

# The draft samples greedily for every request: a deterministic proposal (rejection_sampler.py).
GREEDY = SequenceGroup("draft", None, [], SamplingParams(temperature=0.0, max_tokens=1), [], RequestMetrics(0.0))


def check_single_global_group(path: str, role: str) -> None:
    windows = layout_of(read_config(path)).windows
    if windows != (None,):
        raise ValueError(f"speculative_config: the {role} model {path} has sliding-window layers; a draft model "
                         "shares the target's block tables, which needs every layer of both to attend globally")


class DraftModelProposer:
    follows_every_step = True  # its cache holds what it computed alongside the target, step by step

    def __init__(self, runner: ModelRunner, num_speculative_tokens: int):
        self.runner = runner
        self.k = num_speculative_tokens
        # Per sequence, the tokens the draft computed up to (weak: a finished sequence drops out).
        self.computed: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()

    @classmethod
    def load(cls, config: SpeculativeConfig, args: EngineArgs, devices: Seq[jax.Device] | None, target: Executor,
             max_num_batched_tokens: int) -> DraftModelProposer:
        """The draft model on the target's devices, with a cache of the target's blocks."""
        check_single_global_group(args.model, "target")
        check_single_global_group(config.model, "draft")
        spec = target.spec
        draft_args = dataclasses.replace(args, model=config.model, tokenizer=None, revision=None,
                                         max_model_len=spec.max_model_len, speculative_config=None)
        # Its chunks are the target's, each at most one token longer (the draft catching up).
        runner = load_runner(draft_args, devices, max_num_batched_tokens + args.max_num_seqs, spec.eos_token_ids,
                             blocks=(spec.num_blocks, spec.num_swap_blocks))
        if runner.spec.vocab_size != spec.vocab_size:
            raise ValueError(f"speculative_config.model {config.model} has a vocabulary of {runner.spec.vocab_size} "
                             f"tokens, the target {spec.vocab_size}: a draft model needs the target's vocabulary")
        return cls(runner, config.num_speculative_tokens)

    def warm_up(self, background: bool) -> None:
        self.runner.warm_up(self.k, background=background)

    def propose(self, out: SchedulerOutput) -> None:
        chunks = [self._follow(c) for c in out.chunks]
        moves = SchedulerOutput(chunks, swap_out=out.swap_out, swap_in=out.swap_in, copies=out.copies)
        rows = [(i, c, c.seq) for i, c in enumerate(chunks) if out.chunks[i].num_lookahead]
        first = self.runner.execute(moves, rows).sampled
        for c in chunks:
            self.computed[c.seq] = c.num_cached + c.num_new
        if not rows:
            return
        speculating = [out.chunks[i] for i, _, _ in rows]
        drafts = [[s[0].token] for s in first]
        longest = max(c.num_lookahead for c in speculating)
        if longest > 1:  # feed each draft back: a decode loop of the draft model
            loop = [ScheduledChunk(c.seq, GREEDY, c.seq.num_tokens, 1, 1, d) for c, d in zip(speculating, drafts)]
            limits = [c.seq.num_tokens + c.num_lookahead - 1 for c in speculating]
            more = self.runner.execute(SchedulerOutput(loop), [(i, c, c.seq) for i, c in enumerate(loop)],
                                       longest - 1, limits).sampled
            for d, tokens in zip(drafts, more):
                d += [s.token for s in tokens]
            for c in speculating:
                self.computed[c.seq] = c.seq.num_tokens + c.num_lookahead - 1
        for c, d in zip(speculating, drafts):
            c.propose(d[: c.num_lookahead])

    def _follow(self, chunk: ScheduledChunk) -> ScheduledChunk:
        """The draft's chunk for a target chunk: the same tokens without the drafts, from one
        token earlier if the draft's last step left the token before them unfed."""
        start = chunk.num_cached
        if start and self.computed.get(chunk.seq) == start - 1:
            start -= 1
        end = chunk.num_cached + chunk.num_new - chunk.num_lookahead
        return ScheduledChunk(chunk.seq, GREEDY, start, end - start)
