"""Verification of speculated tokens: which of a sequence's draft tokens the model keeps, and
the token after them, so that what comes out is distributed as the model alone would sample it.

A sequence that speculated d tokens is verified on d + 1 rows of logits: row j is the model's
distribution for the token after the j-th draft (row 0: after its last verified token). Each
row carries its draft (the last row none: -1) and its sequence's sampling parameters, with the
token's index in the output as its counter.

Greedy rows keep a draft that is the model's argmax, and put the argmax in place of the first
that is not: exactly the tokens greedy decoding gives. Random rows do rejection sampling
(Leviathan et al. 2023; Chen et al. 2023) with a deterministic proposal, q = 1 at the draft (an
n-gram's lookup, or a draft model's argmax, as vLLM's proposers give): the draft x is kept
with probability min(1, p(x) / q(x)) = p(x); when it is not, the token is drawn from
max(0, p - q) renormalised, which is p without x. So P(token = y) = p(x) [y = x] +
(1 - p(x)) p(y) / (1 - p(x)) [y != x] = p(y): the model's own distribution, whatever was
proposed. p is the distribution the sampler would draw from (temperature, top_k / top_p,
min_p applied). The acceptance test and the replacement draw use the row's own key, folded
with the token's index, on two streams: given the same drafts, a seeded request draws the same
in any batch. (Whether a step drafts for it can depend on the batch, through the budget and
blocks left for lookahead slots, and then its tokens may differ; their distribution does not.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from paged_jax.worker.sampler import (
    SamplerFlags,
    SamplerOutput,
    SamplingBatch,
    argmax,
    inverse_cdf,
    outputs,
    process_logits,
    row_keys,
    sampling_weights,
)

ACCEPTANCE_STREAM = 1  # folded into a row's key for the acceptance test (the draw uses the key itself)


@functools.partial(jax.jit, static_argnames=("flags",))
def verify(logits: jax.Array, index: jax.Array, drafts: jax.Array, batch: SamplingBatch,
           flags: SamplerFlags) -> tuple[jax.Array, SamplerOutput]:
    """logits float32[N, V] (a step's), index int32[R] (row r verifies logits[index[r]]),
    drafts int32[R] (-1: no draft on this row) -> (accepted bool[R]: the row's draft is kept;
    the row's token [R]: its draft where kept, else the replacement, with its score when
    logprobs are asked for)."""
    raw, logits = process_logits(logits[index], batch, flags)
    rows = jnp.arange(logits.shape[0])
    has_draft = drafts >= 0
    safe = jnp.where(has_draft, drafts, 0)
    best = argmax(logits)
    accepted = has_draft & (safe == best)
    replacement = best
    if flags.sample:
        weights = sampling_weights(logits, batch, flags)
        p_draft = weights[rows, safe] / weights.sum(axis=1)
        keys = row_keys(batch)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, ACCEPTANCE_STREAM)))(keys)
        residual = weights.at[rows, safe].multiply(jnp.where(has_draft, 0.0, 1.0))  # p without the draft
        drawn = inverse_cdf(residual, keys)
        random = batch.temperature > 0
        accepted = jnp.where(random, has_draft & (u < p_draft), accepted)
        replacement = jnp.where(random, drawn, best)
    tokens = jnp.where(accepted, safe, replacement)
    return accepted, outputs(raw, tokens, flags)
