"""Thread or executor for AsyncLLMEngine's engine loop: the measurement behind the choice.

Both keep the jitted step off the event loop's thread. The thread (what AsyncLLMEngine does)
runs steps back to back and hands outputs to the event loop; the executor variant is an
AsyncLLMEngine without its thread, driven by a coroutine that awaits
`loop.run_in_executor(None, engine.run_iteration)` for every step, so the next step starts
only once the event loop has come back to that coroutine. Clients here do what
the server's streaming handlers do with each output (build and serialise an SSE chunk), over
the serving benchmark's workload (ShareGPT-like lengths, Poisson arrivals), in one process
without HTTP so that only the loop differs. Reported: wall time, the share of it the engine
spent inside steps, output tokens/s, and the clients' median TTFT and TPOT.

    python -m experiments.engine_loop [--rate 32] [--num-prompts 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from experiments.common import markdown_table, report
from experiments.serving_bench import DEFAULT_MODEL, make_prompts
from experiments.workloads import arrival_times
from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.sampling_params import SamplingParams
from paged_jax.server.protocol import CompletionChoice, CompletionStreamResponse


async def drive(engine: AsyncLLMEngine, done: asyncio.Event) -> None:
    """The alternative to the engine thread: each iteration runs in the default executor."""
    loop = asyncio.get_running_loop()
    while not done.is_set():
        if not await loop.run_in_executor(None, engine.run_iteration):
            await asyncio.sleep(0.0005)  # idle: look again soon


async def client(engine: AsyncLLMEngine, i: int, prompt: str, max_tokens: int,
                 delay: float) -> tuple[float, float, int]:
    """(TTFT, TPOT, tokens) of one request, serialising a chunk per output as the server does."""
    await asyncio.sleep(delay)
    start = time.perf_counter()
    first = last = None
    tokens = 0
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    async for output in engine.generate(prompt, params, f"req-{i}-{start}"):
        c = output.outputs[0]
        CompletionStreamResponse(id="x", created=0, model="m", choices=[
            CompletionChoice(index=0, text=c.text, finish_reason=c.finish_reason)]).model_dump_json()
        last = time.perf_counter()
        first = first or last
        tokens = len(c.token_ids)
    return first - start, (last - first) / max(1, tokens - 1), tokens


async def run_once(engine: AsyncLLMEngine, prompts, rate: float, seed: int, executor: bool) -> dict:
    arrivals = arrival_times(len(prompts), rate, 1.0, np.random.default_rng(seed))
    done = asyncio.Event()
    driver = asyncio.create_task(drive(engine, done)) if executor else None
    steps_before = len(engine.engine.step_log)
    begin = time.perf_counter()
    results = await asyncio.gather(*(client(engine, i, p, m, arrivals[i]) for i, (p, _, m) in enumerate(prompts)))
    wall = time.perf_counter() - begin
    done.set()
    if driver:
        await driver
    busy = sum(r.seconds for r in engine.engine.step_log[steps_before:])
    return {"wall": wall, "busy": busy / wall, "tok_s": sum(r[2] for r in results) / wall,
            "ttft_ms": 1000 * statistics.median(r[0] for r in results),
            "tpot_ms": 1000 * statistics.median(r[1] for r in results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=32.0)
    parser.add_argument("--num-prompts", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    prompts, workload = make_prompts(str(DEFAULT_MODEL), args.num_prompts, 256, 0)
    engine = LLMEngine(EngineArgs(model=str(DEFAULT_MODEL), dtype="float32", max_model_len=256, max_num_seqs=64,
                                  max_num_batched_tokens=512, num_scheduler_steps=4, background_compile=False))
    runs: dict[str, list[dict]] = {"thread": [], "executor": []}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name in runs:
            loop_engine = AsyncLLMEngine(engine, start_engine_loop=name == "thread")
            result = asyncio.run(run_once(loop_engine, prompts, args.rate, seed=repeat, executor=name == "executor"))
            loop_engine.shutdown()
            if repeat:
                runs[name].append(result)
    rows = []
    for name, results in runs.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rows.append([name, f"{med['wall']:.2f}", f"{100 * med['busy']:.0f}%", f"{med['tok_s']:.0f}",
                     f"{med['ttft_ms']:.1f}", f"{med['tpot_ms']:.2f}"])
    body = (f"{workload}; {args.rate:g} req/s Poisson, embedded model (float32), num_scheduler_steps 4; "
            f"median of {args.repeats} runs each, alternating.\n\n"
            + markdown_table(["engine loop", "wall (s)", "time in steps", "output tok/s", "median TTFT (ms)",
                              "median TPOT (ms)"], rows))
    report("engine_loop_cpu", "AsyncLLMEngine: engine loop on a thread or through an executor", body)


if __name__ == "__main__":
    main()
