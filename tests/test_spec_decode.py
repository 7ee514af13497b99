"""Speculative decoding (vLLM's speculative_config): a proposer drafts the next tokens (prompt
lookup over the sequence's own tokens, or a draft model over the same block tables), the model
verifies them in one ragged step, and what it rejects is rolled back. Greedy outputs are the
ones decoding without speculation gives, sampled outputs keep the model's distribution, and
nothing leaks: blocks taken for rejected drafts go back, and the prefix cache names only
verified tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import openai
import pytest
from scipy import stats
from server_process import running_server, scrape
from serving import assert_all_blocks_free, make_llm

from paged_jax import EngineArgs, SamplingParams
from paged_jax.beam_search import BeamSearchParams
from paged_jax.sampling_params import request_key
from paged_jax.spec_decode.ngram import NgramProposer
from paged_jax.worker.rejection_sampler import verify
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, empty_batch

MODELS = Path(__file__).parent.parent / "models"
TARGET, DRAFT = MODELS / "stdlib-llama", MODELS / "stdlib-llama-draft"
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
DRAFT_MODEL = {"model": str(DRAFT), "num_speculative_tokens": 3}
SELF_DRAFT = {"model": str(TARGET), "num_speculative_tokens": 3}
# float32: the verifying step (several query tokens) and a decode step (one) compute each token's
# logits by different paths; in float32 they agree far below the embedded model's top-two gaps.
ENGINE = dict(dtype="float32", block_size=8, num_gpu_blocks_override=64, max_num_seqs=8, max_num_batched_tokens=128)
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SOURCE = (Path(__file__).parent.parent / "paged_jax" / "kv" / "block_manager.py").read_text()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Code that repeats itself: what prompt lookup is for."""
    starts = [SOURCE.index(s) for s in ("    def grow(", "    def fork(", "    def _move(", "def _extra_references")]
    return [SOURCE[s : s + 160] for s in starts]


def generate(llm, prompts, params=GREEDY):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected(prompts):
    return generate(make_llm(TARGET, **ENGINE), prompts)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("config, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size"),
])
def test_a_bad_speculative_config_is_a_value_error_naming_its_field(config, field):
    with pytest.raises(ValueError, match=field):
        EngineArgs("any", speculative_config=config).validate()


def test_a_draft_model_needs_the_targets_vocabulary(checkpoint):
    with pytest.raises(ValueError, match="vocabulary"):
        make_llm(TARGET, max_model_len=128,  # the tiny checkpoint's position range
                 speculative_config={"model": str(checkpoint("llama")), "num_speculative_tokens": 2})


def test_beam_search_with_speculation_fails_alone_naming_the_combination():
    llm = make_llm(TARGET, speculative_config=NGRAM)
    out = llm.beam_search([{"prompt_token_ids": [5, 6, 7]}], BeamSearchParams(beam_width=2, max_tokens=4))
    assert "beam search" in out[0].error and "speculative" in out[0].error
    assert llm.generate([{"prompt_token_ids": [5, 6, 7]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence_of_the_longest_suffix():
    lookup = NgramProposer(min_n=2, max_n=3).lookup
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 8, 7, 5, 2, 3])
    assert lookup(tokens, 3) == [8, 7, 5]  # "2 3" last seen before 8 7 5 (no earlier "5 2 3")
    assert lookup(np.array([4, 1, 2, 5, 6, 1, 2]), 5) == [5, 6, 1, 2]  # cut at the sequence's end
    assert lookup(np.array([1, 2, 3, 4]), 2) == []  # no suffix of 2 or 3 occurs earlier
    assert NgramProposer(1, 1).lookup(np.array([7, 1, 7]), 2) == [1, 7]


# -- the rejection sampler ---------------------------------------------------------------------


def _rows(num_rows: int, temperature: float, **fields) -> SamplingBatch:
    b = empty_batch(num_rows)
    b["temperature"][:] = temperature
    seeds = np.random.default_rng(0).integers(0, 1 << 63, num_rows)  # each row a request of its own
    b["keys"] = np.stack([request_key(int(s)) for s in seeds])
    for name, value in fields.items():
        b[name][:] = value
    return SamplingBatch(**b)


def test_greedy_verification_keeps_a_draft_exactly_when_it_is_the_argmax():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]], np.float32)
    accepted, out = verify(logits, np.arange(3, dtype=np.int32), np.array([1, 2, -1], np.int32), _rows(3, 0.0),
                           SamplerFlags(False, False, False, False))
    assert accepted.tolist() == [True, False, False]
    assert out.tokens.tolist() == [1, 0, 2]  # the draft kept; the argmax instead; no draft: the argmax


