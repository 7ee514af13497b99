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
   caching against without, the prefix cached beforehand, the two engines in turns. The
   paper's 1.67x / 3.58x are sustainable request rates against Orca (Oracle), a different
   baseline: ours isolates what the cache itself buys. The model must be big enough that
   prefill, which the cache saves, costs what it does in serving: throughput.py's.

Models are random Llama-shaped checkpoints (experiments/common.py). The saving of parallel
sampling depends only on lengths; beam search's depends on how often beams share ancestors,
which a random model's flat next-token distribution makes rarer than a trained model's.

Sizes: full (the default) is the run in results/README.md, about 15 minutes on a 2-core CPU;
quick (what `make run` runs, about 2 minutes) the Alpaca-like saving runs at n = width = 2
(the full run's requests: most of a run's time is compiling its engine) and the prefix runs
with a quarter of the requests; tiny, for the notebook tests, one short
Alpaca-like request per run and a small prefix engine: it checks the pipeline, its numbers
mean little.
Run `python -m experiments.sharing [--size tiny|quick|full]`; results go to
experiments/results/sharing_<device>[_<size>].{md,json,png}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import device_kind, figure_main, markdown_table, new_figure, random_llama_checkpoint
from experiments.throughput import CPU as THROUGHPUT_CPU
from experiments.throughput import GPU as THROUGHPUT_GPU
from experiments.workloads import DATASETS, describe, prompt_token_ids, sample_requests
from paged_jax import LLM, BeamSearchParams, SamplingParams

# Memory saving depends on lengths, not on model size: a small model keeps the runs short.
SAVING_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048)
# The tiny run's prefix engine: the saving model, and few step shapes (no multi-step decode
# loop) so that its warm-up, twice per run, takes seconds rather than minutes.
TINY_PREFIX_ENGINE = dict(model=SAVING_MODEL, dtype="float32", llm=dict(
    max_model_len=512, max_num_seqs=2, max_num_batched_tokens=512, num_scheduler_steps=1))
SIZES = {  # requests: per workload, in the order they run; prefix_engine None: throughput.py's
    "tiny": dict(requests={"alpaca": 1}, widths=(2,), prefix_requests=6, prefix_repeats=1,
                 prefix_engine=TINY_PREFIX_ENGINE),
    "quick": dict(requests={"alpaca": 64}, widths=(2,), prefix_requests=16, prefix_repeats=5, prefix_engine=None),
    "full": dict(requests={"alpaca": 64, "sharegpt": 24}, widths=(2, 4, 6), prefix_requests=64, prefix_repeats=3,
                 prefix_engine=None),
}
NAME = "sharing"
TITLE = "Memory sharing: parallel sampling, beam search, shared prefixes (Fig. 14-16)"
DEFAULT_SIZE = "full"  # the size whose results file carries no size suffix

