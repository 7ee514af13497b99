"""KV pages in 8 bits (vLLM's kv_cache_dtype): the cache is sized in bytes, so fp8 pages hold
twice the blocks of bfloat16 ones and int8 pages (a float32 scale per token and KV head) nearly
twice; everything that moves or shares blocks moves their scales, so preemption, prefix caching
and beam search give exactly what the same cache dtype gives without them."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest
from serving import GREEDY, assert_all_blocks_free, generate_ids, make_llm, random_prompts

from paged_jax import LLM, BeamSearchParams, EngineArgs, SamplingParams
from paged_jax.model.cache import kv_cache_bytes_per_block
from paged_jax.model.config import from_hf_config

EMBEDDED = Path(__file__).parent.parent / "models" / "stdlib-llama"
EIGHT_BIT = ["fp8", "fp8_e5m2", "int8"]


@pytest.mark.parametrize("kv_cache_dtype, at_least", [("fp8", 1.9), ("fp8_e5m2", 1.9), ("int8", 1.85)])
def test_8bit_pages_hold_about_twice_the_blocks_of_bfloat16_in_the_same_memory(kv_cache_dtype, at_least):
    from paged_jax.model.cache import kv_dtype

    config = from_hf_config(json.loads((EMBEDDED / "config.json").read_text()))  # head_dim 64
    bfloat16 = kv_cache_bytes_per_block(config, 16, jnp.bfloat16)
    assert bfloat16 / kv_cache_bytes_per_block(config, 16, kv_dtype(kv_cache_dtype, jnp.bfloat16)) >= at_least


def test_an_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs("any", kv_cache_dtype="fp4").validate()


@pytest.fixture(scope="module")
def prompts():
    import numpy as np

    return random_prompts(np.random.default_rng(23), [9, 14, 6, 12, 8, 10])


@pytest.mark.parametrize("kv_cache_dtype", EIGHT_BIT)
def test_preemption_and_prefix_caching_change_nothing_on_8bit_pages(checkpoint, prompts, kv_cache_dtype):
    path = checkpoint("llama")
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    shared = [prompts[0] + p for p in prompts[1:4]]  # a common prefix: cached blocks and their scales reused
    roomy = make_llm(path, kv_cache_dtype=kv_cache_dtype)
    expected = generate_ids(roomy, prompts + shared, params)
    assert roomy.stats()["kv_cache_dtype"] == kv_cache_dtype
    for options in (dict(num_gpu_blocks_override=16, preemption_mode="recompute"),
                    dict(num_gpu_blocks_override=16, preemption_mode="swap", swap_space=0.001),
                    dict(enable_prefix_caching=True)):
        llm = make_llm(path, kv_cache_dtype=kv_cache_dtype, **options)
        assert generate_ids(llm, prompts + shared, params) == expected, options
        assert_all_blocks_free(llm)
    assert llm.stats()["prefix_cache_hit_rate"] > 0


def test_beam_search_forks_and_copies_int8_scales_with_their_pages(checkpoint, prompts):
    path = checkpoint("llama")
    params = BeamSearchParams(beam_width=3, max_tokens=9)
    shared = make_llm(path, kv_cache_dtype="int8")
    copied = make_llm(path, kv_cache_dtype="int8", enable_block_sharing=False)  # forks copy every block
    ours = [[s.tokens for s in out.sequences] for out in shared.beam_search(
        [{"prompt_token_ids": p} for p in prompts[:3]], params)]
    theirs = [[s.tokens for s in out.sequences] for out in copied.beam_search(
        [{"prompt_token_ids": p} for p in prompts[:3]], params)]
    assert ours == theirs
    assert shared.stats()["num_copied_blocks"] > 0
    assert_all_blocks_free(shared)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "int8"])
def test_the_pallas_kernels_read_8bit_pages_as_the_xla_backend_does(checkpoint, prompts, kv_cache_dtype):
    path = checkpoint("llama")
    outputs = [generate_ids(make_llm(path, kv_cache_dtype=kv_cache_dtype, attention_backend=backend),
                            prompts[:2], GREEDY) for backend in ("xla", "pallas_interpret")]
    assert outputs[0] == outputs[1]


def test_the_llm_takes_kv_cache_dtype_as_vllm_does(checkpoint):
    llm = LLM(str(checkpoint("llama")), kv_cache_dtype="fp8", num_gpu_blocks_override=8, warm_up=False)
    float32 = make_llm(checkpoint("llama"), block_size=llm.stats()["block_size"]).stats()
    assert 4 * llm.stats()["kv_cache_bytes_per_block"] == float32["kv_cache_bytes_per_block"]
