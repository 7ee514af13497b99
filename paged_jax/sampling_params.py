"""vLLM's `SamplingParams`: what a request asks of the sampler, and the key its randomness
starts from.

Each row's randomness comes from its own key, folded from its request's seed (or the
engine's seed and the sequence id) and the index of the token being sampled, so a seeded
request gives the same output whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_LOGPROBS = 20  # vLLM's default max_logprobs


def requirement(owner) -> Callable[[bool, str, str], None]:
    """require(ok, name, rule) for the fields of owner: unless ok, a ValueError naming the
    class, the field, its rule and the value given, the same message for every argument."""
    def require(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{type(owner).__name__}.{name} {rule}, got {getattr(owner, name)!r}")
    return require


@dataclass
class SamplingParams:
    """vLLM's names and defaults. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    # Per prompt token after the first: its logprob and the top `prompt_logprobs` others
    # (RequestOutput.prompt_logprobs). Its cached prefix is not used: those positions have no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        require = requirement(self)
        require(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive integer")
        require(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        require(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer or None")
        require(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        require(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        require(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
                "max_tokens", "must be an integer >= 1 or None")
        require(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0")
        require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must be <= max_tokens")
        require(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
                "logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        require(self.prompt_logprobs is None
                or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
                "prompt_logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        require(self.stop_token_ids is None or all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids", "must be a list of token ids")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        require(all(isinstance(s, str) and s for s in stops), "stop", "must be a string or a list of non-empty strings")
        self.stop_strings = stops
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def request_key(seed: int) -> np.ndarray:
    """Key data (uint32[2]) of a threefry key, made on the host without a device call."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
