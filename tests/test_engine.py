"""The serving engine: greedy generations equal Hugging Face `generate` token for token,
whatever the scheduler does (roomy cache, preemption by recompute or swap, chunked prefill);
no KV block leaks; a bad request fails alone; no step shape compiles after warm-up."""

from __future__ import annotations

import pytest
from hf_checkpoints import load_reference
from serving import GREEDY, assert_all_blocks_free, generate_ids, hf_greedy, make_llm, random_prompts

from paged_jax import EngineArgs, LLMEngine, SamplingParams


@pytest.mark.parametrize("variant", ["gpt2", "opt_350m_style", "llama", "qwen2", "qwen3", "pythia", "qwen3_moe"])
def test_greedy_equals_hf_generate_with_a_roomy_cache(checkpoint, rng, variant):
    path = checkpoint(variant)
    prompts = random_prompts(rng, [5, 23, 40, 2, 11])
    ours = generate_ids(make_llm(path), prompts)
    reference = load_reference(path)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(reference, prompt, 10)


@pytest.mark.parametrize("variant, mode", [("llama", "recompute"), ("llama", "swap"), ("mixtral", "recompute")])
def test_greedy_equals_hf_when_a_tiny_cache_forces_preemption(checkpoint, rng, variant, mode):
    path = checkpoint(variant)
    prompts = random_prompts(rng, [9, 14, 6, 12, 8, 10])
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    llm = make_llm(path, num_gpu_blocks_override=16, preemption_mode=mode, swap_space=0.001)
    ours = generate_ids(llm, prompts, params)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0
    swapped = stats["num_swapped_out_blocks"]
    assert (swapped > 0 and stats["num_swapped_in_blocks"] == swapped) if mode == "swap" else swapped == 0
    reference = load_reference(path)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(reference, prompt, 14)
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("variant, tight_blocks", [("phi3", 4), ("gemma2", 7), ("gemma3", 11), ("qwen3", 5),
                                                   ("pythia", 5), ("mixtral", 5), ("qwen3_moe", 5)])
def test_greedy_equals_hf_in_blocks_of_8_and_of_16_under_preemption(checkpoint, rng, variant, tight_blocks):
    """Every family of today, with prompts and generations longer than the sliding windows
    (gemma2 8 tokens, phi3 and gemma3 16; gemma2 and gemma3 mix sliding and global layers): in
    blocks of 8 with room to spare, then in blocks of 16 in a cache so small that sequences are
    preempted and recomputed, a block or so over what the longest request needs (phi3 slides
    everywhere and frees; Gemma's global layers, and the models without a window, keep every
    block)."""
    path = checkpoint(variant)
    prompts = random_prompts(rng, [37, 9, 21, 50])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reference = load_reference(path)
    expected = [hf_greedy(reference, prompt, 12) for prompt in prompts]
    assert generate_ids(make_llm(path, block_size=8), prompts, params) == expected
    tight = make_llm(path, block_size=16, num_gpu_blocks_override=tight_blocks, preemption_mode="recompute")
    assert generate_ids(tight, prompts, params) == expected
    assert tight.stats()["num_preemptions"] > 0
    assert_all_blocks_free(tight)


def test_greedy_equals_hf_with_chunked_prefill(checkpoint, rng):
    path = checkpoint("opt")
    prompts = random_prompts(rng, [45, 30, 7])
    llm = make_llm(path, max_num_batched_tokens=16)  # every long prompt is split over steps
    ours = generate_ids(llm, prompts)
    reference = load_reference(path)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(reference, prompt, 10)


