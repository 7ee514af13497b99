"""`make run`: the paper's figures end to end on the machine at hand, then one table with the
paper's numbers next to ours.

--quick (what `make run` does) takes about ten minutes on two CPU cores: Fig. 2, 12-13, 14
and 17 at the paper's scale in the simulator (our scheduler, memory managers and beam search,
modelled step times),
Fig. 12-13 and 18b by real execution at a small scale on a clock modelled from this machine's
measured steps (so that the shared machine's load does not move them), and the sharing and
preemption figures at sizes where their effects show, the KV page dtype ablation (accuracy by
real execution, serving in the simulator), and speculative decoding by batch size (real
execution, with a serving row: about six minutes more, two servers started): each quick size is one whose numbers
hold from run to run, not a smoke test (those are the modules' `tiny` sizes). Fig. 18a needs
a GPU: on a CPU its row says so. --full runs every figure at its reference size (an hour or
more on a CPU). On a GPU the modules pick their GPU sizes (bigger models, longer contexts).
Each figure also writes its own table, data and plot to experiments/results/.

Run `python -m experiments.reproduce [--quick | --full]`.
"""

from __future__ import annotations

import argparse
import time

from experiments import (
    block_size,
    decoding_rate,
    kernel_bench,
    kv_dtype,
    memory_waste,
    preemption,
    request_rate,
    sharing,
    spec_decode,
)
from experiments.common import markdown_table, report, result_name, run_figure

# (module, options, size for --quick, size for --full), in the order the table lists them
PLAN = [
    (memory_waste, dict(simulate=True), "quick", "full"),
    (request_rate, dict(simulate=True), "quick", "full"),
    (request_rate, {}, "quick", "full"),
    (sharing, {}, "quick", "full"),
    (decoding_rate, dict(simulate=True), "quick", "full"),
    (block_size, {}, "quick", "full"),
    (preemption, {}, "quick", "full"),
    (kernel_bench, {}, "quick", "full"),
    (kv_dtype, {}, "quick", "full"),
    (spec_decode, {}, "quick", "full"),
]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the headline figures in about ten minutes (default)")
    mode.add_argument("--full", action="store_true", help="every figure at its reference size")
    args = parser.parse_args(argv)
    rows, seconds = [], {}
    for module, options, quick, full in PLAN:
        size = full if args.full else quick
        label = module.NAME + ("_simulated" if options.get("simulate") else "")
        print(f"\n=== {label} ({size})", flush=True)
        start = time.perf_counter()
        data = run_figure(module, size, **options)
        seconds[label] = time.perf_counter() - start
        source = result_name(label, size, module.DEFAULT_SIZE)
        for figure, quantity, paper, ours in module.headline(data):
            rows.append([figure, quantity, paper, ours, f"{data.get('mode', 'real execution')}", f"{source}.md"])
    body = (markdown_table(["figure", "quantity", "paper", "ours", "how", "details"], rows)
            + "\n\nSeconds per figure: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + ". Sizes: " + ("full" if args.full else "quick") + " (see experiments/reproduce.py PLAN).")
    report(result_name("reproduce", "full" if args.full else "quick", "quick"), "The paper's figures, side by side",
           body)
    return body


if __name__ == "__main__":
    main()
