"""The machinery behind the figures: traces match the paper's workload statistics, the
simulator replays our real scheduler and memory managers (and reproduces the paper's memory
picture at its scale), the cost model fits step times, and the sustainable-rate reading is
the knee of a latency curve. The figure modules run end to end in test_notebooks.py."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.common import device_slug, result_name
from experiments.request_rate import sustainable_rate
from experiments.simulator import A100_OPT13B, simulate
from experiments.workloads import ALPACA, SHAREGPT, random_requests, sample_requests
from paged_jax.core.step_record import StepRecord
from paged_jax.kv.interface import MemoryUsage
from paged_jax.worker.cost_model import CostModel

# -- workloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", [SHAREGPT, ALPACA], ids=lambda d: d.name)
def test_traces_have_the_papers_mean_lengths(dataset):
    requests = sample_requests(dataset, 4000, seed=3)
    prompt = np.mean([r.prompt_len for r in requests])
    output = np.mean([r.output_len for r in requests])
    assert prompt == pytest.approx(dataset.prompt_mean, rel=0.06)
    assert output == pytest.approx(dataset.output_mean, rel=0.06)
    assert all(r.prompt_len <= 1024 and r.prompt_len + r.output_len <= 2048 for r in requests)  # vLLM's filters


def test_traces_scale_to_a_smaller_context_and_arrive_at_the_rate():
    requests = sample_requests(SHAREGPT, 4000, max_model_len=256, seed=1, rate=5.0)
    assert max(r.prompt_len + r.output_len for r in requests) <= 256
    assert np.mean([r.output_len for r in requests]) == pytest.approx(SHAREGPT.output_mean / 8, rel=0.08)
    assert len(requests) / requests[-1].arrival_time == pytest.approx(5.0, rel=0.05)


def test_random_traces_are_uniform_around_the_lengths():
    fixed = random_requests(50, 32, 8)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(32, 8)}
    spread = random_requests(2000, 100, 50, range_ratio=0.5, seed=4)
    assert min(r.prompt_len for r in spread) == 50 and max(r.prompt_len for r in spread) == 150
    assert np.mean([r.output_len for r in spread]) == pytest.approx(50, rel=0.05)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(5, 10, 10, range_ratio=1.0)


# -- the simulator -----------------------------------------------------------------------------


def test_paper_scale_simulation_reproduces_the_memory_picture():
    """At the paper's scale, with a queue always waiting, Orca Max keeps about a fifth of its
    cache in token states and our paged manager nearly all of it (Fig. 2: 20.4 vs 96.3 %);
    ours batches more requests and answers sooner."""
    requests = sample_requests(SHAREGPT, 150, seed=1, rate=10.0)
    ours, orca = simulate("paged-jax", requests), simulate("orca-max", requests)
    assert orca.memory["token_states"] == pytest.approx(0.204, abs=0.05)
    assert ours.memory["token_states"] > 0.9
    assert sum(ours.memory.values()) == pytest.approx(1.0)
    assert ours.mean_batch_size > 2 * orca.mean_batch_size
    assert ours.normalized_latency < orca.normalized_latency


def test_static_batching_answers_a_batch_together():
    requests = random_requests(8, 64, 16, range_ratio=0.5, seed=2)  # all arrive at once
    static, ours = simulate("static", requests), simulate("paged-jax", requests)
    assert static.mean_latency > ours.mean_latency


def test_cost_model_fit_recovers_known_step_times():
    truth = CostModel(fixed=2e-3, per_token=5e-5, per_context_token=1e-7, source="truth")
    rng = np.random.default_rng(0)
    log = []
    for _ in range(200):
        tokens, context, steps = int(rng.integers(1, 512)), int(rng.integers(1, 20000)), int(rng.choice([1, 8]))
        log.append(StepRecord(4, tokens, context, steps, steps * truth.seconds(tokens, context),
                              MemoryUsage(0, 0, 0, 0, 1), False))
    fitted = CostModel.fit(log, "fit")
    assert fitted.fixed == pytest.approx(truth.fixed, rel=1e-6)
    assert fitted.per_context_token == pytest.approx(truth.per_context_token, rel=1e-6)
    assert fitted.relative_error(log) < 1e-6
    assert A100_OPT13B.fixed == pytest.approx(0.0167, rel=0.01)  # reading 26 GB at 1.555 TB/s


def test_the_modelled_clock_charges_a_decode_loop_for_each_of_its_steps():
    cost = CostModel(fixed=2e-3, per_token=5e-5, per_context_token=1e-7, source="test")
    loop = StepRecord(4, 4, 400, 8, 1.0, MemoryUsage(0, 0, 0, 0, 1), False)
    assert cost.step_seconds(loop) == pytest.approx(8 * cost.seconds(4, 400))


# -- reading the figures -----------------------------------------------------------------------


def test_sustainable_rate_is_where_latency_crosses_the_limit():
    rates = np.array([1.0, 2.0, 4.0, 8.0])
    assert sustainable_rate(rates, np.array([1.0, 1.0, 4.0, 100.0]), 2.0) == (pytest.approx(2 * 2 ** 0.5), "")
    assert sustainable_rate(rates, np.array([1.0, 1.0, 1.0, 1.5]), 2.0) == (8.0, ">")
    assert sustainable_rate(rates, np.array([3.0, 4.0, 5.0, 6.0]), 2.0) == (1.0, "<")


def test_smaller_sizes_keep_the_default_results_file():
    assert result_name("sharing", "full", "full") == f"sharing_{device_slug()}"
    assert result_name("sharing", "tiny", "full") == f"sharing_{device_slug()}_tiny"


def test_the_step_profile_replays_every_forward_step_and_decode_loop_step_of_a_run(checkpoint):
    from serving import make_llm

    from experiments import step_profile
    from paged_jax import SamplingParams

    llm = make_llm(checkpoint("llama"), num_scheduler_steps=4)
    runner = llm.engine.executor
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    with step_profile.recording(runner) as calls:
        llm.generate([{"prompt_token_ids": [5 + i] * 6} for i in range(3)], params, use_tqdm=False)
    assert {call.forward for call in calls} == {True, False}  # prompts, then decode-loop steps
    profile = step_profile.profile(runner.model, runner, calls, wall_seconds=1.0, host_share=0.1, repeats=1)
    # every computed token once: 6 prompt tokens and 8 fed-back outputs per request
    assert profile["device_calls"] == len(calls) and profile["real_tokens"] == 3 * (6 + 8)
    assert profile["host"] == pytest.approx(0.1) and profile["attention"] + profile["roofline"] > 0


def test_the_mixed_attention_benchmark_sets_a_steps_sequences_beside_the_buckets_they_get_apart():
    from experiments.mixed_attention import apart, case_arrays

    step = case_arrays(160, 3, 100, 512, 256, seed=0)
    q_lens = np.diff(step["cu_q_lens"])
    assert list(q_lens) == [1] * 160 + [100] * 3 + [0] * 93 and step["max_q_len"] == 512
    assert step["q"].shape[0] == 512 and np.all(step["context_lens"][:160] >= 100)
    assert apart(160, 3, 100) == [(160, 0, 0, 192, 192), (0, 3, 100, 512, 4)]
    assert case_arrays(*apart(160, 3, 100)[0], seed=0)["max_q_len"] == 1