def test_repetition_penalty_matches_hf(checkpoint, rng):
    path = checkpoint("llama")
    prompts = random_prompts(rng, [12, 20])
    ours = generate_ids(make_llm(path), prompts,
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5))
    reference = load_reference(path)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(reference, prompt, 10, repetition_penalty=1.5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(checkpoint, rng):
    llm = make_llm(checkpoint("gpt2"))
    prompt = random_prompts(rng, [9])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = generate_ids(llm, [prompt], seeded)[0]
    others = random_prompts(rng, [20, 3, 31])
    unseeded = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": p} for p in [others[0], prompt, others[1], others[2]]],
                         [unseeded, seeded, unseeded, unseeded], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert generate_ids(llm, [prompt], seeded)[0] == alone
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99, ignore_eos=True)
    assert generate_ids(llm, [prompt], different_seed)[0] != alone


def test_parallel_samples_differ_and_are_all_returned(checkpoint, rng):
    llm = make_llm(checkpoint("llama"))
    [output] = llm.generate({"prompt_token_ids": random_prompts(rng, [7])[0]},
                            SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in output.outputs)
    assert_all_blocks_free(llm)


def test_a_bad_request_fails_alone(checkpoint, rng):
    llm = make_llm(checkpoint("llama"), num_gpu_blocks_override=20)  # 80 token slots
    good = random_prompts(rng, [6, 9])
    prompts = [
        {"prompt_token_ids": good[0]},
        {"prompt_token_ids": [5] * 126},  # prompt + max_tokens over max_model_len (128)
        {"prompt_token_ids": [500, 3]},  # not in the vocabulary
        "text needs a tokenizer, and this checkpoint has none",
        {"prompt_token_ids": good[1]},
    ]
    params = [GREEDY, GREEDY, GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert "max_model_len" in outputs[1].error and outputs[1].outputs == []
    assert "[0, 128)" in outputs[2].error
    assert "tokenizer" in outputs[3].error
    assert "whole cache" in outputs[4].error  # 9 + 100 tokens fit max_model_len, not 20 blocks
    assert outputs[0].error is None and len(outputs[0].outputs[0].token_ids) == 10
    assert_all_blocks_free(llm)


def test_requests_that_can_never_fit_the_cache_are_rejected_at_add_time(checkpoint):
    engine = LLMEngine(EngineArgs(model=str(checkpoint("llama")), block_size=4, num_gpu_blocks_override=10,
                                  attention_backend="xla", warm_up=False))
    with pytest.raises(ValueError, match="whole cache"):
        engine.add_request("a", {"prompt_token_ids": [5] * 30}, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="enable_prefix_caching shares blocks across requests"):
        LLMEngine(EngineArgs(model=str(checkpoint("llama")), enable_prefix_caching=True, enable_block_sharing=False,
                             warm_up=False))
    with pytest.raises(ValueError, match="n=300 sequences can never be scheduled together"):
        engine.add_request("c", {"prompt_token_ids": [5]}, SamplingParams(n=300, max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("b", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2))
        engine.add_request("b", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=2))


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                          ("n", 0), ("max_tokens", 0), ("logprobs", 50), ("repetition_penalty", 0.0),
                                          ("presence_penalty", 3.0), ("stop", [""])])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_aborted_and_finished_requests_leave_every_block_free(checkpoint, rng):
    llm = make_llm(checkpoint("qwen2"), preemption_mode="swap", num_gpu_blocks_override=20, swap_space=0.001)
    engine = llm.engine
    for i, prompt in enumerate(random_prompts(rng, [10, 20, 5, 16])):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, SamplingParams(max_tokens=30, ignore_eos=True))
    for _ in range(6):
        engine.step()
    engine.abort_request("1")
    engine.abort_request("3")
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(llm)
    assert engine.block_manager.swap_pool.num_free == engine.block_manager.swap_pool.num_blocks