@pytest.mark.parametrize("draft, fields, flags", [
    (0, {}, SamplerFlags(True, False, False, False)),  # the likeliest token drafted
    (3, {}, SamplerFlags(True, False, False, False)),  # an unlikely one
    (1, {"top_k": 3}, SamplerFlags(True, True, False, False)),  # within top_k
    (4, {"top_k": 3}, SamplerFlags(True, True, False, False)),  # outside it: never kept
])
def test_rejection_sampling_keeps_the_models_distribution_whatever_was_drafted(draft, fields, flags):
    logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0], np.float32)
    n = 20_000
    accepted, out = verify(np.tile(logits, (n, 1)), np.arange(n, dtype=np.int32), np.full(n, draft, np.int32),
                           _rows(n, 0.8, **fields), flags)
    weights = np.exp(logits / 0.8)
    if "top_k" in fields:
        weights[fields["top_k"]:] = 0
    p = weights.astype(np.float64) / weights.sum()
    counts = np.bincount(np.asarray(out.tokens), minlength=len(logits))
    assert counts[p == 0].sum() == 0
    expected = n * p[p > 0]
    assert stats.chisquare(counts[p > 0], expected * counts.sum() / expected.sum()).pvalue > 1e-3
    assert abs(np.mean(accepted) - p[draft]) < 0.02  # a draft is kept with its probability


# -- the engine: greedy outputs unchanged ------------------------------------------------------


OPTIONS = [dict(), dict(enable_prefix_caching=True), dict(max_num_batched_tokens=24),  # prompts in chunks
           dict(num_gpu_blocks_override=24, preemption_mode="recompute"),
           dict(num_gpu_blocks_override=24, preemption_mode="swap", swap_space=0.01)]


@pytest.mark.parametrize("config", [NGRAM, DRAFT_MODEL, SELF_DRAFT], ids=["ngram", "draft_model", "self_draft"])
def test_greedy_output_with_speculation_is_greedy_output_without_it(config, prompts, expected):
    shared = [prompts[0] + p for p in prompts[1:]]  # prefixes for the prefix cache to find
    want = expected + generate(make_llm(TARGET, **ENGINE), shared)
    for options in OPTIONS:
        llm = make_llm(TARGET, **{**ENGINE, **options}, speculative_config=config)
        assert generate(llm, prompts + shared) == want, options
        assert_all_blocks_free(llm)
        s = llm.stats()
        assert s["spec_decode_num_draft_tokens"] > 0 and s["spec_decode_num_accepted_tokens"] > 0, options
        assert sum(s["spec_decode_num_accepted_tokens_per_pos"]) == s["spec_decode_num_accepted_tokens"]
        if "preemption_mode" in options:
            assert s["num_preemptions"] > 0, options
        if options.get("enable_prefix_caching"):
            assert s["prefix_cache_hit_rate"] > 0
        if config is SELF_DRAFT:  # the target drafting for itself agrees with itself
            assert s["spec_decode_acceptance_rate"] >= 0.9, s


def test_stop_strings_max_tokens_and_n_are_kept_when_drafts_run_past_them(prompts):
    params = [SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop=["self."], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, stop=["\n"], include_stop_str_in_output=True),
              SamplingParams(temperature=0, max_tokens=20, n=2, ignore_eos=True)]
    plain, spec = make_llm(TARGET, **ENGINE), make_llm(TARGET, **ENGINE, speculative_config=NGRAM)
    for p in params:
        ours = [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
                for o in spec.generate(prompts, p, use_tqdm=False)]
        assert ours == [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
                        for o in plain.generate(prompts, p, use_tqdm=False)], p
    assert spec.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_all_blocks_free(spec)


