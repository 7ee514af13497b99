"""The engine runs on either executor: the model runner, or the cost model that computes
nothing (the paper-scale simulator). Scheduling does not depend on which: on one trace the two
take the same decisions step by step, so scheduler behaviour can be specified without a model,
as the tests below the first do."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from experiments.simulator import A100_OPT13B, Scale, simulated_engine
from paged_jax import BeamSearchParams, EngineArgs, LLMEngine, SamplingParams
from paged_jax.worker.cost_model import CostModelExecutor

# A cache too small for the load: requests are preempted (recompute) and resumed.
ARGS = dict(block_size=4, num_gpu_blocks_override=32, max_num_seqs=6, max_num_batched_tokens=48, max_model_len=96,
            num_scheduler_steps=4, background_compile=False, seed=0)


def simulated(args: EngineArgs, vocab_size: int = 1000) -> LLMEngine:
    return LLMEngine(args, executor=CostModelExecutor(args, A100_OPT13B, vocab_size))


def trace(rng, engine: LLMEngine, num_requests: int = 14):
    """Requests of several shapes, all queued at once; returns the steps' decisions."""
    for i in range(num_requests):
        prompt = rng.integers(0, engine.vocab_size, int(rng.integers(3, 24))).tolist()
        params = SamplingParams(n=1 + i % 2, temperature=1.0, seed=i, max_tokens=int(rng.integers(8, 32)),
                                ignore_eos=True)
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    finished, steps = [], 0
    while engine.has_unfinished_requests() and steps < 2000:
        outputs = engine.step()
        steps += 1
        finished += [(o.request_id, [len(c.token_ids) for c in o.outputs]) for o in outputs if o.finished]
    decisions = [dataclasses.replace(r, seconds=0.0) for r in engine.step_log]
    return decisions, finished, engine.stats()["num_preemptions"]


@pytest.mark.parametrize("memory_manager", ["paged", "orca-oracle"])
def test_the_cost_model_engine_takes_the_real_engines_decisions_step_by_step(checkpoint, memory_manager):
    args = EngineArgs(model=str(checkpoint("llama")), memory_manager=memory_manager, **ARGS)
    real = LLMEngine(args)
    real_run = trace(np.random.default_rng(3), real)
    simulated_run = trace(np.random.default_rng(3), simulated(args, real.vocab_size))
    decisions, finished, preemptions = real_run
    assert preemptions > 0 or memory_manager != "paged", "the trace is meant to preempt"
    assert any(r.num_steps > 1 for r in decisions), "the trace is meant to run decode loops"
    assert simulated_run == real_run
    real.block_manager.check_no_leaks([])


def test_the_simulator_is_the_engine_with_the_cost_model():
    engine = simulated_engine("paged-jax", Scale(num_scheduler_steps=8))
    assert isinstance(engine.executor, CostModelExecutor) and engine.args.num_scheduler_steps == 8
    engine.add_request("a", {"prompt_token_ids": [1] * 100}, SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    first, *rest = engine.step_log
    assert first.num_tokens == 100 and first.seconds == pytest.approx(A100_OPT13B.seconds(100, 100))
    # 19 more tokens after the prompt's: loops of 8 and the 3 left (no loop runs past the
    # longest max_tokens left); the clock charges every step.
    assert [r.num_steps for r in rest] == [8, 8, 3]
    assert sum(r.seconds for r in rest) == pytest.approx(sum(A100_OPT13B.step_seconds(r) for r in rest))


# -- the scheduler, specified without a model --------------------------------------------------


def run(engine: LLMEngine, requests: dict[str, tuple[int, SamplingParams]]) -> dict[str, list[int]]:
    for request_id, (prompt_len, params) in requests.items():
        engine.add_request(request_id, {"prompt_token_ids": [7] * prompt_len}, params)
    done = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        done.update({o.request_id: [len(c.token_ids) for c in o.outputs] for o in engine.step() if o.finished})
    engine.block_manager.check_no_leaks([])
    return done


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    engine = simulated(EngineArgs(model="-", **{**ARGS, "max_num_batched_tokens": 16}))
    assert run(engine, {"a": (40, SamplingParams(max_tokens=3, ignore_eos=True))}) == {"a": [3]}
    assert [r.num_tokens for r in engine.step_log[:3]] == [16, 16, 8]


def test_preempted_requests_are_recomputed_and_finish_whole():
    engine = simulated(EngineArgs(model="-", **ARGS))
    requests = {str(i): (20, SamplingParams(n=2, max_tokens=30, ignore_eos=True)) for i in range(8)}
    assert run(engine, requests) == {str(i): [30, 30] for i in range(8)}
    assert engine.stats()["num_preemptions"] > 0


def test_a_decode_loop_stops_at_max_tokens():
    engine = simulated(EngineArgs(model="-", **{**ARGS, "num_scheduler_steps": 8}))
    assert run(engine, {"a": (5, SamplingParams(max_tokens=11, ignore_eos=True))}) == {"a": [11]}
    assert [r.num_steps for r in engine.step_log] == [1, 8, 2]  # the prompt samples the first token


def test_beams_fork_and_free_on_made_up_scores():
    engine = simulated(EngineArgs(model="-", **{**ARGS, "num_gpu_blocks_override": 200}))
    done = run(engine, {"b": (9, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))})
    assert done == {"b": [12, 12, 12]}
    assert engine.stats()["block_sharing_saving"] > 0
