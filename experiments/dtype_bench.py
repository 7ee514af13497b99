"""bfloat16 on a CPU: what XLA makes fast and slow, and what it gives a whole model (issue 19).

vLLM computes in bfloat16 on CPUs with bfloat16 instructions; ours used float32 there because
a bfloat16 model decoded several times slower (every KV write rewrote the whole cache, table 2).
Three measurements, each in turns with its float32 twin:

1. Matrix products [T, 512] x [512, 2048]: float32; bfloat16 with a bfloat16 result (what
   `x @ w` gives); bfloat16 accumulated into float32 (`preferred_element_type`), which the
   model's `dot_general` now asks for and rounds back (paged_jax/model/transformer.py).
2. Writing 48 tokens into a 64 MiB paged cache inside a jitted, donating step (the KV write
   of every step): float32 pages; bfloat16 pages; bfloat16 pages bitcast to uint16 inside the
   step; and pages stored as uint16 (what the xla backend now does, xla_attention.STORED_AS).
3. The whole engine: throughput.py's workload (48 ShareGPT-like requests, 22M Llama) at its
   steady state (every step shape compiled), float32 against bfloat16, in rounds.

Run `python -m experiments.dtype_bench [--rounds 3]`; results in results/dtype_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from experiments.common import device_slug, markdown_table, random_llama_checkpoint, report
from experiments.throughput import CPU
from experiments.workloads import SHAREGPT, prompt_token_ids, sample_requests


def _median_ms(fn, repeats: int = 30) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def matmuls(rows: int) -> dict[str, float]:
    variants = {
        "float32": (jnp.float32, None),
        "bfloat16 -> bfloat16": (jnp.bfloat16, None),
        "bfloat16 -> float32": (jnp.bfloat16, jnp.float32),
    }
    times = {}
    for name, (dtype, accumulate) in variants.items():
        a, b = jnp.ones((rows, 512), dtype), jnp.ones((512, 2048), dtype)
        product = jax.jit(lambda a, b, acc=accumulate: jnp.dot(a, b, preferred_element_type=acc))
        times[name] = _median_ms(lambda: product(a, b))
    return times


def kv_writes() -> dict[str, float]:
    """ms per write of 48 tokens into 4 heads x 64 MiB of pages, in a donating jit."""
    def writer(view):
        def write(pages, new, slots):
            num_blocks, block_size = pages.shape[1:3]
            block = jnp.where(slots >= 0, slots // block_size, num_blocks)
            stored = pages if view is None else lax.bitcast_convert_type(pages, view)
            new = new if new.dtype == stored.dtype else lax.bitcast_convert_type(new, stored.dtype)
            stored = stored.at[:, block, slots % block_size].set(new.transpose(1, 0, 2), mode="drop")
            return stored if view is None else lax.bitcast_convert_type(stored, pages.dtype)
        return jax.jit(write, donate_argnums=(0,))

    variants = {
        "float32 pages": (jnp.float32, jnp.float32, None),
        "bfloat16 pages": (jnp.bfloat16, jnp.bfloat16, None),
        "bfloat16 pages, bitcast to uint16 in the step": (jnp.bfloat16, jnp.bfloat16, jnp.uint16),
        "pages stored as uint16 (the xla backend's bfloat16)": (jnp.uint16, jnp.bfloat16, None),
    }
    times = {}
    for name, (stored, computed, view) in variants.items():
        num_blocks = (64 << 20) // (4 * 16 * 64 * jnp.dtype(stored).itemsize)
        state = [jnp.zeros((4, num_blocks, 16, 64), stored)]
        new, slots = jnp.ones((48, 4, 64), computed), jnp.arange(48, dtype=jnp.int32) * 16
        write = writer(view)

        def step():
            state[0] = write(state[0], new, slots)
            return state[0]

        times[name] = _median_ms(step, repeats=10)
    return times


def engine_rounds(rounds: int) -> dict[str, list[float]]:
    from paged_jax import LLM, SamplingParams

    requests = sample_requests(SHAREGPT, CPU["requests"], seed=0, max_model_len=CPU["max_model_len"])
    inputs = [{"prompt_token_ids": p} for p in prompt_token_ids(requests, CPU["model"]["vocab_size"], seed=0)]
    params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    tokens = sum(r.output_len for r in requests)
    with tempfile.TemporaryDirectory() as model:
        random_llama_checkpoint(CPU["model"], Path(model), "float32")
        llms = {}
        for dtype in ("float32", "bfloat16"):
            llms[dtype] = LLM(model, max_model_len=CPU["max_model_len"], dtype=dtype, max_num_seqs=64)
            llms[dtype].engine.wait_for_compiles()
            llms[dtype].generate(inputs, params, use_tqdm=False)
        rates = {dtype: [] for dtype in llms}
        for _ in range(rounds):
            for dtype, llm in llms.items():
                start = time.perf_counter()
                llm.generate(inputs, params, use_tqdm=False)
                rates[dtype].append(tokens / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    product_rows = [[rows, *(f"{ms:.3f}" for ms in matmuls(rows).values())] for rows in (8, 64, 256)]
    write_rows = [[name, f"{ms:.2f}"] for name, ms in kv_writes().items()]
    rates = engine_rounds(args.rounds)
    ratios = [b / f for f, b in zip(rates["float32"], rates["bfloat16"])]
    body = "\n\n".join([
        "Matrix products [T, 512] x [512, 2048], median ms:",
        markdown_table(["T", "float32", "bfloat16 -> bfloat16", "bfloat16 -> float32 accumulate"], product_rows),
        "Writing 48 tokens' K/V into 64 MiB of pages inside a jitted step that donates them, median ms:",
        markdown_table(["pages", "ms per write"], write_rows),
        f"The engine on throughput.py's workload ({CPU['requests']} requests, 22M Llama), steady state, output "
        "tokens/s per round (float32, then bfloat16, in turns):",
        markdown_table(["dtype", *(f"round {i + 1}" for i in range(args.rounds)), "median"],
                       [[dtype, *(f"{r:.0f}" for r in values), f"{statistics.median(values):.0f}"]
                        for dtype, values in rates.items()]),
        f"- bfloat16 / float32: median **{statistics.median(ratios):.2f}x** "
        f"(rounds {', '.join(f'{r:.2f}x' for r in ratios)})",
    ])
    report(f"dtype_{device_slug()}", "bfloat16 on this CPU", body)
    return body


if __name__ == "__main__":
    main()
