"""Fig. 14 and Fig. 17: latency against request rate when each request decodes several
sequences, and for a chatbot.

Fig. 14 serves the Alpaca trace with parallel sampling (n = 2, 4, 6) and beam search (width
2, 4, 6); more sequences per request make sharing matter more. Fig. 17 serves a chatbot
(experiments/workloads.py chatbot_requests): prompts of the last 1024 tokens of a
conversation, outputs up to 1024, where Orca's buddy allocator rounds every long request up to
the whole context. Systems: our paged engine, the same engine with block sharing off
(`enable_block_sharing=False`: a fork copies its parent's blocks) and Orca Oracle / Pow2 / Max
(a chunk per sequence, a fork copies).

A system's sustainable rate is the rate at which its latency blows up: its throughput when
requests queue. Read off a latency curve (Fig. 12's way) it needs traces long enough for a
queue to build at the knee, thousands of requests at Alpaca's lengths; so we measure it
directly: every request of the trace arrives at once and the capacity is the throughput
between the 10th and the 90th percentile finish (serving.steady_throughput), which skips the
ramp-up and the drain. The latency curves are drawn at fractions of our capacity (full size).

The paper (OPT-13B on an A100, Alpaca): our gain over Orca (Oracle) grows from 1.3x for basic
sampling (one sequence, taken here as n = 1) to 2.3x at beam width 6; sharing brings up to
2.2x (vLLM's own claim); the chatbot sustains 2x the rate of every Orca variant.

Two ways, labelled:
- simulation at the paper's scale (experiments/simulator.py): our engine on the cost-model
  executor (its scheduler, memory managers, search rule and block operations), modelled step
  times of OPT-13B on an A100; the beams'
  scores are made up (the simulator's BEAM_SPREAD), so it also reports what sharing saved, to
  set beside the paper's Fig. 15;
- real execution at the paper's memory scale with the model this machine runs (the embedded
  model, 256-token context; real_setup), on request_rate's modelled clock (a step-time model fitted to this
  machine's own steps), so that ratios repeat on a shared CPU. That clock leaves out the
  block copies of the baselines' forks, so their real-execution capacities are upper bounds.

Run `python -m experiments.decoding_rate [--size tiny|quick|full] [--simulate]`; results go
to experiments/results/decoding_rate[_simulated]_<device>[_<size>].{md,json,png}.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
from tqdm import tqdm

from experiments.common import device_kind, figure_main, markdown_table, new_figure
from experiments.request_rate import clock_model, clock_record, describe_clock
from experiments.serving import PAPER_KV_SLOTS, EngineServer, Setup, default_setup, make_engine, serve
from experiments.simulator import A100_OPT13B, BEAM_SPREAD, Scale, simulated_server
from experiments.workloads import ALPACA, Decoding, Request, chatbot_requests, sample_requests

NAME = "decoding_rate"
TITLE = "Parallel sampling, beam search and a chatbot: capacity and latency vs request rate (Fig. 14, 17)"
DEFAULT_SIZE = "quick"  # the reference run: its results file carries no size suffix

ORCA = ("orca-oracle", "orca-pow2", "orca-max")
SHARING = ("paged-jax", "paged-jax-unshared")
# case -> (trace, decoding); a case whose requests fork also runs with sharing off
CASES = {
    "n=1": ("alpaca", Decoding(n=1)),
    "n=2": ("alpaca", Decoding(n=2)),
    "n=4": ("alpaca", Decoding(n=4)),
    "n=6": ("alpaca", Decoding(n=6)),
    "beam=2": ("alpaca", Decoding(beam_width=2)),
    "beam=4": ("alpaca", Decoding(beam_width=4)),
    "beam=6": ("alpaca", Decoding(beam_width=6)),
    "chatbot": ("chatbot", Decoding()),
}
# The paper's numbers: sustainable rate, ours / Orca (Oracle), or every Orca for the chatbot
PAPER_GAIN = {"n=1": "1.3x vs Oracle", "beam=6": "2.3x vs Oracle", "chatbot": "2x vs every Orca"}
PAPER_SHARING = "up to 2.2x (vLLM)"
PAPER_SAVING = {"n=2": 6.09, "n=4": 8.53, "n=6": 9.79, "beam=2": 37.6, "beam=6": 55.2}  # Fig. 15, Alpaca, %

# cases; Orca variants; requests per trace; latency curves at these fractions of our capacity
SIZES = {
    "tiny": dict(cases=("beam=2",), orca=("orca-oracle",), requests=8, curve=()),
    "quick": dict(cases=("beam=4",), orca=("orca-oracle",), requests=200, curve=()),
    "full": dict(cases=("n=1", "n=4", "beam=2", "beam=4", "beam=6", "chatbot"), orca=ORCA, requests=200,
                 curve=(0.5, 0.9, 1.1)),
}
SIMULATED_SIZES = {
    "tiny": dict(cases=("beam=2", "chatbot"), orca=("orca-oracle",), requests=30, curve=(0.5, 1.0)),
    "quick": dict(cases=("n=1", "beam=6", "chatbot"), orca=ORCA, requests=300, curve=()),
    "full": dict(cases=tuple(CASES), orca=ORCA, requests=600, curve=(0.5, 0.75, 0.9, 1.0, 1.1)),
}


def trace(case: str, num_requests: int, rate: float, max_model_len: int) -> list[Request]:
    """The case's requests at a rate (inf: all at once), the same lengths at every rate.
    Alpaca keeps its own lengths, dropping the few longer than the context (a 256-token
    context holds 99%); the chatbot's prompts are the last half-context."""
    name, decoding = CASES[case]
    if name == "chatbot":
        requests = chatbot_requests(num_requests, max_model_len=max_model_len, seed=1, rate=rate)
    else:
        drawn = sample_requests(ALPACA, 2 * num_requests, seed=1, rate=rate)
        requests = [r for r in drawn if r.prompt_len + r.output_len <= max_model_len][:num_requests]
    return [dataclasses.replace(r, decoding=decoding) for r in requests]


