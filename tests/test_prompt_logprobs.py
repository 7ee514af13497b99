"""SamplingParams.prompt_logprobs, as vLLM has it: RequestOutput.prompt_logprobs holds None for
the first prompt token, then for each later one its logprob (with its rank) and the top k,
from the logits at the position before. They equal Hugging Face's float32 log-softmax at
every prompt position, however the prompt is computed: in chunks, for n > 1 sequences, with
a prefix cache that could have skipped it, or again after preemption. The server's echo with
logprobs returns them: test_server.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_checkpoints import load_reference
from serving import hf_greedy, make_llm, random_prompts

from paged_jax import SamplingParams
from paged_jax.outputs import Logprob

TOL = 1e-4
# Prompts longer than the step budget are computed in chunks; 32 blocks of 4 tokens make
# requests preempt one another when several run at once.
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=32, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_reference(checkpoint("llama"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    return make_llm(checkpoint("llama"), **ENGINE)


def hf_logprobs(reference, prompt: list[int]) -> np.ndarray:
    """Hugging Face's float32 log-softmax at every prompt position: [len(prompt), vocab]."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def assert_prompt_logprobs(entries: list[dict[int, Logprob] | None], prompt: list[int], expected: np.ndarray,
                           k: int) -> None:
    """entries are vLLM's prompt_logprobs of prompt with top k, expected the oracle's
    log-softmax at each position."""
    assert len(entries) == len(prompt) and entries[0] is None
    for j in range(1, len(prompt)):
        row, entry, own = expected[j - 1], entries[j], entries[j][prompt[j]]
        assert own.logprob == pytest.approx(row[prompt[j]], abs=TOL)
        assert (row > own.logprob + TOL).sum() < own.rank <= (row > own.logprob - TOL).sum() + 1
        top = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == list(range(1, k + 1))
        assert [lp.logprob for lp in top] == pytest.approx(np.sort(row)[::-1][:k], abs=TOL)
        assert len(entry) == k + (own.rank > k)  # the top k, and the prompt token if not among them
        assert all(lp.logprob == pytest.approx(row[token], abs=TOL) for token, lp in entry.items())


def test_prompt_logprobs_equal_hugging_face_at_every_position_chunked_or_not(llm, reference, rng):
    prompts = random_prompts(rng, [1, 5, 16, 37])  # 37: three chunks of a 16-token budget
    ks = [2, 0, 5, 3]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=k) for k in ks]
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    outputs = llm.generate(inputs + inputs[-1:], params + [plain], use_tqdm=False)  # mixed in one batch
    for prompt, k, output in zip(prompts, ks, outputs):
        assert_prompt_logprobs(output.prompt_logprobs, prompt, hf_logprobs(reference, prompt), k)
        # The sampler still reads each sequence's last token's logits.
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, 6)
    assert outputs[-1].prompt_logprobs is None  # not asked for
    assert outputs[-1].outputs[0].token_ids == outputs[-2].outputs[0].token_ids


def test_n_sequences_share_their_prompts_logprobs_and_sample_as_without(llm, reference, rng):
    [prompt] = random_prompts(rng, [21])
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=5, ignore_eos=True)
    scored = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=5, ignore_eos=True, prompt_logprobs=1)
    without, output = llm.generate([{"prompt_token_ids": prompt}] * 2, [params, scored], use_tqdm=False)
    assert_prompt_logprobs(output.prompt_logprobs, prompt, hf_logprobs(reference, prompt), 1)
    assert [c.token_ids for c in output.outputs] == [c.token_ids for c in without.outputs]


def test_a_request_with_prompt_logprobs_takes_no_prefix_cache_hit(llm, reference, rng):
    [prompt] = random_prompts(rng, [30])
    inputs = [{"prompt_token_ids": prompt}]
    plain = SamplingParams(temperature=0, max_tokens=2)
    llm.generate(inputs, plain, use_tqdm=False)  # the prompt's blocks are cached now
    [scored] = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2), use_tqdm=False)
    assert scored.num_cached_tokens == 0
    assert_prompt_logprobs(scored.prompt_logprobs, prompt, hf_logprobs(reference, prompt), 2)
    [again] = llm.generate(inputs, plain, use_tqdm=False)
    assert again.num_cached_tokens > 0  # the hit was there to take


def test_a_prompt_recomputed_after_preemption_is_scored_once(llm, reference, rng):
    prompts = random_prompts(rng, [30, 27, 33, 29])  # 4 x ~13 blocks at their longest: 32 do not hold them
    before = llm.stats()["num_preemptions"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.stats()["num_preemptions"] > before
    assert any(o.metrics.num_preemptions for o in outputs)
    for prompt, output in zip(prompts, outputs):
        assert_prompt_logprobs(output.prompt_logprobs, prompt, hf_logprobs(reference, prompt), 1)
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, 20)


def test_the_every_token_step_compiles_when_first_needed_and_is_no_warm_up_miss(checkpoint, reference, rng):
    llm = make_llm(checkpoint("llama"), warm_up=True, background_compile=False, num_scheduler_steps=1,
                   max_num_seqs=2, max_num_batched_tokens=16)
    built = llm.stats()["executables_built"]
    [prompt] = random_prompts(rng, [12])
    [output] = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                            use_tqdm=False)
    assert_prompt_logprobs(output.prompt_logprobs, prompt, hf_logprobs(reference, prompt), 0)
    stats = llm.stats()
    assert stats["executables_built"] == built + 1 and stats["compiles_after_warmup"] == 0


@pytest.mark.parametrize("value", [-1, 21, 1.5, "2"])
def test_prompt_logprobs_must_be_a_small_non_negative_integer(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
