"""What constrained decoding costs per output token, against free decoding in the same run, in
our engine and in vLLM's CPU build on the same requests.

Both systems serve the embedded model (its tokenizer writes JSON) at batch 1 and 32: the same
text prompts at temperature 1.0, once free (ignore_eos, MAX_TOKENS tokens) and once constrained
to SCHEMA through each system's own `SamplingParams(structured_outputs=StructuredOutputsParams(
json=SCHEMA))` (xgrammar behind both). Cost per token is a run's seconds over the tokens it
output: a constrained output ends where its grammar does, so its runs are shorter, and the
prompt's share is small (a dozen tokens). Each system runs in a fresh process, warmed up once,
then REPEATS rounds of (batch, free / constrained) in turns; medians are reported, and the
systems take turns process by process. The ratio that matters is constrained / free within a
system: the machine is shared, so absolute times move.

vLLM runs from its own virtual environment (see experiments/vllm_offline.py).

Run `python -m experiments.structured_bench [--vllm-python .venv-vllm/bin/python]`; results go to
experiments/results/structured_bench_<device>.md.
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

from experiments.common import device_slug, markdown_table, report
from experiments.serving import DEFAULT_MODEL

REPO = Path(__file__).resolve().parent.parent
BATCHES = (1, 32)
MAX_TOKENS = 64
REPEATS = 3
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "size": {"type": "integer"}},
          "required": ["name", "size"], "additionalProperties": False}
PROMPTS = ["# the service's settings as JSON\nconfig = ", "def describe(item):\n    return ",
           "# a record, serialised\nrecord = ", "payload = json.dumps(", "# the response body\nbody = ",
           "defaults = ", "# what the test expects\nexpected = ", "options = dict("]

# One process of one system: the same measurement loop, with the system's own LLM and params.
MEASURE = """
import json, statistics, sys, time
work = json.load(sys.stdin)
def measure(generate, free, constrained):
    def run(batch, params):
        prompts = [work["prompts"][i % len(work["prompts"])] for i in range(batch)]
        start = time.perf_counter()
        outputs = generate(prompts, [params(i) for i in range(batch)])
        seconds = time.perf_counter() - start
        texts = [o.outputs[0].text for o in outputs]
        return seconds / sum(len(o.outputs[0].token_ids) for o in outputs), texts
    for batch in work["batches"]:  # warm-up: every shape and the grammar compiled
        run(batch, free), run(batch, constrained)
    result = {}
    for batch in work["batches"]:
        free_times, constrained_times, valid = [], [], []
        for _ in range(work["repeats"]):
            free_times.append(run(batch, free)[0])
            seconds, texts = run(batch, constrained)
            constrained_times.append(seconds)
            valid += [_valid(t) for t in texts]
        result[batch] = dict(free=free_times, constrained=constrained_times, valid=sum(valid) / len(valid))
    print("RESULT", json.dumps(result), flush=True)
def _valid(text):
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("size"), int)
"""

# Both systems spell the requests alike (vLLM's API is ours); only the imports and the engine differ.
SYSTEM = """
{imports}
llm = {engine}
def free(i):
    return SamplingParams(temperature=1.0, seed=i, max_tokens=work["max_tokens"], ignore_eos=True)
def constrained(i):
    return SamplingParams(temperature=1.0, seed=i, max_tokens=work["max_tokens"],
                          structured_outputs=StructuredOutputsParams(json=work["schema"]))
measure(lambda prompts, params: llm.generate(prompts, params, use_tqdm=False), free, constrained)
"""
OURS = MEASURE + SYSTEM.format(imports="from paged_jax import LLM, SamplingParams, StructuredOutputsParams",
                               engine='LLM(work["model"], max_model_len=256, background_compile=False)')
VLLM = MEASURE + SYSTEM.format(
    imports="from vllm import LLM, SamplingParams\nfrom vllm.sampling_params import StructuredOutputsParams",
    engine='LLM(model=work["model"], max_model_len=256, seed=0)')


def run(python: str, script: str, work: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PAGED_JAX_CONFIGURE_LOGGING="0",
                   VLLM_CPU_KVCACHE_SPACE="4")
        out = subprocess.run([python, "-c", script], input=json.dumps(work), env=env, cwd=REPO, check=True,
                             capture_output=True, text=True)
    [line] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return {int(batch): r for batch, r in json.loads(line.removeprefix("RESULT ")).items()}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="processes per system, in turns")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    args = parser.parse_args(argv)
    work = dict(model=str(DEFAULT_MODEL), prompts=PROMPTS, schema=SCHEMA, batches=BATCHES, max_tokens=MAX_TOKENS,
                repeats=REPEATS)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for name, python, script in (("paged-jax", sys.executable, OURS), ("vLLM", args.vllm_python, VLLM)):
            for batch, r in run(python, script, work).items():
                free, constrained = statistics.median(r["free"]), statistics.median(r["constrained"])
                rows.append([round_, name, batch, f"{1e3 * free:.2f}", f"{1e3 * constrained:.2f}",
                             f"{constrained / free:.2f}x", f"{r['valid']:.0%}"])
                print(rows[-1], flush=True)
    body = (f"The embedded model, temperature 1.0, prompts of about a dozen tokens; free: {MAX_TOKENS} tokens "
            f"(ignore_eos); constrained: to a JSON schema of a name and a size, until the grammar ends or "
            f"{MAX_TOKENS} tokens. Milliseconds per output token, median of {REPEATS} runs after a warm-up, each "
            "system in a fresh process, in turns; complete: constrained outputs that parse with the required keys "
            "(the rest ran into max_tokens: JSON's grammar allows any whitespace, as both systems' defaults do, and "
            "a small model wanders into it).\n\n"
            + markdown_table(["round", "system", "batch", "free (ms/token)", "constrained (ms/token)",
                              "constrained / free", "complete"], rows))
    report(f"structured_bench_{device_slug()}", "Constrained decoding against free decoding", body)
    return body


if __name__ == "__main__":
    main()