def test_running_sequences_never_exceed_max_num_seqs(checkpoint, rng):
    llm = make_llm(checkpoint("gpt2"), max_num_seqs=5, max_num_batched_tokens=16)
    engine = llm.engine
    for i, prompt in enumerate(random_prompts(rng, [9, 3, 12, 4, 7, 2])):
        engine.add_request(str(i), {"prompt_token_ids": prompt},
                           SamplingParams(n=[1, 4, 1, 2, 1, 3][i], temperature=1.0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
        assert sum(len(g.active) for g in engine.scheduler.running) <= 5
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("steps, lengths", [(1, list(range(1, 11))), (8, [1, 9, 10])])
def test_streaming_outputs_grow_step_by_step(checkpoint, rng, steps, lengths):
    llm = make_llm(checkpoint("gpt2"), num_scheduler_steps=steps)
    engine = llm.engine
    engine.add_request("s", {"prompt_token_ids": random_prompts(rng, [8])[0]}, GREEDY)
    seen = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.append(len(output.outputs[0].token_ids))
    assert seen == lengths  # a prefill step, then decode loops of `steps` tokens, cut at max_tokens
    assert output.finished and output.outputs[0].finish_reason == "length"


def test_no_step_compiles_after_warm_up_in_a_mixed_workload(checkpoint, rng):
    llm = make_llm(checkpoint("llama"), warm_up=True, max_num_batched_tokens=32, num_gpu_blocks_override=48,
                   enable_prefix_caching=True)
    prompts = random_prompts(rng, [3, 50, 17, 1, 33, 8, 12, 26, 5, 40])
    prompts[7][:12] = prompts[2][:12]  # a prefix-cache hit
    params = [SamplingParams(n=3 if i == 4 else 1, temperature=t, max_tokens=m, ignore_eos=True, seed=i)
              for i, (t, m) in enumerate(zip([0, 1, 0.7, 0, 1, 0, 0.5, 1, 0, 0.9], [5, 12, 3, 20, 7, 9, 1, 15, 6, 11]))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 12, 3, 20, 7, 9, 1, 15, 6, 11]
    stats = llm.stats()
    assert stats["compiles_after_warmup"] == 0
    assert stats["num_steps"] > 10 and 0 < stats["kv_utilization"] <= 1


def test_multi_step_decode_gives_the_same_tokens_as_single_steps(checkpoint, rng):
    path = checkpoint("llama")
    prompts = random_prompts(rng, [5, 23, 14, 2])
    params = [SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=20, max_tokens=9, seed=3, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=17, seed=4, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[7])]
    runs = {}
    for steps in (1, 4):
        llm = make_llm(path, num_scheduler_steps=steps)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs[steps] = [(o.outputs[0].token_ids, o.outputs[0].cumulative_logprob) for o in outputs]
        assert_all_blocks_free(llm)
        stats = llm.stats()
        assert (stats["num_device_calls"] < stats["num_steps"]) == (steps > 1)  # the decode loop ran
    assert runs[1] == runs[4]
    assert [len(t) for t, _ in runs[4][:3]] == [13, 9, 17]
    reference = load_reference(path)
    assert runs[4][0][0] == hf_greedy(reference, prompts[0], 13)


def test_a_decode_loop_shows_each_step_to_a_listener_which_may_end_it_early(checkpoint, rng):
    path = checkpoint("llama")
    [prompt] = random_prompts(rng, [9])
    llm = make_llm(path, num_scheduler_steps=8)
    engine = llm.engine
    engine.add_request("a", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # the prompt, and the first token
    seen = []

    def listener(outputs):
        seen.append([len(o.outputs[0].token_ids) for o in outputs])
        return len(seen) < 3  # ends the loop after the step in flight

    engine.step(listener)
    assert seen == [[2], [3], [4], [5]]  # a token per step, running requests only; the 4th was in flight
    assert engine.step_log[-1].num_steps == 4
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step(lambda outputs: True) if o.finished]
    assert [r.num_steps for r in engine.step_log[2:]] == [8, 7]  # 15 tokens left: no step past max_tokens
    assert finished[0].outputs[0].token_ids == hf_greedy(load_reference(path), prompt, 20)
    assert_all_blocks_free(llm)
