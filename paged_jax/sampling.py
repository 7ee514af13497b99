"""Sampling: vLLM's `SamplingParams`, and the jitted sampler that turns logits into tokens.

The sampler sees one row of logits per sequence that samples this step, with that row's
parameters as arrays, so one compiled function serves a batch mixing greedy and random
requests. Processing follows vLLM: penalties and min_tokens on the raw logits, then greedy
rows take the argmax; others divide by temperature, keep the top_k and the top_p nucleus,
drop tokens below min_p x the top probability, and sample by inverting the cumulative
distribution.
Logprobs are those of the raw model distribution.

Each row's randomness comes from its own key, folded from its request's seed (or the
engine's seed and the sequence id) and the index of the token being sampled, so a seeded
request gives the same output whatever else is in the batch.

Features with a cost (filtering, which sorts the vocabulary; penalties, which scatter the
token history; logprobs) are static switches of the compiled sampler, on only when a row in
the batch asks for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20  # vLLM's default max_logprobs


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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        def require(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

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


class SamplerFlags(NamedTuple):
    """Static switches: one compiled sampler per combination in use."""

    sample: bool  # some row samples (else all greedy)
    filter: bool  # some row uses top_k / top_p
    adjust: bool  # some row uses penalties or has tokens banned by min_tokens
    logprobs: bool  # some row asks for logprobs


@flax.struct.dataclass
class SamplingBatch:
    """Per-row sampling inputs, padded to the step's sequence bucket."""

    temperature: jax.Array  # float32[S]; 0 = greedy
    top_k: jax.Array  # int32[S]; 0 = off
    top_p: jax.Array  # float32[S]
    min_p: jax.Array  # float32[S]
    keys: jax.Array  # uint32[S, 2]: each row's base key data
    counters: jax.Array  # int32[S]: index of the token being sampled (folded into the key)
    presence: jax.Array  # float32[S]
    frequency: jax.Array  # float32[S]
    repetition: jax.Array  # float32[S]
    history: jax.Array  # int32[S, H]: prompt + output tokens, -1 padded (H = 1 unless adjusting)
    output_start: jax.Array  # int32[S]: where the output begins in history
    banned: jax.Array  # int32[S, K]: tokens that may not be sampled now (min_tokens), -1 padded


class SamplerOutput(NamedTuple):
    tokens: jax.Array  # int32[S]
    logprobs: jax.Array  # float32[S]: the sampled token's logprob (0 when not requested)
    ranks: jax.Array  # int32[S]: its rank in the whole vocabulary, 1 = most likely (0 when not requested)
    top_ids: jax.Array  # int32[S, MAX_LOGPROBS] (width 0 when not requested)
    top_logprobs: jax.Array  # float32[S, MAX_LOGPROBS]


