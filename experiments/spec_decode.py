"""Speculative decoding on the embedded model: output tokens per second with prompt lookup
(n-gram) drafts and with the draft model's (models/stdlib-llama-draft, trained by
`python -m experiments.train_default_model --draft`), against no speculation, on Python
completion at several batch sizes; how many drafts are kept; and where speculation stops
paying. Plus a serving row: our server with and without n-gram speculation at a low request
rate, driven by the serving benchmark's client (vLLM's benchmark_serving shape).

Every system is an engine of its own, warmed up with every step shape compiled (the steady
state), fed the same prompts (windows of standard-library files the models never trained on;
at batch b, all of them b at a time, so every batch size generates the same tokens) and asked
for the same greedy, fixed-length outputs (checked against those of no speculation: in
bfloat16 a verifying step and a decode step may round a near-tie apart). The systems take
turns within each round, the order rotating, and each speed-up is the median of per-round
ratios (the machine's load drifts). The baseline runs our default decode loop
(num_scheduler_steps 8); a step that verifies drafts is a single step.

Why the speed-up is what it is, measured in the same runs: a sequence's output tokens per
model step (1 without speculation; 1 + the drafts kept with it) against a model step's time
(a verifying step computes k + 1 query tokens per sequence, padded to a mixed bucket of at
least 16 tokens, where a decode step computes one).

    python -m experiments.spec_decode [--size tiny|quick|full]
"""

from __future__ import annotations

import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.train_default_model import split_corpus, stdlib_sources
from paged_jax import LLM, SamplingParams

REPO = Path(__file__).resolve().parent.parent
TARGET, DRAFT = REPO / "models" / "stdlib-llama", REPO / "models" / "stdlib-llama-draft"
NAME = "spec_decode"
TITLE = "Speculative decoding: n-gram and draft-model drafts against none"
DEFAULT_SIZE = "quick"
SYSTEMS = {
    "none": None,
    "ngram k=4": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
    # a single earlier token is match enough: drafts nearly every step, fewer of them kept
    "ngram k=4 n>=1": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1},
    "draft k=3": {"model": str(DRAFT), "num_speculative_tokens": 3},
}
SIZES = {
    "tiny": dict(batches=(1, 2), prompt_tokens=64, max_tokens=16, rounds=1, serving=None),
    "quick": dict(batches=(1, 4, 16), prompt_tokens=96, max_tokens=128, rounds=3,
                  serving=dict(rate=1.0, num_prompts=16, prompt_tokens=96, max_tokens=128)),
    "full": dict(batches=(1, 2, 4, 8, 16, 32), prompt_tokens=96, max_tokens=128, rounds=5,
                 serving=dict(rate=1.0, num_prompts=40, prompt_tokens=96, max_tokens=128)),
}
MAX_MODEL_LEN = 256


def code_prompts(llm: LLM, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Windows of `length` tokens of the standard-library files the embedded models never
    trained on (train_default_model's held-out split: fixed for a Python version, unlike this
    repository's own source), at seeded offsets."""
    _, held_out = split_corpus(stdlib_sources(Path(sysconfig.get_paths()["stdlib"])))
    tokens = llm.get_tokenizer().encode("\n\n".join(held_out))
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, count)
    return [tokens[s : s + length] for s in starts]


def engine(config: dict | None, max_num_seqs: int) -> LLM:
    return LLM(str(TARGET), max_model_len=MAX_MODEL_LEN, max_num_seqs=max_num_seqs, max_num_batched_tokens=512,
               background_compile=False, speculative_config=config)


def run_once(llm: LLM, prompts: list[list[int]], batch: int, params: SamplingParams) -> dict:
    """Every prompt, in batches of `batch` one after the other (so each batch size generates
    the same tokens): output tokens/s, the tokens, and the engine's counters over it."""
    engine_ = llm.engine
    before, steps_before = dict(llm.stats()), len(engine_.step_log)
    start = time.perf_counter()
    outputs = [o for i in range(0, len(prompts), batch)
               for o in llm.generate([{"prompt_token_ids": p} for p in prompts[i : i + batch]], params,
                                     use_tqdm=False)]
    seconds = time.perf_counter() - start
    after, log = llm.stats(), engine_.step_log[steps_before:]
    tokens = [o.outputs[0].token_ids for o in outputs]
    delta = {k: after[k] - before[k] for k in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                                                "spec_decode_num_accepted_tokens")}
    return dict(seconds=seconds, tok_s=sum(map(len, tokens)) / seconds, tokens=tokens,
                model_steps=sum(r.num_steps for r in log), step_seconds=sum(r.seconds for r in log), **delta)


