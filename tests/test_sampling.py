"""The sampler draws from the distribution vLLM's parameters define: temperature, min_p,
top_k and top_p shape it (checked statistically on a small vocabulary), penalties follow
vLLM's formulas, greedy rows take the argmax, and logprobs are the raw model's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax.sampling_params import MAX_LOGPROBS, request_key
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, _adjust, empty_batch, sample

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
ROWS = 6000


def draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    batch = empty_batch(ROWS)
    batch.update(temperature=np.full(ROWS, temperature, np.float32), top_k=np.full(ROWS, top_k, np.int32),
                 top_p=np.full(ROWS, top_p, np.float32), min_p=np.full(ROWS, min_p, np.float32),
                 keys=np.stack([request_key(i) for i in range(ROWS)]))
    flags = SamplerFlags(sample=True, filter=top_k > 0 or top_p < 1, adjust=False, logprobs=False)
    logits = jnp.tile(jnp.asarray(LOGITS), (ROWS, 1))
    tokens = sample(logits, SamplingBatch(**batch), flags).tokens
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS)) / ROWS


def expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    p = np.exp(LOGITS / temperature)
    p /= p.sum()
    keep = p >= min_p * p.max()
    order = np.argsort(-p)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    mass_before = np.cumsum(q[order]) - q[order]
    keep[order[mass_before >= top_p]] = False
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=3), dict(top_p=0.6),
    dict(min_p=0.2), dict(top_k=5, top_p=0.8, temperature=0.8),
    dict(top_k=2, top_p=0.55),  # top_p applies to the top_k renormalised: only the first survives
], ids=str)
def test_samples_follow_the_filtered_distribution(params):
    freq, target = draw(**params), expected(**params)
    assert np.all(freq[target == 0] == 0), "a filtered-out token was sampled"
    assert np.max(np.abs(freq - target)) < 0.025  # about 4 standard errors at 6000 draws


def test_greedy_and_sampled_rows_share_a_batch():
    batch = empty_batch(4)
    batch["temperature"][:] = [0, 1, 0, 1]
    batch["keys"] = np.stack([request_key(i) for i in range(4)])
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    out = sample(logits, SamplingBatch(**batch),
                 SamplerFlags(True, False, False, True))
    argmax = np.argmax(np.asarray(logits), axis=1)
    assert out.tokens[0] == argmax[0] and out.tokens[2] == argmax[2]
    log_probs = jax.nn.log_softmax(logits, axis=1)
    np.testing.assert_allclose(out.logprobs, log_probs[jnp.arange(4), out.tokens], rtol=1e-6)
    assert out.top_ids.shape == (4, MAX_LOGPROBS)
    np.testing.assert_array_equal(out.top_ids[:, 0], argmax)


def test_penalties_follow_vllm_formulas():
    vocab = 6
    logits = np.array([[1.0, -1.0, 2.0, 0.5, -0.5, 0.0]], np.float32)
    batch = empty_batch(1)
    batch.update(presence=np.array([0.5], np.float32), frequency=np.array([0.25], np.float32),
                 repetition=np.array([2.0], np.float32), history=np.array([[0, 1, 2, 2, 2, 4, -1, -1]], np.int32),
                 output_start=np.array([2], np.int32), banned=np.array([[5, -1]], np.int32))
    # prompt [0, 1]; output [2, 2, 2, 4]; token 5 banned (min_tokens)
    expect = logits[0].copy()
    seen = [0, 1, 2, 4]
    expect[seen] = np.where(expect[seen] > 0, expect[seen] / 2.0, expect[seen] * 2.0)
    counts = np.bincount([2, 2, 2, 4], minlength=vocab)
    expect = expect - 0.25 * counts - 0.5 * (counts > 0)
    expect[5] = -np.inf
    got = np.asarray(_adjust(jnp.asarray(logits), SamplingBatch(**batch)))
    np.testing.assert_allclose(got[0], expect, rtol=1e-6)


def test_sampling_spans_blocks_of_a_large_vocabulary():
    """Weight spread over several 128-token blocks of the two-level search, with zeros."""
    vocab, rows = 1000, 8000
    logits = np.full(vocab, -np.inf, np.float32)
    chosen = np.array([3, 127, 128, 500, 640, 999])
    logits[chosen] = np.log([0.1, 0.2, 0.15, 0.25, 0.2, 0.1])
    batch = empty_batch(rows)
    batch.update(temperature=np.ones(rows, np.float32), keys=np.stack([request_key(i) for i in range(rows)]))
    tokens = sample(jnp.tile(jnp.asarray(logits), (rows, 1)), SamplingBatch(**batch),
                    SamplerFlags(True, False, False, False)).tokens
    freq = np.bincount(np.asarray(tokens), minlength=vocab) / rows
    assert set(np.flatnonzero(freq)) <= set(chosen.tolist())
    np.testing.assert_allclose(freq[chosen], [0.1, 0.2, 0.15, 0.25, 0.2, 0.1], atol=0.02)
