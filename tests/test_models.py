"""Our Flax models on the paged KV cache produce Hugging Face's logits (PyTorch on CPU is
the oracle) for every architecture variant we serve: prefill, decode through the cache,
ragged batches, every attention backend, and bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_checkpoints import VARIANTS, load_reference
from paged_session import PagedSession

from paged_jax import load_model

ALL = list(VARIANTS)


def hf_logits(reference, tokens) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor([list(tokens)])).logits[0].float().numpy()


def assert_logits_close(ours, expected, tolerance=1e-4):
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("variant", ALL)
def test_prefill_logits_match_hf(checkpoint, rng, variant):
    path = checkpoint(variant)
    model, reference = load_model(path, attention_backend="xla"), load_reference(path)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (13, 1, 40)]
    logits = PagedSession(model, rng).step(list(enumerate(prompts)))
    assert logits.shape == (3, 128) and logits.dtype == np.float32
    for ours, prompt in zip(logits, prompts):
        assert_logits_close(ours, hf_logits(reference, prompt)[-1])


@pytest.mark.parametrize("variant", ALL)
def test_decode_through_paged_cache_matches_hf_full_sequence(checkpoint, rng, variant):
    path = checkpoint(variant)
    model, reference = load_model(path, attention_backend="xla"), load_reference(path)
    texts = [rng.integers(0, 128, size=n).tolist() for n in (17, 26)]  # prompt + 8 decode tokens
    expected = [hf_logits(reference, t) for t in texts]
    session = PagedSession(model, rng, block_size=4)
    logits = session.step([(i, t[:-8]) for i, t in enumerate(texts)])
    for i, t in enumerate(texts):
        assert_logits_close(logits[i], expected[i][len(t) - 9])
    for step in range(8, 0, -1):  # both sequences decode together, crossing block boundaries
        logits = session.step([(i, [t[-step]]) for i, t in enumerate(texts)])
        for i, t in enumerate(texts):
            assert_logits_close(logits[i], expected[i][len(t) - step])


@pytest.mark.parametrize("variant", ["gpt2", "opt_350m_style", "qwen2"])
def test_ragged_batch_equals_each_sequence_alone(checkpoint, rng, variant):
    model = load_model(checkpoint(variant), attention_backend="xla")
    a, b, c = (rng.integers(0, 128, size=n).tolist() for n in (20, 31, 9))
    mixed = PagedSession(model, rng)
    mixed.step([(0, a[:-1]), (1, b[:12])])
    # One step mixing a decode, a second prompt chunk (chunked prefill) and a fresh prompt.
    together = mixed.step([(0, a[-1:]), (1, b[12:]), (2, c)])
    for seq, steps in [(0, [a[:-1], a[-1:]]), (1, [b[:12], b[12:]]), (2, [c])]:
        alone = PagedSession(model, rng)
        for tokens in steps:
            out = alone.step([(seq, tokens)])
        np.testing.assert_allclose(together[seq], out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_attention_backends_agree(checkpoint, rng, variant):
    path = checkpoint(variant)
    prompt = rng.integers(0, 128, size=21).tolist()
    results = []
    for backend in ("xla", "pallas_interpret"):
        session = PagedSession(load_model(path, attention_backend=backend), np.random.default_rng(0))
        results.append([session.step([(0, prompt)])] + [session.step([(0, [t])]) for t in (5, 77)])
    np.testing.assert_allclose(np.stack(results[0]), np.stack(results[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "opt"])
def test_bfloat16_within_bf16_tolerance(checkpoint, rng, variant):
    path = checkpoint(variant)
    model = load_model(path, dtype="bfloat16", attention_backend="xla")
    assert model.params["embed"]["embedding"].dtype == np.dtype("bfloat16")
    prompt = rng.integers(0, 128, size=24).tolist()
    session = PagedSession(model, rng)
    ours = [session.step([(0, prompt[:-2])])[0]] + [session.step([(0, [t])])[0] for t in prompt[-2:]]
    expected = hf_logits(load_reference(path), prompt)[-3:]
    error = np.max(np.abs(np.stack(ours) - expected)) / np.max(np.abs(expected))
    assert error < 5e-2