def request_key(seed: int) -> np.ndarray:
    """Key data (uint32[2]) of a threefry key, made on the host without a device call."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def _adjust(logits, batch: SamplingBatch):
    """Repetition / presence / frequency penalties and min_tokens bans on raw logits."""
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    history = jnp.where(batch.history >= 0, batch.history, vocab)  # padding is dropped
    is_output = jnp.arange(history.shape[1])[None, :] >= batch.output_start[:, None]
    seen = jnp.zeros(logits.shape, bool).at[rows, history].set(True, mode="drop")
    counts = jnp.zeros(logits.shape, jnp.int32).at[rows, jnp.where(is_output, history, vocab)].add(1, mode="drop")
    rep = batch.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency[:, None] * counts - batch.presence[:, None] * (counts > 0)
    banned = jnp.where(batch.banned >= 0, batch.banned, vocab)
    return logits.at[rows, banned].set(-jnp.inf, mode="drop")


def _filter(logits, batch: SamplingBatch):
    """Keep each row's top_k tokens, then the top_p nucleus of those (the smallest set whose
    renormalised probability reaches top_p), as vLLM does. logits are already divided by
    temperature."""
    vocab = logits.shape[1]
    ordered = jnp.sort(logits, axis=1)[:, ::-1]  # descending
    k = jnp.where(batch.top_k > 0, jnp.minimum(batch.top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=1)
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=1)  # renormalised over the top_k
    before = jnp.cumsum(probs, axis=1) - probs  # mass strictly above each sorted token
    in_nucleus = before < batch.top_p[:, None]
    cutoff = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=1, keepdims=True)
    return jnp.where((logits >= kth) & (logits >= cutoff), logits, -jnp.inf)


def _argmax(logits):
    """The first index of each row's maximum: jnp.argmax's answer from two plain reductions,
    which a CPU vectorises (a value-and-index reduction it does not: 3x slower over a
    vocabulary)."""
    top = logits.max(axis=1, keepdims=True)
    index = jnp.arange(logits.shape[1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(logits == top, index, logits.shape[1]), axis=1), logits.shape[1] - 1)


def _inverse_cdf(weights, batch: SamplingBatch, width: int = 128):
    """Draw a token per row with probability proportional to its weight (float32[S, V] >= 0).

    One uniform number per row, from the row's own key, is located in the row's cumulative
    weights: exact, and S random numbers rather than S x V. The search is two-level (which
    block of `width` tokens, then where inside it) because a prefix sum over the whole
    vocabulary is slow on a CPU."""
    keys = jax.vmap(lambda data, i: jax.random.fold_in(jax.random.wrap_key_data(data), i))(batch.keys, batch.counters)
    rows, vocab = weights.shape
    blocks = jnp.pad(weights, ((0, 0), (0, -vocab % width))).reshape(rows, -1, width)
    block_cdf = jnp.cumsum(blocks.sum(axis=2), axis=1)  # [S, num_blocks]
    u = (1.0 - jax.vmap(jax.random.uniform)(keys)) * block_cdf[:, -1]  # (0, total]: zero weight is never hit
    block = jnp.minimum(jnp.sum(block_cdf < u[:, None], axis=1), blocks.shape[1] - 1)
    before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, (block - 1)[:, None], axis=1)[:, 0], 0.0)
    inside = blocks[jnp.arange(rows), block]  # [S, width]
    offset = jnp.sum(before[:, None] + jnp.cumsum(inside, axis=1) < u[:, None], axis=1)
    last_nonzero = width - 1 - jnp.argmax((inside > 0)[:, ::-1], axis=1)  # guards rounding at the end
    return (block * width + jnp.minimum(offset, last_nonzero)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SamplerOutput:
    """logits float32[S, V] -> one token per row."""
    raw = logits
    if flags.adjust:
        logits = _adjust(logits, batch)
    tokens = _argmax(logits)
    if flags.sample:
        temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
        scaled = logits / temperature
        if flags.filter:
            scaled = _filter(scaled, batch)
        weights = jnp.exp(scaled - scaled.max(axis=1, keepdims=True))  # the top token weighs 1
        weights = jnp.where(weights >= batch.min_p[:, None], weights, 0.0)  # min_p: relative to the top
        sampled = _inverse_cdf(weights, batch)
        tokens = jnp.where(batch.temperature > 0, sampled, tokens)
    num_rows = logits.shape[0]
    if not flags.logprobs:
        empty = jnp.zeros((num_rows, 0))
        return SamplerOutput(tokens, jnp.zeros(num_rows), jnp.zeros(num_rows, jnp.int32), empty.astype(jnp.int32), empty)
    log_probs = jax.nn.log_softmax(raw, axis=1)
    top_logprobs, top_ids = jax.lax.top_k(log_probs, min(MAX_LOGPROBS, logits.shape[1]))
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=1)[:, 0]
    ranks = jnp.sum(log_probs > chosen[:, None], axis=1, dtype=jnp.int32) + 1
    return SamplerOutput(tokens, chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)
