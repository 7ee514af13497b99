"""Requests and their sequences, as the scheduler tracks them.

Token-centric: a sequence is its tokens (prompt + output so far) and how many of them are in
the KV cache (`num_computed_tokens`). Each step computes some of the rest; when a step
computes up to the last token, the sequence samples its next one. Prefill, chunked prefill,
decode and recompute-after-preemption are all this one rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from paged_jax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from paged_jax.sampling import SamplingParams
from paged_jax.tokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted by recompute)
    RUNNING = "running"  # its blocks are in the device cache
    SWAPPED = "swapped"  # its blocks are in host memory (preempted by swap)
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    index: int  # which of its request's n completions
    prompt_token_ids: list[int]
    key: np.ndarray  # uint32[2]: base of this sequence's sampling randomness
    detokenizer: IncrementalDetokenizer | None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
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

    def token(self, position: int) -> int:
        prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < prompt else self.output_token_ids[position - prompt]


@dataclass
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

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.finished]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        want_logprobs = self.params.logprobs is not None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
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
            ],
            finished=self.finished,
            metrics=self.metrics,
            error=self.error,
        )
