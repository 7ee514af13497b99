"""The jitted sampler that turns logits into tokens.

The sampler sees one row of logits per sequence that samples this step, with that row's
parameters as arrays, so one compiled function serves a batch mixing greedy and random
requests. Processing follows vLLM: a grammar's mask first (tokens it disallows get -inf, as
vLLM applies the bitmask to the model's logits), then logit_bias, penalties and min_tokens,
then greedy rows take the argmax; others divide by temperature, keep the top_k and the top_p
nucleus, drop tokens below min_p x the top probability, and sample by inverting the
cumulative distribution.
Logprobs are those of the masked model distribution (`score`, which also scores a prompt's
own tokens): as in vLLM, they see the grammar and not the bias or penalties.

Features with a cost (filtering, which sorts the vocabulary; penalties, which scatter the
token history; grammar masks, unpacked over the vocabulary; logit_bias; logprobs) are static
switches of the compiled sampler, on only when a row in the batch asks for them: their inputs
are one column wide otherwise, so rows without them pay nothing.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.sampling_params import MAX_LOGPROBS, request_key


class SamplerFlags(NamedTuple):
    """Static switches: one compiled sampler per combination in use."""

    sample: bool  # some row samples (else all greedy)
    filter: bool  # some row uses top_k / top_p
    adjust: bool  # some row uses penalties or has tokens banned by min_tokens
    logprobs: bool  # some row asks for logprobs
    mask: bool = False  # some row follows a grammar (structured outputs)
    bias: bool = False  # some row has a logit_bias


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
    # The tokens each row may sample, packed: bit v % 32 of word v // 32 (xgrammar's layout);
    # all ones for a row without a grammar. W = ceil(V / 32) when masking, else 1.
    bitmask: jax.Array  # int32[S, W]
    bias_tokens: jax.Array  # int32[S, B]: logit_bias's tokens, -1 padded (B = 1 unless biasing)
    bias_values: jax.Array  # float32[S, B]: what each adds to its logit


def empty_batch(num_rows: int) -> dict[str, np.ndarray]:
    """SamplingBatch fields (numpy) for num_rows rows that sample nothing special (greedy, no
    filter, penalty, ban, grammar or bias): what pads a step's batch, and the start of a real
    one, whose rows are then filled in place. `SamplingBatch(**empty_batch(n))` feeds `sample`
    outside a step."""
    return dict(
        temperature=np.zeros(num_rows, np.float32), top_k=np.zeros(num_rows, np.int32),
        top_p=np.ones(num_rows, np.float32), min_p=np.zeros(num_rows, np.float32),
        keys=np.tile(request_key(0), (num_rows, 1)), counters=np.zeros(num_rows, np.int32),
        presence=np.zeros(num_rows, np.float32), frequency=np.zeros(num_rows, np.float32),
        repetition=np.ones(num_rows, np.float32), history=np.full((num_rows, 1), -1, np.int32),
        output_start=np.zeros(num_rows, np.int32), banned=np.full((num_rows, 1), -1, np.int32),
        bitmask=np.full((num_rows, 1), -1, np.int32), bias_tokens=np.full((num_rows, 1), -1, np.int32),
        bias_values=np.zeros((num_rows, 1), np.float32),
    )


class SamplerOutput(NamedTuple):
    tokens: jax.Array  # int32[S]
    logprobs: jax.Array  # float32[S]: the sampled token's logprob (0 when not requested)
    ranks: jax.Array  # int32[S]: its rank in the whole vocabulary, 1 = most likely (0 when not requested)
    top_ids: jax.Array  # int32[S, MAX_LOGPROBS] (width 0 when not requested)
    top_logprobs: jax.Array  # float32[S, MAX_LOGPROBS]


def _mask(logits, bitmask):
    """-inf where a row's packed bitmask has a 0 bit: tokens its grammar does not allow now."""
    num_rows, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [S, W, 32], low bit first
    allowed = bits.reshape(num_rows, -1)[:, :vocab] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def _bias(logits, batch: SamplingBatch):
    """logit_bias: each row's values added to its tokens' logits."""
    rows = jnp.arange(logits.shape[0])[:, None]
    tokens = jnp.where(batch.bias_tokens >= 0, batch.bias_tokens, logits.shape[1])  # padding is dropped
    return logits.at[rows, tokens].add(batch.bias_values, mode="drop")


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


