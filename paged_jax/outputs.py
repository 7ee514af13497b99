"""What a request returns, with vLLM's class and field names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless logprobs were requested
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None  # why a request failed on its own (the others carry on)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (none without one)
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first (nothing
    # predicts it), then its logprob and the top ones, from the logits at the position before.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass
class BeamSearchSequence:
    """One finished beam, as vLLM's `LLM.beam_search` returns it."""

    tokens: list[int]  # the prompt's and the generated ones (with the EOS that ended it)
    cum_logprob: float
    text: str | None = None  # the generated text, without the EOS unless include_stop_str_in_output
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first (by length-penalised score)
    error: str | None = None  # why the request failed on its own
