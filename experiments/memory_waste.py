"""Fig. 2: where the KV cache goes — token states, slots reserved for tokens still to come,
internal fragmentation (reserved, never used) and external fragmentation with the free space
requests could not use — for Orca (Max / Pow2 / Oracle) and our paged engine.

The shares come from a serving run at a rate that keeps requests waiting (request_rate.py's
machinery), averaged over the steps after which a request waited: then every slot not holding
a token is waste. The paper (OPT-13B, ShareGPT) finds 20.4 / 26.8 / 38.2 / 96.3 % of the
cache holding token states.

With --simulate, the run is the paper's scale in the simulator (experiments/simulator.py):
the memory managers and scheduler are the real ones, step times are modelled.

Run `python -m experiments.memory_waste [--size tiny|quick|full] [--simulate]`.
"""

from __future__ import annotations

import sys

import numpy as np

from experiments import request_rate
from experiments.common import figure_main, markdown_table, new_figure

SYSTEMS = ("orca-max", "orca-pow2", "orca-oracle", "paged-jax")
PAPER = {  # token states, reserved, internal, external & other (%)
    "orca-max": (20.4, 13.3, 57.3, 8.9),
    "orca-pow2": (26.8, 17.9, 13.6, 41.6),
    "orca-oracle": (38.2, 25.2, 0.0, 36.6),
    "paged-jax": (96.3, None, None, None),
}
KINDS = ("token_states", "reserved", "internal", "external_and_free")
LABELS = ("token states", "reserved", "internal frag.", "external frag. & free")

NAME = "memory_waste"
TITLE = "KV cache usage (Fig. 2)"
DEFAULT_SIZE = "quick"  # the reference run: its results file carries no size suffix
SIZES = {
    "tiny": dict(datasets=("sharegpt",), systems=SYSTEMS, rates=(32.0,), requests=8, warm_up=False),
    "quick": dict(datasets=("sharegpt",), systems=SYSTEMS, rates=(32.0,), requests=60, warm_up=True),
    "full": dict(datasets=("sharegpt",), systems=SYSTEMS, rates=(32.0,), requests=200, warm_up=True),
}
# At the paper's scale, in the simulator: 3 req/s keeps every system's queue non-empty.
SIMULATED_SIZES = {size: dict(datasets=("sharegpt",), systems=SYSTEMS, rates={"sharegpt": (3.0,)}, requests=n)
                   for size, n in (("tiny", 60), ("quick", 300), ("full", 1000))}


def measure(size: str = DEFAULT_SIZE, simulate: bool = False) -> dict:
    if simulate:
        return request_rate.simulate_paper_scale(SIMULATED_SIZES[size])
    return request_rate.measure(SIZES[size])


def breakdown(data: dict) -> dict[str, dict[str, float]]:
    """Per system, the shares at the highest rate served (ShareGPT): from this module's runs
    or from a request-rate sweep."""
    top = max(r["rate"] for r in data["runs"])
    return {r["system"]: r["memory"] for r in data["runs"]
            if r["rate"] == top and r["dataset"] == "sharegpt" and r["system"] in SYSTEMS}


def table(data: dict) -> str:
    shares = breakdown(data)
    rows = [[system, *(f"{100 * shares[system][k]:.1f}" for k in KINDS),
             " / ".join("-" if p is None else f"{p:g}" for p in PAPER[system])]
            for system in SYSTEMS if system in shares]
    top = max(r["rate"] for r in data["runs"])
    return (f"{request_rate.describe_setup(data)} ShareGPT-like trace at {top:g} req/s; % of the KV cache, "
            "averaged over the steps after which a request waited.\n\n"
            + markdown_table(["system", *LABELS, "paper (same order)"], rows))


def plot(data: dict):
    """Ours and the paper's breakdown side by side for each system (the paper's hatched; for
    our paged engine it gives only the token states), the legend outside the bars."""
    shares = breakdown(data)
    systems = [s for s in SYSTEMS if s in shares]
    fig, (ax,) = new_figure(width=6.4)
    x = np.arange(len(systems))
    ours_bottom, paper_bottom = np.zeros(len(systems)), np.zeros(len(systems))
    for i, (kind, label) in enumerate(zip(KINDS, LABELS)):
        ours = np.array([100 * shares[s][kind] for s in systems])
        paper = np.array([PAPER[s][i] or 0.0 for s in systems])
        ax.bar(x - 0.2, ours, 0.38, bottom=ours_bottom, color=f"C{i}", label=label)
        ax.bar(x + 0.2, paper, 0.38, bottom=paper_bottom, color=f"C{i}", alpha=0.45, hatch="//", edgecolor="white")
        ours_bottom, paper_bottom = ours_bottom + ours, paper_bottom + paper
    ax.set_xticks(x, [f"{s}\nours | paper" for s in systems], fontsize=8)
    ax.set(ylabel="% of KV cache", ylim=(0, 100))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="solid: ours\nhatched: paper",
              title_fontsize=7)
    fig.suptitle(f"KV cache usage (Fig. 2); {data['mode']}", fontsize=9)
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    shares = breakdown(data)
    ours = " / ".join(f"{100 * shares[s]['token_states']:.1f}" for s in SYSTEMS if s in shares)
    return [["Fig. 2", "KV cache holding token states: Orca Max / Pow2 / Oracle / ours (%)",
             "20.4 / 26.8 / 38.2 / 96.3", ours]]


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv, flags={"simulate": "the paper's scale, in the simulator"})


if __name__ == "__main__":
    main()
