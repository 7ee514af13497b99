"""Sliding windows free their blocks (vLLM v1's hybrid KV cache manager): a layer that attends
over the last W tokens needs only the blocks holding them, so its KV group frees every block
the tokens still to come cannot see, while a global group keeps all of them. Outputs stay
exactly Hugging Face's, with the blocks gone."""

from __future__ import annotations

import pytest
import torch
import transformers
from hf_checkpoints import LLAMA, load_reference
from serving import assert_all_blocks_free, generate_ids, hf_greedy, make_llm, random_prompts

from paged_jax import SamplingParams
from paged_jax.kv.interface import NULL_BLOCK
from paged_jax.model.cache import KVLayout, kv_layout


@pytest.fixture(scope="module")
def window16(tmp_path_factory):
    """Every layer attends over a 16-token window; positions up to 256."""
    torch.manual_seed(16)
    config = transformers.MistralConfig(**{**LLAMA, "max_position_embeddings": 256}, sliding_window=16)
    path = tmp_path_factory.mktemp("window16")
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def test_layers_form_equal_groups_by_window_sharing_pools():
    assert kv_layout([None] * 4) == KVLayout((None,), (0, 0, 0, 0), (0, 1, 2, 3))  # one group, a pool per layer
    gemma2 = kv_layout([8, None, 8, None])
    assert (gemma2.windows, gemma2.group_of, gemma2.pool_of) == ((8, None), (0, 1, 0, 1), (0, 0, 1, 1))
    gemma3 = kv_layout([16] * 5 + [None])  # five sliding layers to one global: six groups of one
    assert gemma3.windows == (16,) * 5 + (None,) and gemma3.num_pools == 1


def test_a_230_token_sequence_with_a_16_token_window_runs_in_6_blocks_of_8(window16, rng):
    [prompt] = random_prompts(rng, [30])
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    llm = make_llm(window16, block_size=8, num_gpu_blocks_override=6, max_num_batched_tokens=64,
                   max_model_len=256)
    [ours] = generate_ids(llm, [prompt], params)
    assert ours == hf_greedy(load_reference(window16), prompt, 200)
    assert llm.engine.stats()["num_preemptions"] == 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("variant, block_size, options", [
    ("gemma2", 8, dict(enable_prefix_caching=True)),
    ("gemma3", 16, dict(num_gpu_blocks_override=24, preemption_mode="swap", swap_space=0.001)),
    ("gemma3", 8, dict(num_gpu_blocks_override=30, enable_prefix_caching=True)),
])
def test_hybrid_models_stay_exact_as_sliding_groups_free_blocks(checkpoint, rng, variant, block_size, options):
    path = checkpoint(variant)
    shared = random_prompts(rng, [40])[0]
    prompts = [shared + tail for tail in random_prompts(rng, [3, 9, 1, 17])]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = make_llm(path, block_size=block_size, **options)
    ours = generate_ids(llm, prompts, params)
    reference = load_reference(path)
    assert ours == [hf_greedy(reference, prompt, 24) for prompt in prompts]
    assert_all_blocks_free(llm)


def test_the_snapshot_shows_each_group_and_the_sliding_groups_hold_their_window(checkpoint, rng):
    llm = make_llm(checkpoint("gemma3"), block_size=4)  # layers: sliding (16), global, sliding
    engine = llm.engine
    [prompt] = random_prompts(rng, [60])
    engine.add_request("a", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=30))
    for _ in range(20):
        engine.step()
        seq = engine.kv_snapshot().sequence("a")
        if seq.num_tokens >= 64:
            break
    assert engine.block_manager.windows == (16, 16, None)  # groups by window, then layer
    sliding, sliding_too, global_ = seq.group_tables
    assert NULL_BLOCK not in global_ and len(global_) * 4 >= seq.num_tokens - 1
    for table in (sliding, sliding_too):
        held = [b for b in table if b != NULL_BLOCK]
        assert len(held) <= -(-(2 * 16 - 1) // 4) + 1, "only the window's blocks are held"
        assert table == (NULL_BLOCK,) * (len(table) - len(held)) + tuple(held), "freed from the front"
    held = [b for table in seq.group_tables for b in table if b != NULL_BLOCK]
    assert len(held) == len(set(held)), "each group holds blocks of its own"
    assert seq.block_table == sliding


def test_no_step_compiles_after_warm_up_while_sliding_groups_free_blocks(checkpoint, rng):
    llm = make_llm(checkpoint("gemma3"), warm_up=True, max_num_batched_tokens=32, num_gpu_blocks_override=64,
                   enable_prefix_caching=True)
    prompts = random_prompts(rng, [3, 50, 17, 40, 8])
    prompts[3][:20] = prompts[1][:20]  # a prefix-cache hit
    params = [SamplingParams(temperature=t, max_tokens=m, ignore_eos=True, seed=i)
              for i, (t, m) in enumerate(zip([0, 1, 0.7, 0, 1], [30, 12, 3, 20, 7]))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [30, 12, 3, 20, 7]
    assert llm.stats()["compiles_after_warmup"] == 0
    assert_all_blocks_free(llm)
