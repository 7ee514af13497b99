"""Memory sharing (§6.3-6.4, Figs. 14-16): what sharing KV blocks saves, measured by running
the engine.

1. Memory saving of parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6) on the
   Alpaca-like and ShareGPT-like traces (experiments/workloads.py, the paper's lengths at a
   2048-token context): blocks saved / blocks needed without sharing, i.e. 1 - (blocks in
   use) / (blocks the sequences' tables name), summed over every step of the run (the engine's
   `block_sharing_saving`). Outputs run to their sampled lengths (ignore_eos), as the paper's
   traces do. The paper: Alpaca 6.1-9.8% / 37.6-55.2%, ShareGPT 16.2-30.5% / 44.3-66.3%.
2. Shared prefix: requests that all begin with the same few-shot prefix, 80 tokens (1-shot)
   or 341 tokens (5-shot) as in the paper's WMT16 translation prompts, each followed by its own
   sentence (mean 30 tokens) and answered in about as many; offline throughput with prefix
   caching against without. The paper's 1.67x / 3.58x are sustainable request rates against
   Orca (Oracle), a different baseline: ours isolates what the cache itself buys.

Models are random Llama-shaped checkpoints (experiments/common.py). The saving of parallel
sampling depends only on lengths; beam search's depends on how often beams share ancestors,
which a random model's flat next-token distribution makes rarer than a trained model's.

Run `python -m experiments.sharing [--quick]`; results go to experiments/results/sharing_<device>.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import device_slug, markdown_table, random_llama_checkpoint, report
from experiments.throughput import CPU as THROUGHPUT_CPU, GPU as THROUGHPUT_GPU
from experiments.workloads import ALPACA, SHAREGPT, describe, prompt_token_ids, sample_requests
from paged_jax import LLM, BeamSearchParams, SamplingParams

# Memory saving depends on lengths, not on model size: a small model keeps the runs short.
SAVING_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)
SAVING_REQUESTS = {"alpaca": 64, "sharegpt": 24}
PAPER_SAVING = {  # percent, read from §6.3 (Fig. 15); the paper gives only the ends of some ranges
    ("alpaca", "parallel", 2): "6.09", ("alpaca", "parallel", 4): "8.53", ("alpaca", "parallel", 6): "9.79",
    ("alpaca", "beam", 2): "37.6", ("alpaca", "beam", 6): "55.2",
    ("sharegpt", "parallel", 2): "16.2", ("sharegpt", "parallel", 6): "30.5",
    ("sharegpt", "beam", 2): "44.3", ("sharegpt", "beam", 6): "66.3",
}
PREFIXES = {"1-shot": 80, "5-shot": 341}
PAPER_PREFIX_SPEEDUP = {"1-shot": "1.67x", "5-shot": "3.58x"}


def memory_saving(path: Path, dataset, num_requests: int, kind: str, width: int) -> dict:
    requests = sample_requests(dataset, num_requests, seed=1)
    prompts = [{"prompt_token_ids": p} for p in prompt_token_ids(requests, SAVING_MODEL["vocab_size"])]
    llm = LLM(str(path), max_model_len=2048, max_num_seqs=256, seed=0, warm_up=False)
    start = time.perf_counter()
    if kind == "parallel":
        params = [SamplingParams(n=width, temperature=1.0, max_tokens=r.output_len, ignore_eos=True)
                  for r in requests]
        llm.generate(prompts, params, use_tqdm=False)
    else:
        for i, (prompt, r) in enumerate(zip(prompts, requests)):  # beam_search takes one params for all
            llm.engine.add_request(f"beam-{i}", prompt,
                                   BeamSearchParams(beam_width=width, max_tokens=r.output_len, ignore_eos=True))
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    stats = llm.stats()
    return dict(saving=stats["block_sharing_saving"], copied=stats["num_copied_blocks"],
                seconds=time.perf_counter() - start, requests=requests)


def prefix_throughput(llm: LLM, vocab_size: int, prefix_len: int, num_requests: int) -> dict:
    """Offline throughput of requests sharing one prefix (new to the engine's cache)."""
    rng = np.random.default_rng(prefix_len)
    prefix = rng.integers(3, vocab_size, prefix_len).tolist()
    sentences = np.maximum(4, np.rint(rng.lognormal(np.log(30) - 0.08, 0.4, num_requests))).astype(int)
    prompts = [prefix + rng.integers(3, vocab_size, n).tolist() for n in sentences]
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in sentences]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    hit_rate = sum(o.num_cached_tokens for o in outputs) / sum(map(len, prompts))
    return dict(seconds=seconds, requests_per_s=num_requests / seconds, hit_rate=hit_rate)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests (a smoke run)")
    args = parser.parse_args(argv)
    share = 4 if args.quick else 1
    sizes = THROUGHPUT_GPU if jax.default_backend() == "gpu" else THROUGHPUT_CPU

    rows, traces = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = random_llama_checkpoint(SAVING_MODEL, Path(tmp), "float32")
        for dataset in (ALPACA, SHAREGPT):
            for kind in ("parallel", "beam"):
                for width in (2, 4, 6):
                    run = memory_saving(path, dataset, SAVING_REQUESTS[dataset.name] // share, kind, width)
                    rows.append([dataset.name, "parallel sampling, n" if kind == "parallel" else "beam search, width",
                                 width, f"{100 * run['saving']:.1f}", PAPER_SAVING.get((dataset.name, kind, width), "-"),
                                 run["copied"], f"{run['seconds']:.1f}"])
                    print(rows[-1], flush=True)
            traces.append(describe(dataset, run["requests"]))

    prefix_rows = []
    num_prefix_requests = 64 // share
    with tempfile.TemporaryDirectory() as tmp:
        path, num_params = random_llama_checkpoint(sizes["model"], Path(tmp), sizes["dtype"])
        runs = {}
        for caching in (False, True):
            llm = LLM(str(path), max_model_len=sizes["max_model_len"], max_num_seqs=sizes["max_num_seqs"], seed=0,
                      enable_prefix_caching=caching)
            runs[caching] = {name: prefix_throughput(llm, sizes["model"]["vocab_size"], length, num_prefix_requests)
                             for name, length in PREFIXES.items()}
        for name, length in PREFIXES.items():
            off, on = runs[False][name], runs[True][name]
            prefix_rows.append([f"{name} ({length} tokens)", f"{off['requests_per_s']:.2f}",
                                f"{on['requests_per_s']:.2f}", f"**{off['seconds'] / on['seconds']:.2f}x**",
                                PAPER_PREFIX_SPEEDUP[name], f"{100 * on['hit_rate']:.1f}"])

    body = (
        "## Memory saving (Fig. 15)\n\n"
        f"Random Llama, {SAVING_MODEL['num_hidden_layers']} layers, hidden {SAVING_MODEL['hidden_size']}, "
        f"vocabulary {SAVING_MODEL['vocab_size']}; block size 16; ignore_eos.\n"
        + "".join(f"\n- {t}" for t in traces) + "\n\n"
        + markdown_table(["workload", "decoding", "n / width", "saving %", "paper %", "blocks copied on write",
                          "seconds"], rows)
        + "\n\n## Shared prefix (Fig. 16)\n\n"
        f"Random Llama-shaped model, {num_params / 1e6:.1f}M parameters, {sizes['dtype']}; {num_prefix_requests} "
        "requests, prefix + a sentence of ~30 tokens, ~30 greedy output tokens each; warm-up not counted.\n\n"
        + markdown_table(["prefix", "requests/s, no caching", "requests/s, prefix caching", "speed-up",
                          "paper (vs Orca Oracle)", "prompt tokens from cache %"], prefix_rows)
    )
    report(f"sharing_{device_slug()}", "Memory sharing: parallel sampling, beam search, shared prefixes", body)
    return body


if __name__ == "__main__":
    main()
