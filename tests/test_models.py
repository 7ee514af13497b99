"""Our Flax models on the paged KV cache produce Hugging Face's logits (PyTorch on CPU is
the oracle) for every architecture variant we serve: prefill, decode through the cache (both
past the sliding windows of the variants that have one), ragged batches, every attention
backend, and bfloat16. Configs written before transformers 5 read the same as its own, and
what we cannot serve exactly is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from hf_checkpoints import VARIANTS, load_reference
from paged_session import PagedSession

from paged_jax import load_model
from paged_jax.model.config import from_hf_config

ALL = list(VARIANTS)
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2)
# What configs wrote before transformers 5 moved it into `rope_parameters` and `layer_types`
# (Gemma 2 wrote nothing: its layers alternate; Qwen2 slides from max_window_layers on).
OLDER_FIELDS = {
    "Gemma2ForCausalLM": (transformers.Gemma2Config, dict(sliding_window=8, rope_theta=5000.0)),
    "Gemma3ForCausalLM": (transformers.Gemma3TextConfig, dict(
        sliding_window=8, sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "GPTNeoXForCausalLM": (transformers.GPTNeoXConfig, dict(rotary_pct=0.25, rotary_emb_base=5000)),
    "Phi3ForCausalLM": (transformers.Phi3Config, dict(partial_rotary_factor=0.5, rope_theta=5000.0,
                                                      sliding_window=16)),
    "Qwen2ForCausalLM": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=16,
                                                        max_window_layers=3)),
}


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


def transformers_5_config(arch: str, **fields) -> dict:
    make, _ = OLDER_FIELDS[arch]
    return {**make(**SIZES, **fields).to_dict(), "architectures": [arch]}


@pytest.mark.parametrize("arch", list(OLDER_FIELDS))
def test_configs_older_than_transformers_5_read_as_it_reads_them(arch):
    older = OLDER_FIELDS[arch][1]
    new = transformers_5_config(arch, **older)
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters")} | older
    assert from_hf_config(old) == from_hf_config(new)


@pytest.mark.parametrize("arch, field, value, message", [
    ("Phi3ForCausalLM", "rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                            "long_factor": [2.0] * 8}, "unsupported rope scaling type 'longrope'"),
    ("Gemma3ForCausalLM", "rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                              "sliding_attention": {"rope_type": "linear", "factor": 2.0}},
     "rope scaling on sliding-window layers"),
    ("Gemma3ForCausalLM", "use_bidirectional_attention", True, "bidirectional attention"),
])
def test_what_we_cannot_serve_exactly_is_refused(arch, field, value, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**transformers_5_config(arch), field: value})