def argmax(logits):
    """The first index of each row's maximum: jnp.argmax's answer from two plain reductions,
    which a CPU vectorises (the value-and-index reduction of jnp.argmax it does not, and over
    a vocabulary that costs more than the two passes)."""
    top = logits.max(axis=1, keepdims=True)
    index = jnp.arange(logits.shape[1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(logits == top, index, logits.shape[1]), axis=1), logits.shape[1] - 1)


def row_keys(batch: SamplingBatch):
    """Each row's key for the token it samples now: its sequence's key with the token's index
    folded in, so a seeded request draws the same whatever else is in the batch."""
    return jax.vmap(lambda data, i: jax.random.fold_in(jax.random.wrap_key_data(data), i))(batch.keys, batch.counters)


def inverse_cdf(weights, keys, width: int = 128):
    """Draw a token per row with probability proportional to its weight (float32[S, V] >= 0).

    One uniform number per row, from the row's key, is located in the row's cumulative
    weights: exact, and S random numbers rather than S x V. The search is two-level (which
    block of `width` tokens, then where inside it) because a prefix sum over the whole
    vocabulary is slow on a CPU."""
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


def process_logits(logits, batch: SamplingBatch, flags: SamplerFlags):
    """(the masked model logits, what sampling draws from: masked, biased, penalised). The
    first are what logprobs report."""
    if flags.mask:
        logits = _mask(logits, batch.bitmask)
    raw = logits
    if flags.bias:
        logits = _bias(logits, batch)
    if flags.adjust:
        logits = _adjust(logits, batch)
    return raw, logits


def sampling_weights(logits, batch: SamplingBatch, flags: SamplerFlags):
    """Each row's distribution for random sampling, unnormalised (the top token weighs 1):
    divided by temperature, filtered to top_k / top_p, tokens below min_p x the top dropped."""
    temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    scaled = logits / temperature
    if flags.filter:
        scaled = _filter(scaled, batch)
    weights = jnp.exp(scaled - scaled.max(axis=1, keepdims=True))
    return jnp.where(weights >= batch.min_p[:, None], weights, 0.0)


def outputs(raw, tokens, flags: SamplerFlags) -> SamplerOutput:
    """The tokens, scored under the masked model logits when a row asks for logprobs."""
    if flags.logprobs:
        return score(raw, tokens)
    num_rows = tokens.shape[0]
    empty = jnp.zeros((num_rows, 0))
    return SamplerOutput(tokens, jnp.zeros(num_rows), jnp.zeros(num_rows, jnp.int32), empty.astype(jnp.int32), empty)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample(logits: jax.Array, batch: SamplingBatch, flags: SamplerFlags) -> SamplerOutput:
    """logits float32[S, V] -> one token per row."""
    raw, logits = process_logits(logits, batch, flags)
    tokens = argmax(logits)
    if flags.sample:
        sampled = inverse_cdf(sampling_weights(logits, batch, flags), row_keys(batch))
        tokens = jnp.where(batch.temperature > 0, sampled, tokens)
    return outputs(raw, tokens, flags)


@jax.jit
def score(logits: jax.Array, tokens: jax.Array) -> SamplerOutput:
    """logits float32[S, V], tokens int32[S] -> each token's logprob under its row (float32
    log-softmax over the vocabulary), its rank and the row's top MAX_LOGPROBS: what `sample`
    reports for the tokens it draws, and for a prompt's own tokens, which nobody draws."""
    log_probs = jax.nn.log_softmax(logits, axis=1)
    top_logprobs, top_ids = jax.lax.top_k(log_probs, min(MAX_LOGPROBS, logits.shape[1]))
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=1)[:, 0]
    ranks = jnp.sum(log_probs > chosen[:, None], axis=1, dtype=jnp.int32) + 1
    return SamplerOutput(tokens, chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)
