"""AsyncLLMEngine in-process: outputs equal the offline LLM's, concurrent clients share steps,
abort frees blocks at once, and a step that raises fails its requests while the loop goes on.
Every wait is bounded by asyncio.wait_for."""

from __future__ import annotations

import asyncio

import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError

SETTINGS = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_gpu_blocks_override=128,
                attention_backend="xla", warm_up=False)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["the quick brown fox", "a paged cache", "serving large language models", "keys and values"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def reference(llama_with_tokenizer):
    llm = LLM(str(llama_with_tokenizer), **SETTINGS)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def engine(llama_with_tokenizer):
    # one for the module: it compiles once
    engine = AsyncLLMEngine(LLM(str(llama_with_tokenizer), **SETTINGS).engine)
    yield engine
    engine.shutdown()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT))


async def collect(engine, prompt, params, request_id):
    outputs = [o async for o in engine.generate(prompt, params, request_id)]
    return outputs


def test_concurrent_clients_get_the_offline_outputs_and_share_steps(engine, reference):
    async def main():
        return await asyncio.gather(*(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))

    results = run(main())
    assert [outputs[-1].outputs[0].text for outputs in results] == reference
    for outputs in results:
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        texts = [o.outputs[0].text for o in outputs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative, growing
    assert max(r.num_requests for r in engine.engine.step_log) > 1  # clients were batched together
    assert engine.latest_load.num_free_blocks == engine.latest_load.num_blocks


def test_a_stream_gets_a_token_per_step_inside_a_decode_loop(llama_with_tokenizer, reference):
    llm = LLM(str(llama_with_tokenizer), **SETTINGS, num_scheduler_steps=8)
    published = []  # every output the engine thread publishes, as it publishes it
    engine = AsyncLLMEngine(llm.engine, on_output=lambda o: published.append(len(o.outputs[0].token_ids)))
    try:
        outputs = run(collect(engine, PROMPTS[0], GREEDY, "s"))
    finally:
        engine.shutdown()
    assert outputs[-1].outputs[0].text == reference[0]
    assert max(r.num_steps for r in llm.engine.step_log) > 1  # decode loops ran
    assert published == list(range(1, 13))


def test_without_its_thread_the_owner_drives_the_engine_by_run_iteration(llama_with_tokenizer, reference):
    engine = AsyncLLMEngine(LLM(str(llama_with_tokenizer), **SETTINGS).engine, start_engine_loop=False)

    async def main():
        loop, done = asyncio.get_running_loop(), asyncio.Event()

        async def drive():  # as experiments/engine_loop.py's executor variant does
            while not done.is_set():
                if not await loop.run_in_executor(None, engine.run_iteration):
                    await asyncio.sleep(0.001)

        driver = asyncio.create_task(drive())
        results = await asyncio.gather(*(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
        done.set()
        await driver
        return results

    assert engine.is_running
    assert [outputs[-1].outputs[0].text for outputs in run(main())] == reference
    engine.shutdown()
    assert not engine.is_running and not engine.run_iteration()


def test_abort_ends_the_stream_and_frees_blocks(engine):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        seen = []
        async for output in engine.generate(PROMPTS[0], long, "victim"):
            seen.append(output)
            if len(output.outputs[0].token_ids) >= 2:
                await engine.abort("victim")
        other = await collect(engine, PROMPTS[1], GREEDY, "other")
        return seen, other

    seen, other = run(main())
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) < 100
    assert other[-1].outputs[0].finish_reason == "length"
    assert engine.latest_load.num_free_blocks == engine.latest_load.num_blocks
    assert not engine.engine.has_unfinished_requests()


def test_leaving_the_loop_early_aborts_the_request(engine):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        async for output in engine.generate(PROMPTS[0], long, "leaver"):
            if output.outputs[0].token_ids:
                break
        for _ in range(200):  # the abort is applied between steps
            if not engine.engine.has_unfinished_requests() and engine.latest_load.num_free_blocks == \
                    engine.latest_load.num_blocks:
                return True
            await asyncio.sleep(0.05)
        return False

    assert run(main())


def test_a_request_that_can_never_run_is_refused_alone(engine, reference):
    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request("too-long", PROMPTS[0], SamplingParams(max_tokens=10_000))
        with pytest.raises(ValueError, match="already in use"):
            first = await engine.add_request("dup", PROMPTS[0], GREEDY)
            await engine.add_request("dup", PROMPTS[0], GREEDY)
        return [o async for o in first]

    outputs = run(main())
    assert outputs[-1].outputs[0].text == reference[0]


def test_a_step_that_raises_fails_its_requests_and_the_loop_carries_on(engine, reference):
    step = engine.engine.step
    calls = {"n": 0}

    def failing_step(on_tokens=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return step(on_tokens)

    engine.engine.step = failing_step

    async def main():
        try:
            return await _main()
        finally:
            engine.engine.step = step

    async def _main():
        with pytest.raises(RequestFailedError, match="injected fault"):
            await asyncio.gather(*(collect(engine, p, GREEDY, f"f{i}") for i, p in enumerate(PROMPTS[:2])))
        return await collect(engine, PROMPTS[0], GREEDY, "after")

    outputs = run(main())
    assert outputs[-1].outputs[0].text == reference[0]
    assert engine.latest_load.num_free_blocks == engine.latest_load.num_blocks
    assert engine.is_running


def test_after_shutdown_requests_are_refused(llama_with_tokenizer):
    engine = AsyncLLMEngine(LLM(str(llama_with_tokenizer), **SETTINGS).engine)
    engine.shutdown()

    async def main():
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", PROMPTS[0], GREEDY)

    run(main())
    assert not engine.is_running
