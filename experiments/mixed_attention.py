"""Attention in the steps that mix prompts with decoding sequences, on the `xla` backend (the
CPU's): each call in the step shape (bucket) the engine pads it to, against the same
sequences attended apart (the decodes in a decode bucket, the prompts in the smallest bucket
that holds them), and against the backend at an earlier revision, in turns.

Why: in a serving run at 64 req/s (experiments/serving_bench.py's random trace) most of the
engine's time went to steps of ~100-200 decoding sequences and a few new prompts, and most of
those steps' time was attention: tiles sized for the prompts gave every decoding sequence a
whole tile for its one token. The ratio "in the bucket / apart" is what mixing costs: 1.0
means a mixed step attends its sequences as cheaply as two steps would.

The model's attention geometry (heads, head dim, dtype) is the embedded model's; the cache
has as many blocks as the engine gives it by default; decoding sequences have 100-200 tokens
of context and prompts 100 (vLLM's random trace). Each time is the fastest of --repeats
calls; each system's timings run in a subprocess of their own, in turns round by round, and
the table gives the median over rounds.

    python -m experiments.mixed_attention [--rounds 3] [--baseline REV] [--output NAME]
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "stdlib-llama"
# The last revision whose xla backend gave every sequence of a call tiles of one size.
BASELINE = "123ede1"
NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN = 4097, 16, 256  # the engine's defaults for the embedded model
# (name, decoding sequences, prompts, prompt tokens, bucket tokens, bucket sequences); the
# buckets are those the engine pads each to (worker/buckets.py: decode buckets have one
# token per sequence, mixed ones a power of two of tokens and 4, 16, 64 or 256 sequences).
CASES = [
    ("160 decodes + 3 prompts", 160, 3, 100, 512, 256),
    ("60 decodes + 6 prompts", 60, 6, 100, 1024, 256),
    ("200 decodes + 1 prompt", 200, 1, 100, 512, 256),
    ("20 decodes + 2 prompts", 20, 2, 100, 256, 64),
    ("64 decodes alone", 64, 0, 0, 64, 64),
    ("160 decodes alone", 160, 0, 0, 192, 192),
    ("256 decodes alone", 256, 0, 0, 256, 256),
    ("3 prompts alone", 0, 3, 100, 512, 4),
    ("16 prompts alone", 0, 16, 100, 2048, 16),
]


def case_arrays(decodes: int, prompts: int, prompt_len: int, tokens: int, seqs: int, seed: int) -> dict:
    """A step's attention inputs (numpy), padded to its bucket (a decode bucket when it has
    no prompts)."""
    from paged_jax.worker.buckets import Bucket

    config = json.loads((MODEL / "config.json").read_text())
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    rng = np.random.default_rng(seed)
    q_lens = [1] * decodes + [prompt_len] * prompts
    context = list(rng.integers(100, 201, decodes)) + [prompt_len] * prompts
    width = MAX_MODEL_LEN // BLOCK_SIZE
    tables = np.zeros((seqs, width), np.int32)
    blocks = rng.permutation(NUM_BLOCKS)
    used = 0
    for s, length in enumerate(context):
        n = -(-length // BLOCK_SIZE)
        tables[s, :n] = blocks[used:used + n]
        used += n
    context_lens = np.zeros(seqs, np.int32)
    context_lens[:len(context)] = context
    cu_q_lens = np.zeros(seqs + 1, np.int32)
    cu_q_lens[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu_q_lens[len(q_lens) + 1:] = cu_q_lens[len(q_lens)]
    return dict(q=rng.standard_normal((tokens, heads, head_dim), np.float32),
                pages=rng.standard_normal((kv_heads, NUM_BLOCKS, BLOCK_SIZE, head_dim), np.float32),
                block_tables=tables, context_lens=context_lens, cu_q_lens=cu_q_lens,
                max_q_len=Bucket(tokens, seqs, decode=prompts == 0).max_q_len)


def apart(decodes: int, prompts: int, prompt_len: int) -> list[tuple]:
    """The same sequences as two steps of their own, each in the bucket the engine's runner
    would pick (the smallest that fits, at the default engine settings)."""
    from paged_jax.engine_args import EngineArgs
    from paged_jax.worker.buckets import bucket_sizes, mixed_buckets

    max_seqs, max_tokens = EngineArgs.max_num_seqs, 2048  # the defaults on a CPU (llm_engine.py)
    parts = []
    if decodes:  # decode buckets as ModelRunner makes them
        size = next(s for s in bucket_sizes(1, max_seqs, halves=True) if s >= decodes)
        parts.append((decodes, 0, 0, size, size))
    if prompts:
        bucket = next(b for b in mixed_buckets(max_seqs, max_tokens)
                      if b.num_tokens >= prompts * prompt_len and b.num_seqs >= prompts)
        parts.append((0, prompts, prompt_len, bucket.num_tokens, bucket.num_seqs))
    return parts


def time_cases(cases: list[tuple], repeats: int) -> list[float]:
    """Seconds per call (fastest of repeats) of the xla backend's ragged attention on each
    case (decodes, prompts, prompt_len, tokens, seqs), bfloat16 as the engine runs it."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import xla_attention

    times = []
    for i, case in enumerate(cases):
        a = case_arrays(*case, seed=i)
        pages = jnp.asarray(a["pages"], jnp.bfloat16)
        pages = jax.lax.bitcast_convert_type(pages, xla_attention.page_dtype(jnp.bfloat16))
        args = (jnp.asarray(a["q"], jnp.bfloat16), pages, pages, jnp.asarray(a["block_tables"]),
                jnp.asarray(a["context_lens"]), jnp.asarray(a["cu_q_lens"]))
        call = lambda: xla_attention.ragged_paged_attention_xla(*args, max_q_len=a["max_q_len"]).block_until_ready()  # noqa: E731
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        times.append(min(samples))
    return times


