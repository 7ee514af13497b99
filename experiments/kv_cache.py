"""The paged KV cache at work (§4 of the paper, Fig. 6-8 and §4.5), step by step.

A small cache of 4-slot blocks serves a few requests arriving over the first steps, one of
them sampling n=2 completions, with enough load that the cache runs out and the latest
request is preempted: by swap (its blocks move to host memory and come back) and, in a second
run of the same load, by recompute (its blocks are freed and its tokens computed again).
After every engine step (one token per sequence: no multi-step decode loop) the engine's
kv_snapshot() is recorded. The plot shows which request owns each physical block at each
step, the blocks two sequences share (reference count > 1), the copy-on-write copies (a
sequence's logical block moving to a new physical block while it stays on the device) and
the steps a preempted request spends swapped out or waiting; plot_tables draws the
sequences' block tables (logical -> physical, slots filled) at a few telling steps.

Nothing is timed: the snapshots depend only on the model, the load and the seeds, so they are
the same on any machine. The model is the embedded one (models/stdlib-llama), whose tokenizer
turns the prompts into tokens.

Run `python -m experiments.kv_cache [--size tiny|quick|full]`; results go to
experiments/results/kv_cache_<device>.{md,json,png}.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from experiments.common import figure_main, markdown_table, new_figure
from paged_jax.core.kv_snapshot import KVSnapshot
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "stdlib-llama"
BLOCK_SIZE = 4
NAME = "kv_cache"
TITLE = "The paged KV cache, step by step (§4, Fig. 6-8)"
DEFAULT_SIZE = "quick"
# requests: (prompt, n, max_tokens, the step before which it arrives), in arrival order.
LOAD = [("def __init__(self, name):", 1, 16, 0), ("import os\nimport sys\n", 2, 14, 0),
        ("class Parser(object):", 1, 16, 2), ("for line in lines:", 1, 14, 4)]
SIZES = {
    "tiny": dict(num_blocks=16, modes=("swap",), requests=LOAD[:3]),
    "quick": dict(num_blocks=20, modes=("swap", "recompute"), requests=LOAD),
    "full": dict(num_blocks=28, modes=("swap", "recompute"),
                 requests=LOAD + [("with open(path) as f:", 2, 16, 6), ("return self._cache", 1, 20, 8)]),
}
MODES = {"swap": "preemption by swap", "recompute": "preemption by recompute"}
FREE = "#f0f0f0"


def measure(size: str = "quick") -> dict:
    sizes = SIZES[size]
    requests = [dict(id="ABCDEFGH"[i], prompt=prompt, n=n, max_tokens=max_tokens, arrival=arrival)
                for i, (prompt, n, max_tokens, arrival) in enumerate(sizes["requests"])]
    runs = {mode: _watch(mode, sizes["num_blocks"], requests) for mode in sizes["modes"]}
    return dict(block_size=BLOCK_SIZE, num_blocks=sizes["num_blocks"], requests=requests, runs=runs)


def _watch(mode: str, num_blocks: int, requests: list[dict]) -> list[dict]:
    """Serve the requests, one engine step at a time; the cache after each step."""
    engine = LLMEngine(EngineArgs(
        model=str(MODEL), dtype="float32", block_size=BLOCK_SIZE, num_gpu_blocks_override=num_blocks,
        max_num_seqs=8, max_num_batched_tokens=64, num_scheduler_steps=1, preemption_mode=mode,
        swap_space=0.01, warm_up=False))
    steps, step = [], 0
    while step <= requests[-1]["arrival"] or engine.has_unfinished_requests():
        for r in requests:
            if r["arrival"] == step:
                engine.add_request(r["id"], r["prompt"], SamplingParams(
                    n=r["n"], temperature=0.8, seed=ord(r["id"]), max_tokens=r["max_tokens"], ignore_eos=True))
        engine.step()
        steps.append(_record(engine.kv_snapshot()))
        step += 1
    return steps


def _record(snapshot: KVSnapshot) -> dict:
    """What the figures need of a snapshot, as JSON: the owners follow from the tables."""
    return dict(refs=list(snapshot.refs), host_blocks=len(snapshot.host_refs),
                sequences=[dataclasses.asdict(s) for s in snapshot.sequences])


# -- what the snapshots show --------------------------------------------------------------------

def owner_grid(data: dict, run: list[dict]) -> np.ndarray:
    """int[num_blocks, steps]: the request (its position in data["requests"]) whose running
    sequences hold each device block after each step; -1 when free."""
    position = {r["id"]: i for i, r in enumerate(data["requests"])}
    grid = np.full((data["num_blocks"], len(run)), -1)
    for t, snapshot in enumerate(run):
        for seq in snapshot["sequences"]:
            if seq["status"] == "running":
                grid[seq["block_table"], t] = position[seq["request_id"]]
    return grid


def copy_on_write(run: list[dict]) -> list[dict]:
    """Copy-on-write copies: a sequence running in two consecutive steps whose logical block
    moved from a shared physical block to another one."""
    events, before = [], {}
    for t, snapshot in enumerate(run):
        now = {(s["request_id"], s["index"]): s for s in snapshot["sequences"] if s["status"] == "running"}
        for key, seq in now.items():
            old = before.get(key)
            for logical, (a, b) in enumerate(zip(old["block_table"] if old else [], seq["block_table"])):
                if a != b and run[t - 1]["refs"][a] > 1:
                    events.append(dict(step=t, request_id=key[0], index=key[1], logical=logical, source=a, target=b))
        before = now
    return events


def statuses(data: dict, run: list[dict]) -> dict[str, list[str | None]]:
    """Per request, its status after each step (None: not arrived yet, or finished)."""
    out = {r["id"]: [None] * len(run) for r in data["requests"]}
    for t, snapshot in enumerate(run):
        for seq in snapshot["sequences"]:
            out[seq["request_id"]][t] = seq["status"]
    return out


def preemptions(data: dict, run: list[dict]) -> list[tuple[int, str]]:
    """(step, request) for every request that was running and is not any more, unfinished."""
    events = []
    for request_id, status in statuses(data, run).items():
        events += [(t, request_id) for t in range(1, len(run))
                   if status[t - 1] == "running" and status[t] in ("swapped", "waiting")]
    return sorted(events)


def fill(snapshot: dict) -> tuple[int, int]:
    """(device blocks in use by sequences, slots of them holding computed K/V): a shared block
    counts once."""
    filled = {}
    for seq in snapshot["sequences"]:
        if seq["status"] == "running":
            for block, slots in zip(seq["block_table"], seq["filled"]):
                filled[block] = max(filled.get(block, 0), slots)
    return len(filled), sum(filled.values())


def summary(data: dict, mode: str) -> dict:
    run = data["runs"][mode]
    used = [fill(s) for s in run]
    busy = [(blocks, slots) for blocks, slots in used if blocks]
    return dict(
        steps=len(run),
        preemptions=len(preemptions(data, run)),
        peak_blocks=max(blocks for blocks, _ in used),
        filled=sum(slots for _, slots in busy) / (data["block_size"] * sum(blocks for blocks, _ in busy)),
        peak_shared=max(sum(r > 1 for r in s["refs"]) for s in run),
        copies=len(copy_on_write(run)),
        swapped_steps=sum(any(q["status"] == "swapped" for q in s["sequences"]) for s in run),
        peak_host_blocks=max(s["host_blocks"] for s in run),
        free_at_end=sum(r == 0 for r in run[-1]["refs"]),
    )


# -- the figure module's contract ---------------------------------------------------------------

def table(data: dict) -> str:
    requests = markdown_table(
        ["request", "prompt", "n", "max tokens", "arrives before step"],
        [[r["id"], repr(r["prompt"]), r["n"], r["max_tokens"], r["arrival"] + 1] for r in data["requests"]])
    rows = []
    for mode in data["runs"]:
        s = summary(data, mode)
        rows.append([MODES[mode], s["steps"], s["preemptions"], f"{s['peak_blocks']} / {data['num_blocks']}",
                     f"{s['filled']:.0%}", s["peak_shared"], s["copies"], s["swapped_steps"], s["peak_host_blocks"],
                     f"{s['free_at_end']} / {data['num_blocks']}"])
    runs = markdown_table(["run", "steps", "preemptions", "peak blocks in use", "slots filled in blocks in use",
                           "peak shared blocks", "copy-on-write copies", "steps with a request swapped out",
                           "peak host blocks", "free blocks at the end"], rows)
    return (f"{data['num_blocks']} device blocks of {data['block_size']} slots, the embedded model, "
            f"sampling at temperature 0.8 (seeded).\n\n{requests}\n\n{runs}")


def _colours(data: dict) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(len(data["requests"]))]


def _label(request: dict) -> str:
    return request["id"] + (f" (n={request['n']})" if request["n"] > 1 else "")


def plot(data: dict):
    """Per run: physical blocks over steps (colour: the owning request; hatched: shared;
    x: a copy-on-write copy's new block), and below it each request's status."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    modes = list(data["runs"])
    fig, axes = new_figure(ncols=len(modes), width=6.5, height=7.5, nrows=2, height_ratios=[4, 1])
    colours = _colours(data)
    for column, mode in enumerate(modes):
        run, blocks_ax, status_ax = data["runs"][mode], axes[column], axes[len(modes) + column]
        grid = owner_grid(data, run)
        image = np.array([colours[o] if o >= 0 else _rgba(FREE) for o in grid.flat]).reshape(*grid.shape, 4)
        steps = len(run)
        blocks_ax.imshow(image, aspect="auto", origin="lower", interpolation="nearest",
                         extent=(0.5, steps + 0.5, -0.5, data["num_blocks"] - 0.5))
        for t, snapshot in enumerate(run):
            for block, refs in enumerate(snapshot["refs"]):
                if refs > 1:
                    blocks_ax.add_patch(Rectangle((t + 0.5, block - 0.5), 1, 1, fill=False, hatch="////",
                                                  edgecolor="black", linewidth=0))
        cows = copy_on_write(run)
        blocks_ax.plot([e["step"] + 1 for e in cows], [e["target"] for e in cows], "x", color="black",
                       markersize=7, markeredgewidth=2)
        blocks_ax.set(title=MODES[mode], ylabel="physical block", xlim=(0.5, steps + 0.5))
        blocks_ax.tick_params(labelbottom=False)
        for ax in (blocks_ax, status_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        blocks_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _draw_statuses(status_ax, data, run, colours)
        status_ax.set(xlabel="engine step", xlim=(0.5, steps + 0.5))
    handles = [Patch(color=c, label=_label(r)) for c, r in zip(colours, data["requests"])]
    handles += [Patch(facecolor=FREE, label="free block"),
                Patch(facecolor="white", edgecolor="black", hatch="////", label="shared (ref > 1)"),
                Line2D([], [], marker="x", color="black", linestyle="", markeredgewidth=2,
                       label="copy-on-write (new block)"),
                Patch(facecolor="white", edgecolor="grey", hatch="..", label="swapped out (host blocks)"),
                Patch(facecolor="white", edgecolor="grey", linestyle="--", label="waiting (preempted: recompute)"),
                Line2D([], [], marker="v", color="black", linestyle="", label="preempted")]
    fig.legend(handles=handles, loc="lower center", ncol=5 if len(modes) > 1 else 3, frameon=False,
               bbox_to_anchor=(0.5, -0.08 if len(modes) > 1 else -0.12))
    fig.suptitle(f"{TITLE}: {data['num_blocks']} blocks of {data['block_size']} slots")
    fig.tight_layout()
    return fig


def _rgba(colour: str):
    from matplotlib.colors import to_rgba

    return to_rgba(colour)


def _draw_statuses(ax, data: dict, run: list[dict], colours: list) -> None:
    """One row per request: running (its colour), swapped out (dotted), waiting again after a
    preemption (dashed outline), and a marker where it was preempted."""
    status = statuses(data, run)
    preempted = preemptions(data, run)
    for row, request in enumerate(data["requests"]):
        seen_running = False
        for t, s in enumerate(status[request["id"]]):
            seen_running |= s == "running"
            if s == "running":
                ax.broken_barh([(t + 0.5, 1)], (row - 0.4, 0.8), facecolors=colours[row])
            elif s == "swapped":
                ax.broken_barh([(t + 0.5, 1)], (row - 0.4, 0.8), facecolors="white", edgecolor="grey", hatch="..")
            elif s == "waiting" and seen_running:
                ax.broken_barh([(t + 0.5, 1)], (row - 0.4, 0.8), facecolors="white", edgecolor="grey",
                               linestyle="--")
    rows = {r["id"]: i for i, r in enumerate(data["requests"])}
    ax.plot([t + 1 for t, _ in preempted], [rows[r] + 0.55 for _, r in preempted], "v", color="black")
    ax.set(yticks=range(len(data["requests"])), yticklabels=[_label(r) for r in data["requests"]],
           ylim=(len(data["requests"]) - 0.3, -0.7), ylabel="request")


def key_steps(data: dict, mode: str) -> list[int]:
    """Steps worth drawing the block tables at (0-based): the first with a forked sibling,
    the first copy-on-write, the first with a request swapped out or waiting after a
    preemption, and the first after it came back."""
    run = data["runs"][mode]
    steps = [next((t for t, s in enumerate(run) if any(q["index"] > 0 for q in s["sequences"])), None)]
    cows = copy_on_write(run)
    steps.append(cows[0]["step"] if cows else None)
    preempted = preemptions(data, run)
    if preempted:
        t, request_id = preempted[0]
        steps.append(t)
        status = statuses(data, run)[request_id]
        steps.append(next((u for u in range(t, len(run)) if status[u] == "running"), None))
    return sorted({t for t in steps if t is not None})


def plot_tables(data: dict, mode: str = "swap", steps: list[int] | None = None):
    """The sequences' block tables at a few steps, as the paper draws them: a row per
    sequence, a box per logical block naming its physical block (h: a host block) and the
    slots filled; hatched when the block is shared."""
    from matplotlib.patches import Rectangle

    run = data["runs"][mode]
    steps = key_steps(data, mode) if steps is None else steps
    colours = _colours(data)
    position = {r["id"]: i for i, r in enumerate(data["requests"])}
    ncols = min(2, len(steps))
    nrows = -(-len(steps) // ncols)
    fig, axes = new_figure(ncols=ncols, width=6.5, height=3.2 * nrows, nrows=nrows)
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    size = data["block_size"]
    for ax, t in zip(axes, steps):
        snapshot = run[t]
        seqs = snapshot["sequences"]
        width = max([len(s["block_table"]) for s in seqs] + [1])
        for row, seq in enumerate(seqs):
            swapped = seq["status"] == "swapped"
            for logical, (block, filled) in enumerate(zip(seq["block_table"], seq["filled"])):
                shared = not swapped and snapshot["refs"][block] > 1
                ax.add_patch(Rectangle((logical, row - 0.4), 0.92, 0.8, facecolor="white" if swapped else
                                       colours[position[seq["request_id"]]], alpha=1.0 if swapped else 0.55,
                                       edgecolor="grey" if swapped else "black",
                                       hatch="////" if shared else ".." if swapped else None))
                ax.text(logical + 0.46, row, f"{'h' if swapped else ''}{block}\n{filled}/{size}", ha="center",
                        va="center", fontsize=8, bbox=dict(facecolor="white", edgecolor="none", pad=1)
                        if swapped or shared else None)
            if not seq["block_table"]:
                ax.text(0.05, row, "no blocks: waits to be recomputed", va="center", fontsize=8, style="italic")
        ax.set(xlim=(-0.1, width + 0.1), ylim=(len(seqs) - 0.5, -0.5), yticks=range(len(seqs)),
               yticklabels=[f"{s['request_id']}{s['index']} {s['status']}" for s in seqs],
               xticks=[i + 0.46 for i in range(width)], xticklabels=range(width),
               xlabel="logical block (box: physical block, slots filled)", title=f"after step {t + 1}")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Block tables, {MODES[mode]} (hatched: shared; h: host block in the swap space)")
    fig.tight_layout()
    return fig


def headline(data: dict) -> list[list[str]]:
    first = summary(data, next(iter(data["runs"])))
    rows = [["§4.3 (Fig. 6-7)", "slots filled in the blocks in use, mean over steps",
             "waste only in each sequence's last block", f"{first['filled']:.0%}"],
            ["§4.4 (Fig. 8)", "parallel sampling (n=2)",
             "prompt blocks shared (ref 2); copy-on-write at the first write into a shared block",
             f"up to {first['peak_shared']} blocks shared; {first['copies']} copy-on-write copies"]]
    for mode in data["runs"]:
        s = summary(data, mode)
        rows.append(["§4.5", MODES[mode],
                     "blocks moved to CPU memory and back" if mode == "swap" else "blocks freed, tokens recomputed",
                     (f"{s['preemptions']} preemptions; up to {s['peak_host_blocks']} host blocks; "
                      f"{s['free_at_end']} / {data['num_blocks']} blocks free at the end")])
    return rows


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