def offline(config: dict) -> dict:
    """Each batch size: rounds in which every system generates the same prompts in turn."""
    params = SamplingParams(temperature=0, max_tokens=config["max_tokens"], ignore_eos=True)
    llms = {name: engine(spec, max(config["batches"])) for name, spec in SYSTEMS.items()}
    prompts = code_prompts(llms["none"], max(config["batches"]), config["prompt_tokens"])
    rows = []
    for batch in config["batches"]:
        names = list(llms)
        for name in names:  # once untimed: each batch's shapes are warm before its rounds
            run_once(llms[name], prompts[:batch], batch, params)
        runs = {name: [] for name in names}
        for r in range(config["rounds"]):
            for name in names[r % len(names):] + names[: r % len(names)]:
                runs[name].append(run_once(llms[name], prompts, batch, params))
        for name in names:
            rows.append(summarize(name, batch, runs[name], runs["none"]))
    return dict(rows=rows, prompts=len(prompts))


def summarize(name: str, batch: int, runs: list[dict], baseline: list[dict]) -> dict:
    ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(runs, baseline)]
    drafts = sum(r["spec_decode_num_drafts"] for r in runs)
    draft_tokens = sum(r["spec_decode_num_draft_tokens"] for r in runs)
    accepted = sum(r["spec_decode_num_accepted_tokens"] for r in runs)
    output = sum(sum(map(len, r["tokens"])) for r in runs)
    steps = sum(r["model_steps"] for r in runs)
    return dict(system=name, batch=batch, tok_s=statistics.median(r["tok_s"] for r in runs),
                speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
                # sequences whose tokens are none's (bfloat16 may round a near-tie apart; float32 does not: tests)
                same_tokens=float(np.mean([t == u for r, b in zip(runs, baseline)
                                           for t, u in zip(r["tokens"], b["tokens"])])),
                acceptance_length=1 + accepted / drafts if drafts else None,
                acceptance_rate=accepted / draft_tokens if draft_tokens else None,
                tokens_per_step=output / (steps * batch) if steps else 0.0,  # a step serves `batch` sequences
                ms_per_step=1e3 * sum(r["step_seconds"] for r in runs) / steps if steps else 0.0)


def serving(config: dict) -> list[dict]:
    """Our server with and without n-gram speculation, in turns, at a low Poisson rate."""
    import json
    import tempfile

    from experiments.serving_bench import Server, bench_rate, make_prompts, warm

    prompts, workload = make_prompts(str(TARGET), config["num_prompts"], MAX_MODEL_LEN, seed=0,
                                     fixed=(config["prompt_tokens"], config["max_tokens"]))
    flags = {"none": [], "ngram k=4": ["--speculative-config", json.dumps(SYSTEMS["ngram k=4"])]}
    rows = []
    with Server("paged-jax", str(TARGET), MAX_MODEL_LEN, "auto", Path(tempfile.gettempdir()) / "spec_none.log",
                flags["none"]) as plain, \
            Server("paged-jax", str(TARGET), MAX_MODEL_LEN, "auto", Path(tempfile.gettempdir()) / "spec_ngram.log",
                   flags["ngram k=4"]) as spec:
        for server in (plain, spec):
            warm(server.url, "paged-jax", str(TARGET), prompts, 0)
        for name, server in (("none", plain), ("ngram k=4", spec), ("ngram k=4", spec), ("none", plain)):
            row = bench_rate(server.url, "paged-jax", str(TARGET), prompts, config["rate"], 0)
            rows.append(dict(system=name, workload=workload, **{k: row[k] for k in (
                "rate", "completed", "output_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")}))
    return rows


