"""Fig. 18b: the block size trade-off. Small blocks waste little memory in each sequence's
last block but make the kernel read many small pieces; large blocks read efficiently but
waste slots (internal fragmentation), so fewer requests fit. The paper (OPT-13B, 2048-token
context) finds ShareGPT best at 16-128 and Alpaca at 16-32.

Our paged engine serves the same Poisson trace at each block size (experiments/serving.py),
with the cache's token slots fixed. Lengths are scaled by max_model_len / 2048 (1/8 with the
default model), so block size b here wastes what 8b wastes at the paper's scale.

Run `python -m experiments.block_size [--size tiny|quick|full]`.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from tqdm import tqdm

from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.serving import EngineServer, Setup, default_setup, make_engine, serve
from experiments.workloads import DATASETS, sample_requests

ALL_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NAME = "block_size"
TITLE = "Block size (Fig. 18b)"
DEFAULT_SIZE = "quick"  # the reference run: its results file carries no size suffix
SIZES = {
    "tiny": dict(datasets=("sharegpt",), block_sizes=(2, 64), rate=16.0, requests=8, warm_up=False),
    "quick": dict(datasets=("sharegpt",), block_sizes=(1, 4, 16, 64, 256), rate=16.0, requests=60, warm_up=True),
    "full": dict(datasets=("sharegpt", "alpaca"), block_sizes=ALL_BLOCK_SIZES, rate=16.0, requests=200,
                 warm_up=True),
}
PAPER = {"sharegpt": "best at 16-128", "alpaca": "best at 16-32"}


def measure(size: str = DEFAULT_SIZE) -> dict:
    config, setup = SIZES[size], default_setup()
    traces = {d: sample_requests(DATASETS[d], config["requests"], max_model_len=setup.max_model_len, seed=2,
                                 rate=config["rate"]) for d in config["datasets"]}
    runs = []
    for block_size in tqdm(config["block_sizes"], desc="block_size"):
        sized = dataclasses.replace(setup, block_size=block_size)
        engine = make_engine("paged-jax", sized, warm_up=config["warm_up"])
        for dataset, requests in traces.items():
            run = serve(EngineServer(engine, requests), requests)
            runs.append(dict(dataset=dataset, block_size=block_size, **dataclasses.asdict(run)))
    return dict(machine=device_kind(), setup=dataclasses.asdict(setup), config=config, runs=runs)


def curve(data: dict, dataset: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    runs = sorted((r for r in data["runs"] if r["dataset"] == dataset), key=lambda r: r["block_size"])
    return np.array([r["block_size"] for r in runs]), np.array([r[key] for r in runs])


def best(data: dict, dataset: str) -> int:
    sizes, latency = curve(data, dataset, "normalized_latency")
    return int(sizes[np.argmin(latency)])


def table(data: dict) -> str:
    config, setup = data["config"], data["setup"]
    parts = [f"Paged engine, model `{setup['model'].rsplit('/', 1)[-1]}`, context {setup['max_model_len']}, "
             f"{Setup(**setup).num_blocks * setup['block_size']} KV token slots at every block size; "
             f"{config['requests']} requests at {config['rate']:g} req/s."]
    for dataset in config["datasets"]:
        rows = [[r["block_size"], f"{r['normalized_latency'] * 1e3:.1f}", f"{100 * r['kv_utilization']:.1f}",
                 f"{r['mean_batch_size']:.1f}", r["num_preemptions"]]
                for r in sorted((r for r in data["runs"] if r["dataset"] == dataset), key=lambda r: r["block_size"])]
        parts.append(f"\n## {dataset} (paper: {PAPER[dataset]}; ours: best at {best(data, dataset)})\n")
        parts.append(markdown_table(["block size", "normalized latency (ms/token)", "KV utilisation %",
                                     "mean batch", "preemptions"], rows))
    return "\n".join(parts)


def plot(data: dict):
    fig, (latency_ax, use_ax) = new_figure(ncols=2)
    for dataset in data["config"]["datasets"]:
        sizes, latency = curve(data, dataset, "normalized_latency")
        _, use = curve(data, dataset, "kv_utilization")
        latency_ax.plot(sizes, latency, marker="o", label=dataset)
        use_ax.plot(sizes, 100 * use, marker="o", label=dataset)
    latency_ax.set(xscale="log", xlabel="block size (tokens)", ylabel="normalized latency (s/token)")
    use_ax.set(xscale="log", xlabel="block size (tokens)", ylabel="KV utilisation %", ylim=(0, 100))
    for ax in (latency_ax, use_ax):
        ax.set_xticks(data["config"]["block_sizes"], [str(b) for b in data["config"]["block_sizes"]])
        ax.legend(fontsize=7)
    fig.suptitle(f"Block size (Fig. 18b), {data['machine']}")
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    dataset = data["config"]["datasets"][0]
    sizes, use = curve(data, dataset, "kv_utilization")
    return [["Fig. 18b", f"best block size ({dataset}); KV utilisation at block {sizes[0]} / {sizes[-1]}",
             PAPER[dataset], f"{best(data, dataset)}; {100 * use[0]:.0f} / {100 * use[-1]:.0f} %"]]


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
