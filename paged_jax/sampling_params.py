"""vLLM's `SamplingParams`: what a request asks of the sampler, and the key its randomness
starts from; and vLLM's `StructuredOutputsParams`, the grammar a request's output must follow.

Each row's randomness comes from its own key, folded from its request's seed (or the
engine's seed and the sequence id) and the index of the token being sampled, so a seeded
request gives the same output whatever else is in the batch.

Both are plain data, checked field by field here; a grammar is parsed and compiled where
the tokenizer is, by the engine (structured_output.py).
"""

from __future__ import annotations

import math
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


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """vLLM's: the one grammar a request's output must follow, given as exactly one of a JSON
    schema (a dict, or its text), a regular expression, a list of choices (the output is one
    of them), an EBNF grammar (xgrammar's dialect, rule `root` first) or json_object=True
    (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        require = requirement(self)
        require(self.json is None or isinstance(self.json, (str, dict)), "json", "must be a JSON schema (dict or str)")
        require(self.regex is None or isinstance(self.regex, str), "regex", "must be a string")
        require(self.choice is None or (isinstance(self.choice, list) and self.choice
                                        and all(isinstance(c, str) and c for c in self.choice)),
                "choice", "must be a non-empty list of non-empty strings")
        require(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()), "grammar",
                "must be a non-empty string")
        require(self.json_object in (None, True, False), "json_object", "must be a boolean")
        given = self._given()
        if len(given) != 1:
            raise ValueError(f"StructuredOutputsParams needs exactly one of {', '.join(STRUCTURED_KINDS)}, "
                             f"got {' and '.join(given) or 'none'}")

    @property
    def kind(self) -> str:
        """The field that holds the grammar: json, regex, choice, grammar or json_object."""
        return self._given()[0]

    def _given(self) -> list[str]:
        return [name for name in STRUCTURED_KINDS if getattr(self, name) not in (None, False)]


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
    # The output follows this grammar (structured_output.py); it ends where the grammar does.
    structured_outputs: StructuredOutputsParams | None = None
    # token id -> added to its logit before sampling (after the logprobs, which stay the
    # model's, as in vLLM). The server clamps each to [-100, 100], as OpenAI and vLLM do.
    logit_bias: dict[int, float] | None = None
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
        require(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs", "must be a StructuredOutputsParams or None")
        require(self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
            _is_int(t) and t >= 0 and _is_real(b) and math.isfinite(b) for t, b in self.logit_bias.items())),
            "logit_bias", "must map token ids to finite numbers")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        require(all(isinstance(s, str) and s for s in stops), "stop", "must be a string or a list of non-empty strings")
        self.stop_strings = stops
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} if self.logit_bias else None
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def request_key(seed: int) -> np.ndarray:
    """Key data (uint32[2]) of a threefry key, made on the host without a device call."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
