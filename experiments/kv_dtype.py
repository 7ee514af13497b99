"""KV pages in 8 bits: block size x page dtype, the ablation after Fig. 18b.

An 8-bit page holds a token's K/V in half the bytes of a 16-bit one (int8 adds a float32
scale per token and KV head), so the same memory holds about twice the blocks: the paper's
lever (memory -> batch -> throughput) pulled once more. What it costs is accuracy, measured
here, not assumed:

- Accuracy, by real execution of the embedded model on Python it was not trained on (this
  repository's own source): perplexity from the prompt tokens' logprobs (prompt_logprobs),
  with prompts cut into chunks so that every later chunk reads the pages earlier ones wrote in
  8 bits; greedy continuations against those of the unquantized cache (tokens equal at the same
  position); and the logit error (the prompt tokens' logprobs against the unquantized cache's).
- Capacity: the blocks our engine allocates in the same memory for each page dtype.
- Serving at the paper's scale (OPT-13B on an A100-40GB, in the simulator: our scheduler and
  block manager, modelled step times), each page dtype x block size: KV utilisation, the batch
  that fits, throughput on a ShareGPT trace, and the sustainable request rate (Fig. 12's knee)
  of 16-bit against fp8 pages. The cache keeps its bytes (15.7K fp16 token slots), so 8-bit
  pages give it more slots, and a step reads fewer bytes of K/V (the cost model's per-cached-
  token term shrinks with them).

Run `python -m experiments.kv_dtype [--size tiny|quick|full]`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.request_rate import LIMIT, sustainable_rate
from experiments.serving import DEFAULT_MODEL
from experiments.simulator import A100_OPT13B, Scale, simulate
from experiments.workloads import DATASETS, sample_requests
from paged_jax import LLM, SamplingParams
from paged_jax.model.cache import kv_cache_bytes_per_block, kv_dtype
from paged_jax.model.config import ModelConfig

NAME = "kv_dtype"
TITLE = "KV pages in 8 bits: block size x page dtype"
DEFAULT_SIZE = "quick"
DTYPES = ("auto", "fp8", "fp8_e5m2", "int8")  # "auto": the model's own dtype, unquantized
SIZES = {
    "tiny": dict(texts=2, text_tokens=96, chunk=32, prompt_tokens=48, new_tokens=8, block_sizes=(16,),
                 requests=30, rate=12.0, knee_rates=(1.0, 4.0)),
    "quick": dict(texts=8, text_tokens=224, chunk=32, prompt_tokens=96, new_tokens=32, block_sizes=(1, 4, 16, 64, 256),
                  requests=200, rate=12.0, knee_rates=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)),
    "full": dict(texts=32, text_tokens=240, chunk=32, prompt_tokens=96, new_tokens=64,
                 block_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), requests=500, rate=12.0,
                 knee_rates=(1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0)),
}
# OPT-13B's KV: 40 layers x 40 heads x head_dim 128, fp16 (the paper's model, §6.1)
OPT13B = ModelConfig(family="opt", architecture="OPTForCausalLM", vocab_size=50272, hidden_size=5120, num_layers=40,
                     num_heads=40, num_kv_heads=40, head_dim=128, intermediate_size=20480,
                     max_position_embeddings=2048, activation="relu", norm="layernorm", norm_eps=1e-5)
SOURCE = Path(__file__).resolve().parent.parent / "paged_jax"  # Python the embedded model never saw


def unseen_texts(llm: LLM, count: int, length: int) -> list[list[int]]:
    """count windows of `length` tokens of this repository's own modules, one from the middle of
    each file (code, rather than the docstring every module opens with)."""
    texts = []
    for path in sorted(SOURCE.rglob("*.py")):
        ids = llm.get_tokenizer().encode(path.read_text())
        if len(ids) >= length:
            start = (len(ids) - length) // 2
            texts.append(ids[start : start + length])
        if len(texts) == count:
            break
    return texts


def accuracy(config: dict) -> dict[str, dict]:
    """Per page dtype: perplexity, prompt-token logprobs and greedy continuations (real
    execution of the embedded model, prompts chunked so later chunks read 8-bit pages)."""
    results, texts = {}, None
    for name in DTYPES:
        llm = LLM(str(DEFAULT_MODEL), kv_cache_dtype=name, max_num_batched_tokens=config["chunk"],
                  max_num_seqs=16, block_size=16, warm_up=False)
        texts = texts or unseen_texts(llm, config["texts"], config["text_tokens"])
        scored = llm.generate([{"prompt_token_ids": t} for t in texts],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        logprobs = [[entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], text[1:])]
                    for out, text in zip(scored, texts)]
        greedy = SamplingParams(temperature=0, max_tokens=config["new_tokens"], ignore_eos=True)
        continued = llm.generate([{"prompt_token_ids": t[: config["prompt_tokens"]]} for t in texts], greedy,
                                 use_tqdm=False)
        stats = llm.stats()
        results[name] = dict(logprobs=logprobs, greedy=[o.outputs[0].token_ids for o in continued],
                             bytes_per_block=stats["kv_cache_bytes_per_block"],
                             perplexity=math.exp(-np.mean(np.concatenate(logprobs))))
    base = results["auto"]
    for r in results.values():
        diff = np.abs(np.concatenate(r["logprobs"]) - np.concatenate(base["logprobs"]))
        r["logprob_error_mean"], r["logprob_error_max"] = float(diff.mean()), float(diff.max())
        same = [np.mean(np.equal(a, b)) for a, b in zip(r["greedy"], base["greedy"])]
        r["greedy_agreement"] = float(np.mean(same))
        r["perplexity_ratio"] = r["perplexity"] / base["perplexity"]
    return {name: {k: v for k, v in r.items() if k not in ("logprobs", "greedy")} for name, r in results.items()}


def bytes_ratio(name: str, config: ModelConfig, block_size: int = 16) -> float:
    """How many blocks of this page dtype fit where one fp16 block does (scales included)."""
    return (kv_cache_bytes_per_block(config, block_size, jnp.float16)
            / kv_cache_bytes_per_block(config, block_size, kv_dtype(name, jnp.float16)))


def paper_scale(name: str, block_size: int) -> tuple[Scale, object]:
    """The paper's A100 setup with the cache's bytes kept: its slots and its K/V read cost
    scaled by the page dtype's bytes (the model itself stays fp16)."""
    ratio = bytes_ratio(name, OPT13B, block_size)
    scale = Scale(kv_slots=int(Scale.kv_slots * ratio) // block_size * block_size, block_size=block_size)
    cost = dataclasses.replace(A100_OPT13B, per_context_token=A100_OPT13B.per_context_token / ratio,
                               source=A100_OPT13B.source + f", K/V {name}")
    return scale, cost


def serving(config: dict) -> list[dict]:
    """Block size x page dtype at the paper's scale: one ShareGPT trace at config["rate"], a
    rate no cache sustains, so the running batch is what memory lets in (Fig. 13's measure)."""
    requests = sample_requests(DATASETS["sharegpt"], config["requests"], seed=1, rate=config["rate"])
    rows = []
    jobs = [(name, b) for name in DTYPES for b in config["block_sizes"]]
    for name, block_size in tqdm(jobs, desc="kv_dtype (simulated)"):
        run = simulate("paged-jax", requests, *paper_scale(name, block_size))
        rows.append(dict(dtype=name, block_size=block_size, kv_slots=paper_scale(name, block_size)[0].kv_slots,
                         kv_utilization=run.kv_utilization, mean_batch_size=run.mean_batch_size,
                         throughput=run.throughput, normalized_latency=run.normalized_latency,
                         num_preemptions=run.num_preemptions))
    return rows


def knee(config: dict) -> dict[str, dict]:
    """Fig. 12's sustainable rate at block size 16, fp16 against fp8 pages, on one limit
    (LIMIT x fp16's latency at the lowest rate)."""
    curves = {}
    for name in ("auto", "fp8"):
        latency = []
        for rate in config["knee_rates"]:
            requests = sample_requests(DATASETS["sharegpt"], config["requests"], seed=1, rate=rate)
            latency.append(simulate("paged-jax", requests, *paper_scale(name, 16)).normalized_latency)
        curves[name] = latency
    rates, limit = np.array(config["knee_rates"]), LIMIT * curves["auto"][0]
    return {name: dict(latency=lat, rate=sustainable_rate(rates, np.array(lat), limit)[0],
                       bound=sustainable_rate(rates, np.array(lat), limit)[1]) for name, lat in curves.items()}


def measure(size: str = DEFAULT_SIZE) -> dict:
    config = SIZES[size]
    return dict(machine=device_kind(), config=config, accuracy=accuracy(config), serving=serving(config),
                knee=knee(config), opt13b_ratio={name: bytes_ratio(name, OPT13B) for name in DTYPES})


def table(data: dict) -> str:
    acc = data["accuracy"]
    accuracy_rows = [[name, f"{r['perplexity']:.3f}", f"{r['perplexity_ratio'] - 1:+.1%}",
                      f"{r['greedy_agreement']:.0%}", f"{r['logprob_error_mean']:.4f} / {r['logprob_error_max']:.3f}",
                      r["bytes_per_block"], f"{acc['auto']['bytes_per_block'] / r['bytes_per_block']:.2f}x"]
                     for name, r in acc.items()]
    serving_rows = [[r["dtype"], r["block_size"], r["kv_slots"], f"{r['kv_utilization']:.0%}",
                     f"{r['mean_batch_size']:.1f}", f"{r['throughput']:.2f}", f"{r['normalized_latency']:.3f}",
                     r["num_preemptions"]] for r in data["serving"]]
    knee_rows = [[name, k["bound"] + f"{k['rate']:.2f}"] for name, k in data["knee"].items()]
    config = data["config"]
    return "\n\n".join([
        f"**Accuracy (real execution, {data['machine']})**: the embedded model on {config['texts']} windows of "
        f"{config['text_tokens']} tokens of this repository's Python, prompts in chunks of {config['chunk']} tokens; "
        f"greedy: {config['new_tokens']} tokens after {config['prompt_tokens']}, against the unquantized cache "
        "(\"auto\", the model's bfloat16 or float32). Logprob error: |prompt-token logprob - unquantized|, mean / max. "
        "Bytes per block: what the engine sizes its cache by (stats()), pages and scales of blocks of 16; "
        "blocks in the same memory follow from it.",
        markdown_table(["kv_cache_dtype", "perplexity", "vs auto", "greedy agreement", "logprob error",
                        "bytes per block", "blocks in the same memory vs auto"], accuracy_rows),
        f"**Serving at the paper's scale (simulation, OPT-13B on A100-40GB)**: one ShareGPT trace of "
        f"{config['requests']} requests at {config['rate']} req/s (beyond what any cache sustains, so the running "
        "batch is what memory lets in); the cache keeps its bytes, so 8-bit pages hold more token slots; "
        "normalized latency in s/token.",
        markdown_table(["kv_cache_dtype", "block size", "KV slots", "KV utilisation", "batch (running)",
                        "req/s", "normalized latency", "preemptions"], serving_rows),
        f"**Fig. 12's knee (simulation, block size 16)**: the request rate where normalized latency crosses "
        f"{LIMIT:g}x fp16's at the lowest rate.",
        markdown_table(["kv_cache_dtype", "sustainable req/s"], knee_rows),
    ])


def plot(data: dict):
    fig, (batch_ax, ppl_ax) = new_figure(ncols=2)
    for name in DTYPES:
        rows = [r for r in data["serving"] if r["dtype"] == name]
        batch_ax.plot([r["block_size"] for r in rows], [r["mean_batch_size"] for r in rows], marker="o", label=name)
    batch_ax.set(xscale="log", xlabel="block size", ylabel="running requests per step",
                 title=f"Batch memory lets in at {data['config']['rate']:g} req/s (OPT-13B, simulated)")
    batch_ax.legend()
    acc = data["accuracy"]
    ppl_ax.bar(list(acc), [100 * (r["perplexity_ratio"] - 1) for r in acc.values()])
    ppl_ax.axhline(0, color="grey", linewidth=0.8)
    ppl_ax.set(ylabel="perplexity change vs unquantized (%)", title="Embedded model on unseen Python")
    return fig


def headline(data: dict) -> list[list[str]]:
    acc, knee_ = data["accuracy"], data["knee"]
    return [["KV dtype", "fp8 / int8 perplexity vs unquantized", "(not in the paper)",
             f"{acc['fp8']['perplexity_ratio'] - 1:+.1%} / {acc['int8']['perplexity_ratio'] - 1:+.1%}"],
            ["KV dtype", "blocks in the same memory, fp8 / int8 vs bfloat16", "(not in the paper)",
             f"{acc['auto']['bytes_per_block'] / acc['fp8']['bytes_per_block']:.2f}x / "
             f"{acc['auto']['bytes_per_block'] / acc['int8']['bytes_per_block']:.2f}x"],
            ["KV dtype", "Fig. 12 sustainable rate with fp8 pages (simulated)", "(not in the paper)",
             f"{knee_['fp8']['bound']}{knee_['fp8']['rate']:.2f} vs {knee_['auto']['bound']}{knee_['auto']['rate']:.2f}"
             " req/s"]]


if __name__ == "__main__":
    figure_main(sys.modules[__name__])