def real_setup() -> tuple[Setup, int]:
    """The paper's memory setting (its KV slots, block size 16, 256 sequences) around the model
    this machine runs, and the cache's blocks: with Alpaca's own lengths, memory binds as it did
    on the A100. On a GPU, default_setup is that setting already."""
    setup = dataclasses.replace(default_setup(), block_size=16, max_num_seqs=256)
    return setup, PAPER_KV_SLOTS // setup.block_size


def systems(case: str, orca: tuple[str, ...]) -> tuple[str, ...]:
    decoding = CASES[case][1]
    return (SHARING if decoding.n > 1 or decoding.beam_width else SHARING[:1]) + tuple(orca)


def measure(size: str = DEFAULT_SIZE, simulate: bool = False) -> dict:
    """Every case's capacity per system (all requests at once), then its latency curves."""
    config = (SIMULATED_SIZES if simulate else SIZES)[size]
    extra, engines = {}, {}
    if simulate:
        max_model_len = Scale().max_model_len
    else:
        setup, num_blocks = real_setup()
        max_model_len = setup.max_model_len
        extra["num_blocks"] = num_blocks
        engines["paged-jax"] = make_engine("paged-jax", setup, warm_up=size != "tiny",
                                           num_gpu_blocks_override=num_blocks)
        case = config["cases"][0]  # a fit needs small batches (a light trace) and large (all at once)
        cost = clock_model(engines["paged-jax"], trace(case, max(4, config["requests"] // 10), 1.0, max_model_len),
                           trace(case, config["requests"], float("inf"), max_model_len))

    def serve_at(system: str, case: str, rate: float) -> dict:
        requests = trace(case, config["requests"], rate, max_model_len)
        if simulate:
            server = simulated_server(system, requests, Scale(), A100_OPT13B)
            return dict(dataclasses.asdict(serve(server, requests)), saving=server.sharing_saving())
        if system not in engines:
            engines[system] = make_engine(system, setup, warm_up=size != "tiny", num_gpu_blocks_override=num_blocks)
        server = EngineServer(engines[system], requests, clock=cost.step_seconds)
        return dataclasses.asdict(serve(server, requests))

    jobs = [(case, system) for case in config["cases"] for system in systems(case, config["orca"])]
    capacity, runs = {}, []
    for case, system in tqdm(jobs, desc=f"{NAME}: capacity"):
        run = serve_at(system, case, float("inf"))
        capacity[case, system] = run["steady_throughput"]
        runs.append(dict(case=case, system=system, rate=None, **run))
    curves = [(case, system, f) for case, system in jobs for f in config["curve"]]
    for case, system, fraction in tqdm(curves, desc=f"{NAME}: latency curves", disable=not curves):
        rate = fraction * capacity[case, "paged-jax"]
        runs.append(dict(case=case, system=system, rate=rate, **serve_at(system, case, rate)))
    if not simulate:
        extra["cost_model"] = clock_record(cost, engines["paged-jax"])
    mode = "simulation: " + A100_OPT13B.source if simulate else "real execution, modelled clock"
    return dict(machine=device_kind(), mode=mode, size=size, config=config,
                setup=dataclasses.asdict(Scale() if simulate else setup),
                beam_spread=BEAM_SPREAD if simulate else None, runs=runs, **extra)


# -- reading the runs ---------------------------------------------------------------------------

def _order(system: str) -> int:
    return (SHARING + ORCA).index(system)


def saturated(data: dict, case: str) -> dict[str, dict]:
    """Each system's run of the case with every request queued from the start."""
    return {r["system"]: r for r in data["runs"] if r["case"] == case and r["rate"] is None}


def gain(data: dict, case: str, system: str, key: str = "steady_throughput") -> float:
    runs = saturated(data, case)
    return runs["paged-jax"][key] / runs[system][key]


def curve(data: dict, system: str, case: str, key: str = "normalized_latency") -> tuple[np.ndarray, np.ndarray]:
    runs = sorted((r for r in data["runs"] if (r["system"], r["case"]) == (system, case) and r["rate"] is not None),
                  key=lambda r: r["rate"])
    return np.array([r["rate"] for r in runs]), np.array([r[key] for r in runs])


def _paper(case: str, system: str) -> str:
    if system == "paged-jax-unshared":
        return PAPER_SHARING
    if system == "orca-oracle" or case == "chatbot":
        return PAPER_GAIN.get(case, "-").split(" vs")[0]
    return "-"


def table(data: dict) -> str:
    config, setup = data["config"], data["setup"]
    if data["mode"].startswith("simulation"):
        scale = (f"the paper's scale: context {setup['max_model_len']}, {setup['kv_slots']} KV token slots, block "
                 f"size {setup['block_size']}; beam scores made up with spread {data['beam_spread']:g} "
                 "(experiments/simulator.py)")
    else:
        scale = (f"model `{setup['model'].rsplit('/', 1)[-1]}`, context {setup['max_model_len']}, the paper's "
                 f"memory: {data['num_blocks'] * setup['block_size']} KV token slots in blocks of "
                 f"{setup['block_size']}, "
                 f"{setup['max_num_seqs']} sequences, Alpaca's own lengths; step-time model "
                 f"{describe_clock(data['cost_model'])}")
    parts = [f"**{data['mode']}** on {data['machine']}; {scale}. Capacity: {config['requests']} requests all queued "
             "at once, requests finished per second between the 10th and the 90th percentile finish (the rate "
             "at which latency blows up). Mean batch: requests running per step in that run.\n"]
    rows = []
    for case in config["cases"]:
        runs = saturated(data, case)
        for system in systems(case, config["orca"]):
            run, ours = runs[system], system == "paged-jax"
            saving = f"{100 * run['saving']:.1f}" if ours and "saving" in run else ""
            batch_gain = "-" if ours else f"{gain(data, case, system, 'mean_batch_size'):.2f}x"
            rows.append([case, system, f"{run['steady_throughput']:.2f}",
                         "-" if ours else f"**{gain(data, case, system):.2f}x**", "-" if ours else _paper(case, system),
                         f"{run['mean_batch_size']:.1f}", batch_gain,
                         run["num_preemptions"], saving,
                         f"{PAPER_SAVING[case]:g}" if ours and case in PAPER_SAVING and saving else ""])
    parts.append(markdown_table(["case", "system", "capacity (req/s)", "ours / it", "paper", "mean batch",
                                 "ours / it", "preemptions", "sharing saved % (ours)", "paper % (Fig. 15)"], rows))
    curves = [r for r in data["runs"] if r["rate"] is not None]
    if curves:
        curves.sort(key=lambda r: (list(config["cases"]).index(r["case"]), _order(r["system"]), r["rate"]))
        parts.append("\n## Latency against request rate\n")
        parts.append(markdown_table(["case", "system", "rate (req/s)", "normalized latency (ms/token)", "mean batch",
                                     "preemptions"],
                                    [[r["case"], r["system"], f"{r['rate']:.3g}",
                                      f"{r['normalized_latency'] * 1e3:.1f}", f"{r['mean_batch_size']:.1f}",
                                      r["num_preemptions"]] for r in curves]))
    return "\n".join(parts)


STYLE = {"paged-jax": ("C0", "o", "-"), "paged-jax-unshared": ("C0", "s", "--"), "orca-oracle": ("C1", "^", "-"),
         "orca-pow2": ("C2", "v", "-."), "orca-max": ("C3", "D", ":")}
LABELS = {"paged-jax": "paged-jax", "paged-jax-unshared": "paged-jax, sharing off", "orca-oracle": "Orca (Oracle)",
          "orca-pow2": "Orca (Pow2)", "orca-max": "Orca (Max)"}


def _title(case: str) -> str:
    name, decoding = CASES[case]
    return "chatbot (Fig. 17)" if name == "chatbot" else f"Alpaca, {decoding.name} (Fig. 14)"


CLIP = 8  # latency axes end at 8x ours at the lowest rate


def plot(data: dict):
    """One panel per case: normalized latency against request rate (linear axes, as the
    paper draws them) when the size draws curves, each system's capacity a dotted line in its
    colour; otherwise the capacities as bars, the paper's gain in the title."""
    cases = data["config"]["cases"]
    ncols = min(4, len(cases))
    nrows = -(-len(cases) // ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.8, height=3.4 * nrows)
    for ax in axes[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes, cases):
        names = systems(case, data["config"]["orca"])
        runs = saturated(data, case)
        if any(r["rate"] is not None for r in data["runs"]):
            for system in names:
                colour, marker, line = STYLE[system]
                ax.plot(*curve(data, system, case), color=colour, marker=marker, linestyle=line,
                        markerfacecolor="none", label=LABELS[system])
                ax.axvline(runs[system]["steady_throughput"], color=colour, linestyle=":", linewidth=1)
            ax.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)")
            ax.set_xlim(left=0)
            ax.set_ylim(0, CLIP * curve(data, "paged-jax", case)[1][0])  # blown-up curves leave the top
            ax.legend(fontsize=7)
        else:
            capacities = [runs[s]["steady_throughput"] for s in names]
            bars = ax.bar(range(len(names)), capacities, color=[STYLE[s][0] for s in names], edgecolor="black",
                          linewidth=0.5, hatch=["//" if s == "paged-jax-unshared" else "" for s in names])
            for bar, system in zip(bars, names):
                if system != "paged-jax":
                    top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
                    ax.annotate(f"{gain(data, case, system):.2f}x", top, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(names)), [LABELS[s] for s in names], rotation=30, ha="right", fontsize=7)
            ax.set(ylabel="capacity (req/s)")
            ax.margins(y=0.15)
        paper = PAPER_GAIN.get(case)
        ax.set_title(_title(case) + (f"\npaper: {paper}" if paper else ""), fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{data['mode']} ({data['machine']})", fontsize=8)
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    rows = []
    for case in data["config"]["cases"]:
        orca = data["config"]["orca"]
        label = "Fig. 17" if case == "chatbot" else "Fig. 14"
        rows.append([label, f"{case}: capacity, ours / " + " / ".join(LABELS[o] for o in orca),
                     PAPER_GAIN.get(case, "-"), " / ".join(f"{gain(data, case, o):.2f}x" for o in orca)])
        if "paged-jax-unshared" in systems(case, orca):
            rows.append([label, f"{case}: capacity, sharing on / off", PAPER_SHARING,
                         f"{gain(data, case, 'paged-jax-unshared'):.2f}x"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv, flags={"simulate": "the paper's scale, in the simulator"})


if __name__ == "__main__":
    main()