KINDS = {"parallel": "parallel sampling", "beam": "beam search"}
WIDTH_NAMES = {"parallel": "n", "beam": "width"}
LABELS = {"alpaca": "Alpaca", "sharegpt": "ShareGPT"}
PAPER_SAVING = {  # percent, read from §6.3 (Fig. 15); the paper gives only the ends of some ranges
    ("alpaca", "parallel", 2): 6.09, ("alpaca", "parallel", 4): 8.53, ("alpaca", "parallel", 6): 9.79,
    ("alpaca", "beam", 2): 37.6, ("alpaca", "beam", 6): 55.2,
    ("sharegpt", "parallel", 2): 16.2, ("sharegpt", "parallel", 6): 30.5,
    ("sharegpt", "beam", 2): 44.3, ("sharegpt", "beam", 6): 66.3,
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


def prefix_prompts(vocab_size: int, prefix_len: int, num_requests: int, seed: int):
    """num_requests prompts: the prefix (the same for every seed), each followed by its own
    sentence of ~30 tokens; and each request's output length, as long as its sentence."""
    prefix = np.random.default_rng(prefix_len).integers(3, vocab_size, prefix_len).tolist()
    rng = np.random.default_rng([prefix_len, seed])
    sentences = np.maximum(4, np.rint(rng.lognormal(np.log(30) - 0.08, 0.4, num_requests))).astype(int)
    return [prefix + rng.integers(3, vocab_size, n).tolist() for n in sentences], sentences.tolist()


def prefix_throughput(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> dict:
    """Offline throughput of the requests, and the share of prompt tokens the cache supplied."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    hit_rate = sum(o.num_cached_tokens for o in outputs) / sum(map(len, prompts))
    return dict(seconds=seconds, requests_per_s=len(prompts) / seconds, hit_rate=hit_rate)


def saving_runs(requests: dict[str, int], widths) -> tuple[list[dict], list[str]]:
    """Every workload x decoding x width, each on a fresh engine; and each workload's trace."""
    runs, traces = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = random_llama_checkpoint(SAVING_MODEL, Path(tmp), "float32")
        for name, num_requests in requests.items():
            for kind in KINDS:
                for width in widths:
                    run = memory_saving(path, DATASETS[name], num_requests, kind, width)
                    runs.append(dict(workload=name, kind=kind, width=width, saving_pct=100 * run["saving"],
                                     copied=run["copied"], seconds=run["seconds"]))
                    print(runs[-1], flush=True)
            traces.append(describe(DATASETS[name], run["requests"]))
    return runs, traces


def prefix_runs(engine: dict, num_requests: int, repeats: int) -> tuple[list[dict], int]:
    """Each prefix's throughput without and with prefix caching: both engines side by side,
    served the same fresh requests in turns, repeats times, so that a change in the shared
    machine's load falls on both. Each engine first serves one such turn untimed: the paper's
    prefix is stored in the cache in advance (§4.4), where the first requests of a cold cache,
    prefilled in the same step, would all miss it; and every step shape the turns use is then
    compiled and warm. Also the model's parameter count."""
    with tempfile.TemporaryDirectory() as tmp:
        path, num_params = random_llama_checkpoint(engine["model"], Path(tmp), engine["dtype"])
        llms = {caching: LLM(str(path), seed=0, enable_prefix_caching=caching, background_compile=False,
                             **engine["llm"]) for caching in (False, True)}
        vocab_size = engine["model"]["vocab_size"]
        rows = []
        for name, length in PREFIXES.items():
            warm = prefix_prompts(vocab_size, length, num_requests, seed=0)
            turns = {False: [], True: []}
            for llm in llms.values():
                prefix_throughput(llm, *warm)
            for seed in range(1, repeats + 1):
                prompts, output_lens = prefix_prompts(vocab_size, length, num_requests, seed)
                for caching, llm in llms.items():
                    turns[caching].append(prefix_throughput(llm, prompts, output_lens))
            rows.append(dict(prefix=name, tokens=length, off=turns[False], on=turns[True]))
    return rows, num_params


def prefix_engine(size: str) -> dict:
    """The size's own engine, or the throughput benchmark's model for this device (big enough
    that prefill, which the cache saves, costs what it does in serving) in an engine that
    batches no more than the requests, so that it compiles only the step shapes they use."""
    params = SIZES[size]
    if params["prefix_engine"] is not None:
        return params["prefix_engine"]
    sizes = THROUGHPUT_GPU if jax.default_backend() == "gpu" else THROUGHPUT_CPU
    return dict(model=sizes["model"], dtype=sizes["dtype"],
                llm=dict(max_model_len=sizes["max_model_len"],
                         max_num_seqs=min(sizes["max_num_seqs"], params["prefix_requests"])))


def measure(size: str = "quick") -> dict:
    params = SIZES[size]
    engine = prefix_engine(size)
    saving, traces = saving_runs(params["requests"], params["widths"])
    prefix, num_params = prefix_runs(engine, params["prefix_requests"], params["prefix_repeats"])
    return dict(machine=device_kind(), size=size, saving_model=SAVING_MODEL, saving_requests=params["requests"],
                widths=list(params["widths"]), traces=traces, saving=saving,
                prefix_engine=engine, prefix_model_params=num_params, prefix_requests=params["prefix_requests"],
                prefix_repeats=params["prefix_repeats"], prefix=prefix)


# -- the table --------------------------------------------------------------------------------

def _speedups(run: dict) -> list[float]:
    """Seconds without the cache / seconds with it, per turn (the same requests)."""
    return [off["seconds"] / on["seconds"] for off, on in zip(run["off"], run["on"])]


def _speedup(run: dict) -> float:
    return float(np.median(_speedups(run)))


def _spread(run: dict) -> str:
    ratios = _speedups(run)
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def table(data: dict) -> str:
    model, engine = data["saving_model"], data["prefix_engine"]
    rows = [[r["workload"], f"{KINDS[r['kind']]}, {WIDTH_NAMES[r['kind']]}", r["width"], f"{r['saving_pct']:.1f}",
             f"{PAPER_SAVING[(r['workload'], r['kind'], r['width'])]:g}"
             if (r["workload"], r["kind"], r["width"]) in PAPER_SAVING else "-",
             r["copied"], f"{r['seconds']:.1f}"] for r in data["saving"]]
    prefix_rows = [[f"{r['prefix']} ({r['tokens']} tokens)", f"{_median(r['off'], 'requests_per_s'):.2f}",
                    f"{_median(r['on'], 'requests_per_s'):.2f}", f"**{_speedup(r):.2f}x**", _spread(r),
                    PAPER_PREFIX_SPEEDUP[r["prefix"]], f"{100 * _median(r['on'], 'hit_rate'):.1f}"]
                   for r in data["prefix"]]
    return (
        "## Memory saving (Fig. 15)\n\n"
        f"Random Llama, {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
        f"vocabulary {model['vocab_size']}; block size 16; ignore_eos.\n"
        + "".join(f"\n- {t}" for t in data["traces"]) + "\n\n"
        + markdown_table(["workload", "decoding", "n / width", "saving %", "paper %", "blocks copied on write",
                          "seconds"], rows)
        + "\n\n## Shared prefix (Fig. 16)\n\n"
        f"Random Llama-shaped model, {data['prefix_model_params'] / 1e6:.1f}M parameters, {engine['dtype']}; "
        f"{data['prefix_requests']} requests, prefix + a sentence of ~30 tokens, ~30 greedy output tokens each, "
        f"served offline by an engine without and one with prefix caching in turns, {data['prefix_repeats']} "
        "times with fresh sentences, after one untimed turn (the prefix stored in advance, as in the paper; "
        "every step shape compiled). Medians, and the range of the per-turn speed-ups.\n\n"
        + markdown_table(["prefix", "requests/s, no caching", "requests/s, prefix caching", "speed-up", "range",
                          "paper (vs Orca Oracle)", "prompt tokens from cache %"], prefix_rows)
    )


# -- the figure and the headline ----------------------------------------------------------------

def _series(data: dict, workload: str, kind: str) -> list[dict]:
    return [r for r in data["saving"] if (r["workload"], r["kind"]) == (workload, kind)]


def _paper_points(workload: str, kind: str) -> tuple[list[int], list[float]]:
    widths = sorted(w for d, k, w in PAPER_SAVING if (d, k) == (workload, kind))
    return widths, [PAPER_SAVING[(workload, kind, w)] for w in widths]


def plot(data: dict):
    """Like the paper's Fig. 15 (saving against n and beam width, ours solid, the paper's values
    dashed in the same colour) beside Fig. 16 as throughput bars without / with prefix caching,
    the range over the turns as error bars."""
    fig, axes = new_figure(ncols=3)
    for ax, kind in zip(axes, KINDS):
        for colour, workload in enumerate(data["saving_requests"]):
            runs = _series(data, workload, kind)
            ax.plot([r["width"] for r in runs], [r["saving_pct"] for r in runs], "o-", color=f"C{colour}",
                    label=f"{LABELS[workload]} (ours)")
            ax.plot(*_paper_points(workload, kind), "s--", color=f"C{colour}", markerfacecolor="none",
                    label=f"{LABELS[workload]} (paper)")
        ax.set(xlabel=f"{KINDS[kind]} {WIDTH_NAMES[kind]}", ylabel="memory saving (%)", xticks=[2, 4, 6])
        ax.set_title(f"Fig. 15: {KINDS[kind]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    bars, positions = axes[2], np.arange(len(data["prefix"]))
    for offset, (key, label) in zip((-0.2, 0.2), (("off", "no caching"), ("on", "prefix caching"))):
        medians = [_median(r[key], "requests_per_s") for r in data["prefix"]]
        spans = [[m - min(t["requests_per_s"] for t in r[key]) for m, r in zip(medians, data["prefix"])],
                 [max(t["requests_per_s"] for t in r[key]) - m for m, r in zip(medians, data["prefix"])]]
        bars.bar(positions + offset, medians, 0.4, yerr=spans, capsize=4, label=f"{label} (median, range)")
    for x, r in zip(positions, data["prefix"]):
        bars.annotate(f"{_speedup(r):.2f}x\n(paper {PAPER_PREFIX_SPEEDUP[r['prefix']]})",
                      (x + 0.2, max(t["requests_per_s"] for t in r["on"])), ha="center", va="bottom", fontsize=8)
    bars.set_xticks(positions, [f"{r['prefix']} ({r['tokens']} tokens)" for r in data["prefix"]])
    bars.set(ylabel="requests/s")
    bars.margins(y=0.25)  # room for the speed-up labels
    bars.set_title("Fig. 16: shared prefix", fontsize=9)
    bars.legend(fontsize="small")
    fig.suptitle(f"Memory sharing, {data['size']} run ({data['machine']})", fontsize=9)
    fig.tight_layout()
    return fig


def _paper_range(workload: str, kind: str, widths: list[int]) -> str:
    """The paper's values at the widths we ran where it gives them all, else its range."""
    if all((workload, kind, w) in PAPER_SAVING for w in widths):
        return " / ".join(f"{PAPER_SAVING[(workload, kind, w)]:g}" for w in widths) + " %"
    _, values = _paper_points(workload, kind)
    return f"{values[0]:g}-{values[-1]:g} %"


def headline(data: dict) -> list[list[str]]:
    rows = []
    for workload in data["saving_requests"]:
        for kind in KINDS:
            runs = _series(data, workload, kind)
            widths = "/".join(str(r["width"]) for r in runs)
            rows.append(["Fig. 15", f"{KINDS[kind]} saving, {LABELS[workload]}, {WIDTH_NAMES[kind]}={widths}",
                         _paper_range(workload, kind, [r["width"] for r in runs]),
                         " / ".join(f"{r['saving_pct']:.1f}" for r in runs) + " %"])
    names = " / ".join(r["prefix"] for r in data["prefix"])
    rows.append(["Fig. 16", f"shared prefix speed-up {names}",
                 " / ".join(PAPER_PREFIX_SPEEDUP[r["prefix"]] for r in data["prefix"]) + " vs Orca (Oracle)",
                 " / ".join(f"{_speedup(r):.2f}x" for r in data["prefix"]) + " (ranges "
                 + " / ".join(_spread(r) for r in data["prefix"]) + f" over {data['prefix_repeats']} turns), "
                 "prefix caching on vs off"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