def measure(size: str = DEFAULT_SIZE) -> dict:
    config = SIZES[size]
    data = dict(machine=device_kind(), date=time.strftime("%Y-%m-%d"), size=size, config=config, **offline(config))
    data["serving"] = serving(config["serving"]) if config["serving"] else []
    return data


def stops_paying(data: dict, system: str) -> str:
    """The smallest batch at which the system's median speed-up is below 1 (or none measured)."""
    slower = [r["batch"] for r in data["rows"] if r["system"] == system and r["speedup"] < 1]
    return f"batch {min(slower)}" if slower else f"not up to batch {max(data['config']['batches'])}"


def table(data: dict) -> str:
    c = data["config"]
    lines = [f"Machine: {data['machine']}, {data['date']}. Model `stdlib-llama` (bfloat16 where the CPU has it), "
             f"prompts of {c['prompt_tokens']} tokens of held-out standard-library source, {c['max_tokens']} greedy "
             f"output tokens each (ignore_eos); {c['rounds']} rounds, systems in turns; speed-up = median of per-round "
             "ratios to `none` (min-max). `python -m experiments.spec_decode --size " + data["size"] + "`.", ""]
    rows = [[r["system"], r["batch"], f"{r['tok_s']:.0f}",
             f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})",
             f"{r['same_tokens']:.0%}",
             "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}",
             "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.0%}",
             f"{r['tokens_per_step']:.2f}", f"{r['ms_per_step']:.1f}"] for r in data["rows"]]
    lines.append(markdown_table(["system", "batch", "output tok/s", "speed-up", "sequences as none's",
                                 "acceptance length", "drafts kept", "tokens / seq / step", "ms / model step"], rows))
    lines += ["", "Speculation stops paying at: " + "; ".join(f"{s}: {stops_paying(data, s)}" for s in SYSTEMS
                                                               if s != "none") + "."]
    if data["serving"]:
        first = data["serving"][0]
        lines += ["", f"Serving (our server, {first['workload']} cut from standard-library source; Poisson at "
                      f"{first['rate']} req/s, the serving benchmark's streaming client; two turns each):",
                  "", markdown_table(["system", "done", "output tok/s", "median TTFT (ms)", "median TPOT (ms)",
                                      "median ITL (ms)", "median e2e (ms)"],
                                     [[r["system"], r["completed"], f"{r['output_throughput']:.0f}",
                                       *(f"{r[m]['median']:.1f}" for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"))]
                                      for r in data["serving"]])]
    else:
        lines += ["", "(No serving row at this size: it starts two servers.)"]
    return "\n".join(lines)


def plot(data: dict):
    fig, (speed, accept) = new_figure(ncols=2, width=4.6)
    for system in SYSTEMS:
        rows = [r for r in data["rows"] if r["system"] == system]
        batches = [r["batch"] for r in rows]
        speed.plot(batches, [r["speedup"] for r in rows], marker="o", label=system)
        if system != "none":
            accept.plot(batches, [r["acceptance_length"] or 1 for r in rows], marker="o", label=system)
    for ax, label in ((speed, "output tok/s vs none"), (accept, "tokens per verifying step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel(label)
        ax.legend()
    speed.axhline(1.0, color="grey", lw=0.8)
    fig.suptitle(f"Speculative decoding, {data['machine']}")
    return fig


def headline(data: dict) -> list[list[str]]:
    at1 = {r["system"]: r for r in data["rows"] if r["batch"] == 1}
    return [["Spec. decoding", f"batch 1 speed-up, {s}", "(not in the paper)",
             f"{at1[s]['speedup']:.2f}x, {at1[s]['acceptance_length']:.2f} tokens per step"]
            for s in SYSTEMS if s != "none" and s in at1]


if __name__ == "__main__":
    figure_main(sys.modules[__name__])
