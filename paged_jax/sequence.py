"""Requests and their sequences, as the scheduler tracks them.

Token-centric: a sequence is its tokens (prompt + output so far) and how many of them are in
the KV cache (`num_computed_tokens`). Each step computes some of the rest; when a step
computes up to the last token, the sequence samples its next one. Prefill, chunked prefill,
decode and recompute-after-preemption are all this one rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from paged_jax.beam_search import BeamSearch
from paged_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    import xgrammar


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted by recompute)
    RUNNING = "running"  # its blocks are in the device cache
    SWAPPED = "swapped"  # its blocks are in host memory (preempted by swap)
    FINISHED = "finished"


@dataclass(eq=False)  # an entity: compared (and hashed) by identity
class Sequence:
    seq_id: int
    index: int  # which of its request's n completions
    prompt_token_ids: list[int]
    key: np.ndarray  # uint32[2]: base of this sequence's sampling randomness
    detokenizer: IncrementalDetokenizer | None
    # A request with structured outputs: its grammar's state after output_token_ids
    # (structured_output.py), which masks the next token and ends the sequence with the grammar.
    matcher: xgrammar.GrammarMatcher | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Per KV group (kv/interface.py), logical block -> physical block; empty: holds none.
    block_tables: list[list[int]] = field(default_factory=list)
    born: bool = True  # False: a sibling waiting for its request's prompt, to fork from it
    block_names: list[bytes] = field(default_factory=list)  # prefix-cache names of its full blocks
    num_cached_blocks: int = 0  # leading blocks of its tables known to the prefix cache
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output, without joining the two lists."""
        prompt = len(self.prompt_token_ids)
        if stop <= prompt:
            return self.prompt_token_ids[start:stop]
        if start >= prompt:
            return self.output_token_ids[start - prompt : stop - prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt]


@dataclass(eq=False)
class SequenceGroup:
    """One request: its n sequences are scheduled and preempted together."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    status: Status = Status.WAITING
    error: str | None = None
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    beam: BeamSearch | None = None  # a beam search request: seqs are its live beams
    # The prompt's tokens scored so far (SamplingParams.prompt_logprobs), shared by the n
    # sequences: the first has nothing before it to predict it. Chunks of the prompt extend
    # it; a recomputed prompt does not (worker/executor.py: prompt_positions).
    prompt_logprobs: list[dict[int, Logprob] | None] = field(default_factory=lambda: [None])

    @property
    def active(self) -> list[Sequence]:
        """The sequences that compute: born and not finished."""
        return [s for s in self.seqs if s.born and not s.finished]

    @property
    def speculates(self) -> bool:
        """Whether its tokens may be speculated (spec_decode/): not a beam search, nor a request
        whose next token's inputs change with every token (penalties, a grammar, a logit_bias,
        which the verifier does not carry per draft position), nor a prompt about to fork."""
        p = self.params
        return (self.beam is None and not p.penalised and not p.logit_bias and p.structured_outputs is None
                and all(s.born for s in self.seqs))

    @property
    def unborn(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.born]

    @property
    def num_running_seqs(self) -> int:
        """How many sequences the request runs at most from now on (beams: the width)."""
        if self.beam:
            return 0 if self.beam.done else self.beam.params.beam_width
        return sum(not s.finished for s in self.seqs)

    @property
    def finished(self) -> bool:
        return self.beam.done if self.beam else all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=self._beam_outputs() if self.beam else self._sample_outputs(),
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
            num_cached_tokens=self.num_cached_tokens or 0,
            prompt_logprobs=list(self.prompt_logprobs) if self.params.prompt_logprobs is not None else None,
        )

    def _sample_outputs(self) -> list[CompletionOutput]:
        want_logprobs = self.params.logprobs is not None
        return [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if want_logprobs else None,
                logprobs=list(s.logprobs) if want_logprobs else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in self.seqs
        ]

    def _beam_outputs(self) -> list[CompletionOutput]:
        """The finished hypotheses, best first, once the search is done; the live beams before."""
        if not self.beam.done:
            return [CompletionOutput(i, s.text, list(s.output_token_ids), s.cumulative_logprob, None)
                    for i, s in enumerate(self.seqs)]
        return [CompletionOutput(i, h.text, list(h.token_ids), h.cum_logprob, None, h.finish_reason)
                for i, h in enumerate(self.beam.hypotheses)]
