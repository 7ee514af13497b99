"""Start-up: how long `LLM(model)` takes before it serves, cold and warm (issue 11).

Each start runs in a fresh Python process with its own compilation cache directory: *cold*
finds it empty, *warm* finds what the cold start of the same configuration left there. Two
warm-up modes: the default compiles only the largest step shape of each kind before serving
and the rest on a background thread; `background_compile=False` compiles every shape first
(what every start did before the persistent cache and the background thread).

Columns: seconds from process start to a ready `LLM` (imports included), seconds inside
`LLM(...)`, seconds until a first 32-token greedy request is done, seconds until every step
shape is ready, and how many executables came from the persistent cache.

Then a newcomer's first offline run (issue 19): a fresh process with an empty compilation
cache makes a default `LLM` of throughput.py's 22M-parameter model and at once generates its
48 ShareGPT-like requests; once every shape is compiled, the same batch again is the steady
state. The first run's output tokens/s over the steady state's is the figure (target >= 0.8x),
in several rounds (medians; the machine is shared).
Run `python -m experiments.startup [--model DIR] [--rounds N]`; results go to
experiments/results/startup_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.common import device_slug, markdown_table, report

DEFAULT_MODEL = Path(__file__).parent.parent / "models" / "stdlib-llama"
TARGETS = {"cold": 30.0, "warm": 5.0}  # seconds to a ready LLM on a 2-core CPU (issue 11)

CHILD = """
import json, sys, time
start = float(sys.argv[1])
from paged_jax import LLM, SamplingParams
before = time.time()
llm = LLM(sys.argv[2], background_compile=sys.argv[3] == "1")
ready = time.time()
llm.generate(["def main("], SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
first = time.time()
llm.engine.wait_for_compiles()
stats = llm.stats()
print(json.dumps(dict(ready=ready - start, constructor=ready - before, first_request=first - start,
                      all_shapes=max(time.time(), first) - start, built=stats["executables_built"],
                      from_cache=stats["executables_from_cache"], after_warmup=stats["compiles_after_warmup"])))
"""


def start(model: Path, cache_dir: Path, background: bool) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), PAGED_JAX_CONFIGURE_LOGGING="0")
    out = subprocess.run([sys.executable, "-c", CHILD, repr(time.time()), str(model), "1" if background else "0"],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


FIRST_RUN = """
import json, sys, time
from experiments.throughput import CPU
from experiments.workloads import SHAREGPT, prompt_token_ids, sample_requests
from paged_jax import LLM, SamplingParams
requests = sample_requests(SHAREGPT, CPU["requests"], seed=0, max_model_len=CPU["max_model_len"])
prompts = prompt_token_ids(requests, CPU["model"]["vocab_size"], seed=0)
inputs = [{"prompt_token_ids": p} for p in prompts]
params = [SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
tokens = sum(r.output_len for r in requests)
llm = LLM(sys.argv[1], max_model_len=CPU["max_model_len"])
def timed():
    start = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    return time.perf_counter() - start
before = llm.stats()
first = timed()
during = llm.stats()
llm.engine.wait_for_compiles()
print(json.dumps(dict(first=tokens / first, steady=tokens / timed(), after_warmup=llm.stats()["compiles_after_warmup"],
                      first_seconds=first, shapes=during["executables_built"] - before["executables_built"],
                      compile_seconds=during["executables_seconds"] - before["executables_seconds"])))
"""


def first_runs(rounds: int) -> list[dict]:
    """Output tokens/s of a cold default LLM's first generate and of the same batch once every
    shape is compiled, each round in a fresh process with an empty compilation cache."""
    from experiments.common import random_llama_checkpoint
    from experiments.throughput import CPU

    runs = []
    with tempfile.TemporaryDirectory() as model:
        random_llama_checkpoint(CPU["model"], Path(model), CPU["dtype"])
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PAGED_JAX_CONFIGURE_LOGGING="0")
                out = subprocess.run([sys.executable, "-c", FIRST_RUN, model], env=env, check=True, capture_output=True,
                                     text=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3, help="first offline runs, each in a fresh process")
    args = parser.parse_args(argv)
    rows, measured = [], {}
    for background in (True, False):
        with tempfile.TemporaryDirectory() as cache:
            for kind in ("cold", "warm"):
                r = start(args.model, Path(cache), background)
                measured[(kind, background)] = r
                mode = "largest shapes first, rest in background" if background else "every shape before serving"
                rows.append([kind, mode, f"{r['ready']:.1f}", f"{r['constructor']:.1f}", f"{r['first_request']:.1f}",
                             f"{r['all_shapes']:.1f}", f"{r['from_cache']} / {r['built']}", r["after_warmup"]])
    verdicts = [f"{kind} start to a ready LLM: {measured[(kind, True)]['ready']:.1f} s (target <= {target:.0f} s, "
                f"{'met' if measured[(kind, True)]['ready'] <= target else 'missed'})"
                for kind, target in TARGETS.items()]
    before = measured[("cold", False)]["ready"]
    body = (
        f"Model `{args.model.name}`, default EngineArgs (max_num_seqs 256, num_scheduler_steps 8). "
        "Each row is a fresh process; seconds are counted from its start (imports included), "
        "except `LLM()`, the constructor alone.\n\n"
        + markdown_table(["start", "warm-up", "ready (s)", "LLM() (s)", "first request done (s)",
                          "every shape ready (s)", "from cache / built", "compiles after warm-up"], rows)
        + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
        + f"\n- before this change every start compiled every shape first, without a persistent cache: "
        f"the cold row of `every shape before serving`, {before:.1f} s, "
        f"{before / measured[('cold', True)]['ready']:.1f}x the cold default and "
        f"{before / measured[('warm', True)]['ready']:.0f}x the warm default"
    )
    runs = first_runs(args.rounds)
    ratios = sorted(r["first"] / r["steady"] for r in runs)
    body += (
        "\n\n## A newcomer's first offline run\n\n"
        "throughput.py's 22M-parameter Llama, its 48 ShareGPT-like requests (temperature 1, ignore_eos), a "
        "default `LLM(model, max_model_len=512)` in a fresh process with an empty compilation cache, "
        "`generate` at once; then, every shape compiled, the same batch again (steady state).\n\n"
        + markdown_table(["round", "first run (output tok/s)", "steady state (output tok/s)", "first / steady",
                          "first run (s)", "shapes it compiled (compile s, one core)", "compiles after warm-up"],
                         [[i + 1, f"{r['first']:.0f}", f"{r['steady']:.0f}", f"{r['first'] / r['steady']:.2f}x",
                           f"{r['first_seconds']:.1f}", f"{r['shapes']} ({r['compile_seconds']:.1f})",
                           r["after_warmup"]] for i, r in enumerate(runs)])
        + f"\n\n- first run / steady state: median {statistics.median(ratios):.2f}x "
        f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x; target >= 0.8x, "
        f"{'met' if statistics.median(ratios) >= 0.8 else 'missed'})"
    )
    report(f"startup_{device_slug()}", "Start-up time, cold and warm", body)
    return body


if __name__ == "__main__":
    main()
