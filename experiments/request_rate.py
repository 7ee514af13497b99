"""Fig. 12-13: normalized latency vs request rate, and the batch size each system sustains.

Every system serves the same Poisson traces (experiments/serving.py): our paged engine, Orca
with Oracle / Pow2 / Max reservations and static batching (FasterTransformer's way), all in
this engine with only the memory manager and scheduler changed. A system's sustainable rate is
where its normalized latency crosses LIMIT x our latency at the lowest rate (interpolated on a
log-rate axis): the knee the paper reads off its plots. The paper's ratios: 1.7-2.7x Orca
(Oracle), 2.7-8x Orca (Max), up to 22x FasterTransformer; OPT-13B batches 2.2x the requests
of Oracle and 4.3x those of Max (Fig. 13a).

By real execution the engine serves every trace, timed on a clock modelled from this
machine's steps (clock_model): on a shared CPU, wall-clock steps swing with the other
processes' load, and the ratios of two wall-clock runs disagreed (the notes of
experiments/results/README.md). On a CPU that clock is one fixed model (CPU_CLOCK), so a rerun
gives the same ratios.
At the paper's scale (OPT-13B on an A100, 2048-token context) the sweep runs in the simulator
(experiments/simulator.py): the engine itself on the cost-model executor, modelled step times.

Run `python -m experiments.request_rate [--size tiny|quick|full] [--simulate]`; results go to
experiments/results/request_rate[_simulated]_<device>[_<size>].{md,json,png}.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from tqdm import tqdm

from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.serving import SYSTEMS, EngineServer, Setup, default_setup, make_engine, serve
from experiments.simulator import A100_OPT13B, Scale, simulate
from experiments.workloads import DATASETS, describe, sample_requests
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.worker.cost_model import CostModel

LIMIT = 4.0  # sustainable: normalized latency within 4x the unloaded one
PAPER_RATIOS = {"orca-oracle": "1.7-2.7x", "orca-pow2": "-", "orca-max": "2.7-8x", "static": "up to 22x"}
PAPER_BATCH_RATIOS = {"orca-oracle": "2.2x", "orca-max": "4.3x"}

NAME = "request_rate"
TITLE = "Serving: latency vs request rate (Fig. 12-13)"
DEFAULT_SIZE = "quick"  # the reference run: its results file carries no size suffix
SIZES = {
    "tiny": dict(datasets=("sharegpt",), systems=("paged-jax", "orca-max"), rates=(4.0, 32.0), requests=8,
                 warm_up=False),
    "quick": dict(datasets=("sharegpt",), systems=("paged-jax", "orca-oracle", "orca-max", "static"),
                  rates=(4.0, 16.0, 32.0, 64.0), requests=100, warm_up=True),
    "full": dict(datasets=("sharegpt", "alpaca"), systems=tuple(SYSTEMS),
                 rates=(1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0), requests=200, warm_up=True),
}
# The simulation at the paper's scale: the paper's rate ranges (Fig. 12a, 12d for OPT-13B).
SIMULATED_SIZES = {
    "tiny": dict(datasets=("sharegpt",), systems=tuple(SYSTEMS), rates={"sharegpt": (0.5, 2.0)}, requests=40),
    "quick": dict(datasets=("sharegpt",), systems=tuple(SYSTEMS),
                  rates={"sharegpt": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}, requests=200),
    "full": dict(datasets=("sharegpt", "alpaca"), systems=tuple(SYSTEMS),
                 rates={"sharegpt": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0),
                        "alpaca": (2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0)}, requests=1000),
}


def measure(size: str | dict = DEFAULT_SIZE, simulate: bool = False) -> dict:
    """Real execution: serve every (dataset, rate) trace with every system, one engine per
    system, on a modelled clock (clock_model); or with simulate,
    simulate_paper_scale. size: a name in SIZES or a dict like its values."""
    if simulate:
        return simulate_paper_scale(size)
    config, setup = SIZES[size] if isinstance(size, str) else size, default_setup()
    traces = {(d, r): sample_requests(DATASETS[d], config["requests"], max_model_len=setup.max_model_len, seed=1,
                                      rate=r)
              for d in config["datasets"] for r in config["rates"]}
    ours, rates = make_engine("paged-jax", setup, warm_up=config["warm_up"]), config["rates"]
    cost = clock_model(ours, *(traces[config["datasets"][0], r] for r in (rates[0], rates[-1])))
    runs = []
    with tqdm(total=len(config["systems"]) * len(traces), desc="request_rate") as progress:
        for system in config["systems"]:  # the others compile as they go: the modelled clock does not see it
            engine = ours if system == "paged-jax" else make_engine(system, setup, warm_up=False)
            for (dataset, rate), requests in traces.items():
                run = serve(EngineServer(engine, requests, clock=cost.step_seconds), requests)
                runs.append(dict(system=system, dataset=dataset, rate=rate, **dataclasses.asdict(run)))
                progress.update()
    return dict(machine=device_kind(), mode="real execution, modelled clock", setup=dataclasses.asdict(setup),
                config=config, runs=runs, cost_model=clock_record(cost, ours),
                traces=[describe(DATASETS[d], traces[d, config["rates"][0]], setup.max_model_len)
                        for d in config["datasets"]])


# This CPU's step times: the mean of three fits of clock_model to our engine serving the quick
# traces, the machine idle (2 cores, 2026-12-05). The fits scatter (the per-token and
# per-cached-token costs grow together, so a fit trades one for the other), and a clock refitted
# in every run moved every ratio read off a sweep with it (both spreads: the notes of
# experiments/results/README.md); on a CPU the sweeps run on this one clock instead.
CPU_CLOCK = CostModel(fixed=0.88e-3, per_token=370e-6, per_context_token=2.2e-6,
                      source="this 2-core CPU's step-time model (request_rate.CPU_CLOCK, fitted idle)")


def clock_model(engine: LLMEngine, *traces: list) -> CostModel:
    """The modelled clock's step-time model. On a CPU, CPU_CLOCK. Elsewhere, fitted to our
    engine serving the traces on the wall clock (small batches and large; stalls and
    compilations, over 3x a first fit's time, left out). The sweeps run on this clock, because
    wall-clock steps on a shared CPU swing with the other processes' load, and with them the
    order of admissions and every ratio read off a sweep."""
    if jax.default_backend() == "cpu":
        return CPU_CLOCK
    log = []
    for requests in traces:
        server = EngineServer(engine, requests)
        serve(server, requests)
        log += server.log()
    first = CostModel.fit(log, "first fit")
    kept = [r for r in log if r.seconds < 3 * first.step_seconds(r)]
    return CostModel.fit(kept, f"fit to {len(kept)} of {len(log)} steps of ours serving the traces on the wall "
                               "clock, those over 3x a first fit's time left out")


def clock_record(cost: CostModel, engine: LLMEngine) -> dict:
    """The clock's model for a results file, with its mean relative error over our engine's
    wall-clock steps in the run (stalls and compilations, over 3x the model, left out): how far
    this run's steps were from the clock."""
    kept = [r for r in engine.step_log if r.seconds < 3 * cost.step_seconds(r)]
    return dict(dataclasses.asdict(cost), relative_error=cost.relative_error(kept) if kept else float("nan"))


def describe_clock(cost: dict) -> str:
    """The clock's model as a table says it."""
    return (f"{cost['fixed'] * 1e3:.2f} ms + {cost['per_token'] * 1e6:.0f} us/token + "
            f"{cost['per_context_token'] * 1e9:.0f} ns per cached token ({cost['source']}; mean error "
            f"{100 * cost['relative_error']:.0f}% over our engine's wall-clock steps of the run)")


def simulate_paper_scale(size: str | dict = "quick", scale: Scale = Scale(), cost: CostModel = A100_OPT13B) -> dict:
    """The same sweep at the paper's scale, in the simulator (labelled as such). size: a name
    in SIMULATED_SIZES or a dict like its values."""
    config = SIMULATED_SIZES[size] if isinstance(size, str) else size
    runs = []
    jobs = [(d, r) for d in config["datasets"] for r in config["rates"][d]]
    with tqdm(total=len(config["systems"]) * len(jobs), desc="request_rate (simulated)") as progress:
        for dataset, rate in jobs:
            requests = sample_requests(DATASETS[dataset], config["requests"], seed=1, rate=rate)
            for system in config["systems"]:
                run = simulate(system, requests, scale, cost)
                runs.append(dict(system=system, dataset=dataset, rate=rate, **dataclasses.asdict(run)))
                progress.update()
    return dict(machine=device_kind(), mode=f"simulation: {cost.source}", setup=dataclasses.asdict(scale),
                config=config, runs=runs, cost_model=dataclasses.asdict(cost),
                traces=[describe(DATASETS[d], sample_requests(DATASETS[d], config["requests"], seed=1))
                        for d in config["datasets"]])


def curve(data: dict, system: str, dataset: str, key: str = "normalized_latency") -> tuple[np.ndarray, np.ndarray]:
    runs = sorted((r for r in data["runs"] if r["system"] == system and r["dataset"] == dataset),
                  key=lambda r: r["rate"])
    return np.array([r["rate"] for r in runs]), np.array([r[key] for r in runs])


def sustainable_rate(rates: np.ndarray, latency: np.ndarray, limit: float) -> tuple[float, str]:
    """The rate where latency first crosses limit (log-linear interpolation), and "" ; or the
    highest rate and ">" when it never crosses, the lowest and "<" when it starts above."""
    above = np.nonzero(latency > limit)[0]
    if len(above) == 0:
        return float(rates[-1]), ">"
    i = above[0]
    if i == 0:
        return float(rates[0]), "<"
    t = (np.log(limit) - np.log(latency[i - 1])) / (np.log(latency[i]) - np.log(latency[i - 1]))
    return float(np.exp(np.log(rates[i - 1]) + t * (np.log(rates[i]) - np.log(rates[i - 1])))), ""


def summary(data: dict, dataset: str) -> dict[str, dict]:
    """Per system: sustainable rate, its ratio to ours, and the mean batch size at the top rate."""
    rates, ours = curve(data, "paged-jax", dataset)
    limit = LIMIT * ours[0]
    result = {}
    for system in data["config"]["systems"]:
        r, latency = curve(data, system, dataset)
        _, batch = curve(data, system, dataset, "mean_batch_size")
        rate, bound = sustainable_rate(r, latency, limit)
        result[system] = dict(rate=rate, bound=bound, batch=float(batch[-1]), limit=limit)
    for s in result.values():
        s["ratio"] = result["paged-jax"]["rate"] / s["rate"]
        s["batch_ratio"] = result["paged-jax"]["batch"] / s["batch"]
    return result


def describe_setup(data: dict) -> str:
    """The run's mode and scale, for the tables."""
    setup, config = data["setup"], data["config"]
    if data["mode"].startswith("real execution"):
        scale = (f"model `{setup['model'].rsplit('/', 1)[-1]}`, context {setup['max_model_len']}, block size "
                 f"{setup['block_size']}, a KV cache of {Setup(**setup).num_blocks * setup['block_size']} token "
                 f"slots (the paper's 15.7K scaled by {setup['max_model_len']}/2048)")
    else:
        scale = (f"the paper's scale: context {setup['max_model_len']}, block size {setup['block_size']}, "
                 f"{setup['kv_slots']} KV token slots")
    return (f"**{data['mode']}** on {data['machine']}; {scale}; {config['requests']} requests per trace, "
            "Poisson arrivals.")


def table(data: dict) -> str:
    parts = [describe_setup(data) + f" Sustainable rate: normalized latency within {LIMIT:g}x ours at the "
             "lowest rate; a '>' rate never crossed that limit, a '<' rate was above it from the start (the "
             "ratios are then bounds).\n"]
    cost = data["cost_model"]
    if "relative_error" in cost:  # real execution
        parts.append(f"Step-time model: {describe_clock(cost)}. Every run is timed on that model's clock: the "
                     "engine admits, schedules, preempts and computes every step as it would serve, and the model "
                     "says what each step cost, so the shared machine's load does not move the results.\n")
    else:
        parts.append(f"Step-time model ({cost['source']}): {cost['fixed'] * 1e3:.2f} ms + "
                     f"{cost['per_token'] * 1e6:.1f} us/token + {cost['per_context_token'] * 1e9:.0f} ns per "
                     "cached token.\n")
    parts += [f"- {t}" for t in data["traces"]]
    for dataset in data["config"]["datasets"]:
        rows = []
        for run in sorted((r for r in data["runs"] if r["dataset"] == dataset), key=lambda r: (r["system"], r["rate"])):
            rows.append([run["system"], f"{run['rate']:g}", f"{run['normalized_latency'] * 1e3:.1f}",
                         f"{run['mean_batch_size']:.1f}", f"{run['throughput']:.2f}", run["num_preemptions"]])
        parts.append(f"\n## {dataset}: latency and batch size per rate (Fig. 12, 13)\n")
        parts.append(markdown_table(["system", "rate (req/s)", "normalized latency (ms/token)", "mean batch",
                                     "throughput (req/s)", "preemptions"], rows))
        top = summary(data, dataset)
        rows = [[system, f"{s['bound']}{s['rate']:.2f}", f"{s['ratio']:.2f}x", PAPER_RATIOS.get(system, "-"),
                 f"{s['batch']:.1f}", f"{s['batch_ratio']:.2f}x", PAPER_BATCH_RATIOS.get(system, "-")]
                for system, s in top.items()]
        parts.append(f"\n## {dataset}: sustainable rates\n")
        parts.append(markdown_table(["system", "sustainable rate (req/s)", "ours / it", "paper",
                                     "mean batch at top rate",
                                     "ours / it", "paper (Fig. 13a)"], rows))
    return "\n".join(parts)


# How each system is drawn: ours filled and on top, the others hollow, bigger the earlier they
# fall behind, so that curves which coincide (every system below its knee) stay visible.
STYLES = {
    "paged-jax": dict(marker="o", linestyle="-", markersize=5, zorder=5),
    "orca-oracle": dict(marker="s", linestyle="--", markersize=7, fillstyle="none", zorder=4),
    "orca-pow2": dict(marker="^", linestyle="-.", markersize=9, fillstyle="none", zorder=3),
    "orca-max": dict(marker="v", linestyle=":", markersize=11, fillstyle="none", zorder=2),
    "static": dict(marker="D", linestyle=(0, (1, 3)), markersize=8, fillstyle="none", zorder=1),
}
# Fig. 12a (OPT-13B, ShareGPT), read off the plot: where each system's latency blows up.
PAPER_KNEES = {"paged-jax": 1.95, "orca-oracle": 1.1, "orca-pow2": 0.75, "orca-max": 0.5, "static": 0.25}


def plot(data: dict):
    """Fig. 12 as the paper draws it (linear axes, latency cut off above the knees) with our
    sustainable limit dashed and, at the paper's scale, the paper's knees marked on the rate
    axis; Fig. 13's mean batch beside it, with the batch the paper's ratios give the Orca
    variants at the top rate."""
    datasets = data["config"]["datasets"]
    paper_scale = not data["mode"].startswith("real execution")
    fig, axes = new_figure(ncols=2 * len(datasets), width=4.6)
    for k, dataset in enumerate(datasets):
        latency_ax, batch_ax = axes[2 * k], axes[2 * k + 1]
        top = summary(data, dataset)
        for system in data["config"]["systems"]:
            i = list(STYLES).index(system)  # a system's colour, whichever systems ran
            rates, latency = curve(data, system, dataset)
            _, batch = curve(data, system, dataset, "mean_batch_size")
            latency_ax.plot(rates, latency, color=f"C{i}", label=system, **STYLES[system])
            batch_ax.plot(rates, batch, color=f"C{i}", label=system, **STYLES[system])
            if paper_scale and dataset == "sharegpt":
                latency_ax.plot(PAPER_KNEES[system], 0, marker="|", markersize=14, color=f"C{i}", clip_on=False)
            if system in PAPER_BATCH_RATIOS and dataset == "sharegpt":  # Fig. 13a's ratios
                batch_ax.plot(rates[-1], top["paged-jax"]["batch"] / float(PAPER_BATCH_RATIOS[system][:-1]), "*",
                              markersize=11, color=f"C{i}", label=f"paper: ours / {PAPER_BATCH_RATIOS[system]}")
        limit = top["paged-jax"]["limit"]
        latency_ax.axhline(limit, color="grey", linewidth=0.8, linestyle="--", label=f"limit: {LIMIT:g}x ours unloaded")
        latency_ax.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)", ylim=(0, 3 * limit),
                       xlim=(0, None), title=f"{dataset}: Fig. 12" + (" (| paper's knees)" if paper_scale and
                                                                      dataset == "sharegpt" else ""))
        batch_ax.set(xlabel="request rate (req/s)", ylabel="mean batched requests", xlim=(0, None), ylim=(0, None),
                     title=f"{dataset}: Fig. 13")
        for ax in (latency_ax, batch_ax):
            ax.grid(alpha=0.3)
        latency_ax.legend(fontsize=7)
        batch_ax.legend(fontsize=7)
    fig.suptitle(f"Serving latency and batch size ({data['mode']}; {data['machine']})", fontsize=9)
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    s = summary(data, data["config"]["datasets"][0])
    ratios = " / ".join(f"{s[k]['ratio']:.1f}x" for k in ("orca-oracle", "orca-max", "static") if k in s)
    batches = " / ".join(f"{s[k]['batch_ratio']:.1f}x" for k in ("orca-oracle", "orca-max") if k in s)
    return [["Fig. 12", "sustainable rate, ours / Orca Oracle / Max / static (ShareGPT)",
             "1.7-2.7x / 2.7-8x / up to 22x", ratios],
            ["Fig. 13", "mean batched requests, ours / Orca Oracle / Max", "2.2x / 4.3x", batches]]


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv, flags={"simulate": "the paper's scale, in the simulator"})


if __name__ == "__main__":
    main()