def run_in_subprocess(source: Path | None, cases: list[tuple], repeats: int) -> list[float]:
    """time_cases in a fresh process, with pallas_kernels from `source` (a directory holding
    an earlier revision's) or from this checkout: `python -m` puts its working directory
    first on the path."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "experiments.mixed_attention", "--worker", json.dumps(cases),
                          "--repeats", str(repeats)], cwd=source or REPO, env=env, check=True, capture_output=True,
                         text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["module"]).is_relative_to(source or REPO):
        raise RuntimeError(f"timed {result['module']}, not the pallas_kernels of {source or REPO}")
    return result["times"]


def checkout_of(rev: str, directory: Path) -> Path:
    """pallas_kernels as it was at rev, extracted under directory."""
    archive = subprocess.run(["git", "archive", rev, "pallas_kernels"], cwd=REPO, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", default=BASELINE, help="git revision whose xla backend to time beside")
    parser.add_argument("--output", default="mixed_attention_cpu", help="results/<output>.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON cases: time them here, print JSON
    args = parser.parse_args(argv)
    if args.worker:
        import pallas_kernels

        times = time_cases([tuple(c) for c in json.loads(args.worker)], args.repeats)
        print(json.dumps({"module": pallas_kernels.__file__, "times": times}))
        return ""

    from experiments.common import markdown_table, report

    shapes = [case[1:] for case in CASES]
    parts = [apart(*shape[:3]) for shape in shapes]
    everything = shapes + [p for ps in parts for p in ps]
    now: list[list[float]] = []
    before: list[list[float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = checkout_of(args.baseline, Path(tmp))
        for _ in range(args.rounds):  # in turns, so that both see the machine's load alike
            before.append(run_in_subprocess(old, shapes, args.repeats))
            now.append(run_in_subprocess(None, everything, args.repeats))
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    rows = []
    lookup = {shape: i for i, shape in enumerate(everything)}
    for i, (name, *shape) in enumerate(CASES):
        ms_now, ms_before = 1e3 * med(now, i), 1e3 * med(before, i)
        ms_apart = 1e3 * sum(med(now, lookup[p]) for p in parts[i])
        mixed = len(parts[i]) > 1
        rows.append([name, f"({shape[3]}, {shape[4]})", f"{ms_before:.2f}", f"{ms_now:.2f}",
                     f"{ms_before / ms_now:.2f}x", f"{ms_apart:.2f}" if mixed else "-",
                     f"{ms_before / ms_apart:.2f}" if mixed else "-", f"{ms_now / ms_apart:.2f}" if mixed else "-"])
    body = (
        f"One attention layer of the embedded model ({MODEL.name}: its heads and head dim, bfloat16, "
        f"{NUM_BLOCKS} blocks of {BLOCK_SIZE}), xla backend, fastest of {args.repeats} calls, median of "
        f"{args.rounds} rounds; `{args.baseline}` (the backend before tiles were sized per sequence) and this "
        "checkout each in a subprocess of their own, in turns. \"Apart\": the same sequences as two calls, the "
        "decodes in their decode bucket and the prompts in the smallest bucket holding them (this checkout).\n\n"
        + markdown_table(["step", "bucket (tokens, seqs)", f"{args.baseline} ms", "now ms", "speed-up",
                          "apart ms", f"{args.baseline} / apart", "now / apart"], rows)
    )
    report(args.output, "Attention of steps that mix prompts and decodes", body)
    return body


if __name__ == "__main__":
    main()
