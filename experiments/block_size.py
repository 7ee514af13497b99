"""Fig. 18b: the block size trade-off. Small blocks waste little memory in each sequence's
last block but make the kernel read many small pieces; large blocks read efficiently but
waste slots (internal fragmentation), so fewer requests fit. The paper (OPT-13B, 2048-token
context) finds ShareGPT best at 16-128 and Alpaca at 16-32.

Our paged engine serves the same Poisson trace at each block size (experiments/serving.py),
with the cache's token slots fixed, at a rate (64 req/s) well above what the embedded model
serves on a CPU, so that memory binds at every block size however fast the machine is that
day. Lengths are scaled by max_model_len / 2048 (1/8 with the default model), so block size b
here wastes what 8b wastes at the paper's scale. The steps are timed on a modelled clock
(measure), which leaves the kernel's side of the trade-off to kernel_bench.py on a GPU.

Run `python -m experiments.block_size [--size tiny|quick|full]`.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from tqdm import tqdm

from experiments import request_rate
from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.serving import PAPER_CONTEXT, EngineServer, Setup, default_setup, make_engine, serve
from experiments.workloads import DATASETS, sample_requests

ALL_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NAME = "block_size"
TITLE = "Block size (Fig. 18b)"
DEFAULT_SIZE = "quick"  # the reference run: its results file carries no size suffix
SIZES = {
    "tiny": dict(datasets=("sharegpt",), block_sizes=(2, 64), rate=64.0, requests=8, warm_up=False),
    "quick": dict(datasets=("sharegpt",), block_sizes=(1, 4, 16, 64, 256), rate=64.0, requests=60, warm_up=True),
    "full": dict(datasets=("sharegpt", "alpaca"), block_sizes=ALL_BLOCK_SIZES, rate=64.0, requests=200,
                 warm_up=True),
}
PAPER_BEST = {"sharegpt": (16, 128), "alpaca": (16, 32)}  # block sizes at the paper's 2048-token context
PAPER = {dataset: f"best at {low}-{high}" for dataset, (low, high) in PAPER_BEST.items()}


def measure(size: str = DEFAULT_SIZE) -> dict:
    """Serve each trace at each block size, all on one modelled clock (request_rate.clock_model:
    on a CPU one fixed model, elsewhere fitted at the first block size): fitted separately,
    each block size's model would carry the shared machine's load at the time it was fitted,
    more than any difference between block sizes. What the clock leaves out is what a step costs per block
    (the kernel's side of the trade-off); what counts is what the block size does to
    admission, batching and preemption (the memory side)."""
    config, setup = SIZES[size], default_setup()
    traces = {d: sample_requests(DATASETS[d], config["requests"], max_model_len=setup.max_model_len, seed=2,
                                 rate=config["rate"]) for d in config["datasets"]}
    runs, cost, first = [], None, None
    for block_size in tqdm(config["block_sizes"], desc="block_size"):
        # Only the first engine's steps are compared with the clock; the others compile as they go.
        engine = make_engine("paged-jax", dataclasses.replace(setup, block_size=block_size),
                             warm_up=config["warm_up"] and first is None)
        if first is None:  # a fit needs busy steps and light ones
            first, cost = engine, request_rate.clock_model(engine, *traces.values(), *calibration_traces(config, setup))
        for dataset, requests in traces.items():
            run = serve(EngineServer(engine, requests, clock=cost.step_seconds), requests)
            runs.append(dict(dataset=dataset, block_size=block_size, **dataclasses.asdict(run)))
    return dict(machine=device_kind(), mode="real execution, modelled clock", setup=dataclasses.asdict(setup),
                config=config, runs=runs, cost_model=request_rate.clock_record(cost, first))


def calibration_traces(config: dict, setup: Setup) -> list:
    """Other requests of each dataset at a quarter of the rate: with the measured traces, steps
    from small batches to large ones for the step-time model."""
    return [sample_requests(DATASETS[d], config["requests"], max_model_len=setup.max_model_len, seed=3,
                            rate=config["rate"] / 4) for d in config["datasets"]]


def curve(data: dict, dataset: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    runs = sorted((r for r in data["runs"] if r["dataset"] == dataset), key=lambda r: r["block_size"])
    return np.array([r["block_size"] for r in runs]), np.array([r[key] for r in runs])


def best(data: dict, dataset: str) -> int:
    sizes, latency = curve(data, dataset, "normalized_latency")
    return int(sizes[np.argmin(latency)])


def paper_scale(data: dict) -> float:
    """How many of the paper's tokens one of ours stands for (2048 / our context): a block of
    b tokens here wastes what one of b x this wastes there."""
    return PAPER_CONTEXT / data["setup"]["max_model_len"]


def table(data: dict) -> str:
    config, setup = data["config"], data["setup"]
    parts = [f"Paged engine, model `{setup['model'].rsplit('/', 1)[-1]}`, context {setup['max_model_len']} "
             f"(a block of b tokens here stands for {paper_scale(data):g}b at the paper's 2048), "
             f"{Setup(**setup).num_blocks * setup['block_size']} KV token slots at every block size; "
             f"{config['requests']} requests at {config['rate']:g} req/s. **Real execution, modelled clock**: the "
             f"engine serves every trace, each step timed by one step-time model of this machine, "
             f"{request_rate.describe_clock(data['cost_model'])}, the same at every block size. So this "
             "measures the memory side of the trade-off (internal fragmentation: fewer requests fit, more "
             "preemptions); the kernel side, small blocks read inefficiently, is a GPU kernel's cost and is "
             "left out here (kernel_bench.py times it on a GPU)."]
    for dataset in config["datasets"]:
        rows = [[r["block_size"], f"{r['block_size'] * paper_scale(data):g}", f"{r['normalized_latency'] * 1e3:.1f}",
                 f"{100 * r['kv_utilization']:.1f}", f"{r['mean_batch_size']:.1f}", r["num_preemptions"]]
                for r in sorted((r for r in data["runs"] if r["dataset"] == dataset), key=lambda r: r["block_size"])]
        parts.append(f"\n## {dataset} (paper: {PAPER[dataset]}; ours: best at {best(data, dataset)})\n")
        parts.append(markdown_table(["block size", "at the paper's scale", "normalized latency (ms/token)",
                                     "KV utilisation %", "mean batch", "preemptions"], rows))
    return "\n".join(parts)


def plot(data: dict):
    """Latency and KV utilisation against block size, log2 axis as the paper's; the paper's
    best range (scaled to our context) shaded."""
    fig, (latency_ax, use_ax) = new_figure(ncols=2)
    for k, dataset in enumerate(data["config"]["datasets"]):
        sizes, latency = curve(data, dataset, "normalized_latency")
        _, use = curve(data, dataset, "kv_utilization")
        style = dict(marker="os"[k], linestyle="-:"[k], label=dataset)
        latency_ax.plot(sizes, latency, **style)
        use_ax.plot(sizes, 100 * use, **style)
    low, high = (b / paper_scale(data) for b in PAPER_BEST["sharegpt"])
    latency_ax.axvspan(low, high, color="grey", alpha=0.2, label=f"paper's best (sharegpt), scaled: {low:g}-{high:g}")
    latency_ax.set(ylabel="normalized latency (s/token)")
    use_ax.set(ylabel="KV utilisation %", ylim=(0, 105))
    for ax in (latency_ax, use_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(data["config"]["block_sizes"], [str(b) for b in data["config"]["block_sizes"]])
        ax.tick_params(axis="x", which="minor", bottom=False)
        ax.set_xlabel(f"block size (tokens; x{paper_scale(data):g} at the paper's context)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Block size (Fig. 18b), memory side: real execution on a modelled clock, {data['machine']}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    """The memory side of the trade-off at every block size: the kernel side needs a GPU, so no
    best block size is claimed."""
    dataset = data["config"]["datasets"][0]
    sizes, latency = curve(data, dataset, "normalized_latency")
    _, use = curve(data, dataset, "kv_utilization")
    return [["Fig. 18b", f"{dataset}, block {' / '.join(map(str, sizes))} (memory side only): normalized latency; "
             "KV utilisation", PAPER[dataset],
             " / ".join(f"{1e3 * x:.0f}" for x in latency) + " ms/token; " + " / ".join(f"{100 * x:.0f}" for x in use)
             + " %"]]


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