def test_logprobs_of_kept_drafts_and_of_the_prompt_are_the_models(prompts):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    plain = make_llm(TARGET, **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = make_llm(TARGET, **ENGINE, speculative_config=NGRAM)
    ours = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["spec_decode_num_accepted_tokens"] > 0
    for a, b in zip(plain, ours):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for theirs, mine in [*zip(a.outputs[0].logprobs, b.outputs[0].logprobs), *zip(a.prompt_logprobs[1:],
                                                                                       b.prompt_logprobs[1:])]:
            assert list(theirs) == list(mine)  # the same tokens, ranked alike
            assert all(abs(theirs[t].logprob - mine[t].logprob) < 1e-4 for t in theirs)


def test_nothing_compiles_after_warm_up_with_speculation(prompts):
    settings = dict(ENGINE, max_num_seqs=4, max_num_batched_tokens=64, warm_up=True, background_compile=False)
    for config in (NGRAM, DRAFT_MODEL):
        llm = make_llm(TARGET, **settings, speculative_config=config)
        generate(llm, prompts)
        assert llm.stats()["compiles_after_warmup"] == 0
        assert llm.engine.proposer.runner.compile_stats().after_warm_up == 0 if config is DRAFT_MODEL else True


# -- the engine: sampled outputs keep the model's distribution ---------------------------------


def test_sampled_tokens_follow_the_models_distribution_with_a_draft_model():
    """Three tokens from one prompt, 800 times with seeds, with and without speculation: the
    distribution of the second and third (those verified against drafts) does not differ
    (a chi-square test of homogeneity over the tokens drawn at least 10 times)."""
    prompt = "    def __init__(self"
    params = [SamplingParams(temperature=1.3, max_tokens=3, seed=s, ignore_eos=True) for s in range(800)]
    settings = dict(ENGINE, max_num_seqs=64, num_gpu_blocks_override=256, max_num_batched_tokens=256)
    runs = []
    for config in (None, {"model": str(DRAFT), "num_speculative_tokens": 2}):
        llm = make_llm(TARGET, **settings, speculative_config=config)
        runs.append([o.outputs[0].token_ids for o in llm.generate([prompt] * len(params), params, use_tqdm=False)])
    assert llm.stats()["spec_decode_num_accepted_tokens"] > 0
    assert 0 < llm.stats()["spec_decode_acceptance_rate"] < 1  # some drafts rejected: the test tests something
    for position in (1, 2):
        tokens = [[t[position] for t in run] for run in runs]
        common = sorted(t for t in set(tokens[0]) | set(tokens[1]) if tokens[0].count(t) + tokens[1].count(t) >= 10)
        table = np.array([[run.count(t) for t in common] + [len(run) - sum(run.count(t) for t in common)]
                          for run in tokens])
        table = table[:, table.sum(axis=0) > 0]
        assert stats.chi2_contingency(table).pvalue > 1e-3, position


def test_with_room_for_its_drafts_a_seeded_request_samples_the_same_alone_and_in_a_batch(prompts):
    llm = make_llm(TARGET, **ENGINE, speculative_config=NGRAM)
    seeded = SamplingParams(temperature=0.3, max_tokens=30, seed=7, ignore_eos=True)
    alone = llm.generate([prompts[1]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.3, max_tokens=30, ignore_eos=True)
    batch = llm.generate(prompts, [others, seeded, others, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    assert llm.stats()["spec_decode_num_accepted_tokens"] > 0


# -- the server ----------------------------------------------------------------------------------


def test_the_server_takes_speculative_config_as_json_and_exports_vllms_counters(prompts, tmp_path):
    config = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}'
    args = [str(TARGET), "--served-model-name", "m", "--speculative-config", config, "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64", "--uvicorn-log-level", "warning"]
    with running_server(args, tmp_path / "server.log") as url, \
            openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        text = client.completions.create(model="m", prompt=prompts[0], max_tokens=24, temperature=0).choices[0].text
        stream = client.completions.create(model="m", prompt=prompts[0], max_tokens=24, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        metrics = scrape(url)
    assert text and streamed == text  # several tokens a step, streamed as they are kept
    assert metrics["vllm:spec_decode_num_drafts_total"] > 0
    assert metrics["vllm:spec_decode_num_draft_tokens_total"] >= metrics["vllm:spec_decode_num_accepted_tokens_total"]
    assert sum(v for k, v in metrics.items() if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos")) \
        == metrics["vllm:spec_decode_num_accepted_tokens_total"]


def test_the_server_refuses_a_bad_speculative_config_naming_the_field():
    result = subprocess.run([sys.executable, "-m", "paged_jax.server.serve", str(TARGET), "--speculative-config",
                             '{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "speculative_config.lookahead" in result.stderr
