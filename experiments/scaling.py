"""Tensor-parallel scaling: T = 1, 2, 4 devices serving one model (issue 13).

For each T: the bytes of one KV block on each device, how many blocks a fixed per-device KV
budget holds (the engine's rule: budget / per-device bytes per block) and so how many
sequences of a given length fit at once, the parameters each device holds, the time of a
decode step and of a prefill step, and what a step moves between devices (all-reduce and
all-gather bytes per device, read from the compiled HLO). T = 2 and 4 are measured with the
vocabulary split over the devices (the default) and replicated, the measurement behind the
partition rules' choice (paged_jax/model/sharding.py).

On a CPU the devices are simulated (`--xla_force_host_platform_device_count`, set by this
module when it runs on a CPU with too few devices): they share the machine's cores, so no
speed-up is expected and step times only show what the partitioning costs. Memory, capacity
and communication volumes are exact. On a multi-GPU machine the same command measures real
devices, with the KV budget taken from each device's free memory as the engine takes it.

    python -m experiments.scaling [--tp 1 2 4] [--seq-len 1024] [--kv-budget-mib 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

FORCE = "--xla_force_host_platform_device_count"
# A small Llama with GQA (12 query, 4 KV heads) and Llama's 32000-token vocabulary, so the
# embedding and LM head weigh as they do in real models of this width.
MODEL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
BLOCK_SIZE = 16
DECODE_SEQS, DECODE_CONTEXT = 32, 512  # the decode step timed: 32 sequences with 512 tokens each
PREFILL_TOKENS = 1024  # the prefill step timed: 4 prompts of 256 tokens


def measure(path: Path, tp: int, vocab_parallel: bool, budget: int | None, seq_len: int) -> dict:
    import jax
    import jax.numpy as jnp

    from experiments.common import time_call
    from paged_jax.model import load_model, sharding
    from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache, kv_cache_bytes_per_block

    mesh = sharding.make_mesh(jax.devices()[:tp])
    model = load_model(path, mesh, vocab_parallel=vocab_parallel, attention_backend="auto")
    device = mesh.devices.flat[0]
    if budget is None:  # the engine's rule on an accelerator: free memory, less what is in use
        stats = device.memory_stats()
        budget = int(stats["bytes_limit"] * 0.9 - stats["bytes_in_use"])
    per_block = kv_cache_bytes_per_block(model.config, BLOCK_SIZE, model.dtype) // tp
    blocks = budget // per_block
    per_seq = -(-seq_len // BLOCK_SIZE)
    params = sum(s.data.nbytes for x in jax.tree.leaves(model.params) for s in x.addressable_shards
                 if s.device == device)

    timed_blocks = DECODE_SEQS * DECODE_CONTEXT // BLOCK_SIZE + 1  # the cache the timed steps use
    cache = init_kv_cache(model.config, timed_blocks, BLOCK_SIZE, model.page_dtype(), mesh)
    width = DECODE_CONTEXT // BLOCK_SIZE
    tables = [list(range(1 + i * width, 1 + (i + 1) * width)) for i in range(DECODE_SEQS)]
    steps = {
        "decode": [SequenceChunk([t], DECODE_CONTEXT - 1, 1) for t in tables],
        "prefill": [SequenceChunk([t], 0, PREFILL_TOKENS // 4) for t in tables[:4]],
    }
    out = dict(tp=tp, vocab="split" if vocab_parallel else "replicated", kv_bytes_per_block=per_block,
               blocks=int(blocks), max_batch=int(blocks // per_seq), param_mib=params / 2**20)
    for name, chunks in steps.items():
        positions, meta = build_metadata(chunks, BLOCK_SIZE, max_blocks_per_seq=width)
        tokens = np.ones(sum(c.num_new for c in chunks), np.int32)
        compiled = model.forward.lower(model.params, tokens, positions, cache, meta).compile()
        state = {"cache": cache}

        def step():
            logits, state["cache"] = compiled(model.params, tokens, positions, state["cache"], meta)
            return logits

        out[f"{name}_ms"] = 1000 * time_call(step, repeats=5)
        cache = state["cache"]
        moved = sharding.collective_bytes(compiled.as_text())
        out[f"{name}_all_reduce"] = moved.get("all-reduce", 0)
        out[f"{name}_all_gather"] = moved.get("all-gather", 0)
        out[f"{name}_other"] = sum(v for k, v in moved.items() if k not in ("all-reduce", "all-gather"))
    cache = model = None  # freed before the next T loads its model
    jnp.zeros(()).block_until_ready()
    return out


def table(rows: list[dict], simulated: bool, budget_mib: float | None, seq_len: int) -> str:
    from experiments.common import markdown_table

    kib = lambda b: f"{b / 1024:.0f}"  # noqa: E731
    body = markdown_table(
        ["T", "vocabulary", "KV bytes / block / device", "blocks", f"max batch ({seq_len}-token seqs)",
         "params MiB / device", "decode step ms", "decode all-reduce KiB", "decode all-gather KiB",
         "prefill step ms", "prefill all-reduce KiB", "other collectives"],
        [[r["tp"], r["vocab"] if r["tp"] > 1 else "-", r["kv_bytes_per_block"], r["blocks"], r["max_batch"],
          f"{r['param_mib']:.1f}", f"{r['decode_ms']:.1f}", kib(r["decode_all_reduce"]),
          kib(r["decode_all_gather"]), f"{r['prefill_ms']:.1f}", kib(r["prefill_all_reduce"]),
          r["decode_other"] + r["prefill_other"]] for r in rows])
    layers = MODEL["num_hidden_layers"]
    notes = [
        f"Model: random Llama, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} query / {MODEL['num_key_value_heads']} KV heads, vocabulary "
        f"{MODEL['vocab_size']}, float32; blocks of {BLOCK_SIZE} tokens. Decode step: {DECODE_SEQS} sequences at "
        f"{DECODE_CONTEXT} tokens of context; prefill step: {PREFILL_TOKENS} tokens (4 prompts).",
        "KV budget per device: " + (f"{budget_mib:.0f} MiB (fixed: a CPU has no device memory to measure)"
                                    if budget_mib else "free device memory x 0.9, as the engine sizes its cache"),
        f"Collective bytes are per device per step, from the compiled HLO: {2 * layers} all-reduces of "
        "[tokens, hidden] (after o_proj and down_proj in each layer), one more for the split embedding's "
        "lookup, one all-gather of the logits [sequences, vocabulary] for the sampler.",
    ]
    choice = _vocabulary_choice(rows)
    if choice:
        notes.append(choice)
    if simulated:
        notes.append("**Simulated devices**: the T devices are XLA host-platform devices sharing this machine's "
                     "CPU cores, so T > 1 is not expected to be faster here; step times show the cost of "
                     "partitioning and collectives on one machine, not a multi-device speed-up, and they vary by "
                     "tens of percent between runs on this shared machine. Memory, capacity and bytes moved are "
                     "exact: what T real devices would have.")
    return body + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _vocabulary_choice(rows: list[dict]) -> str | None:
    """What splitting the vocabulary buys and costs at the largest T measured both ways."""
    pairs = {(r["tp"], r["vocab"]): r for r in rows}
    tps = [t for t in sorted({r["tp"] for r in rows}) if (t, "replicated") in pairs]
    if not tps:
        return None
    split, rep = pairs[(tps[-1], "split")], pairs[(tps[-1], "replicated")]
    freed = (rep["param_mib"] - split["param_mib"]) * 2**20
    extra = split["decode_all_reduce"] + split["decode_all_gather"] - rep["decode_all_reduce"]
    return (f"Vocabulary split or replicated (T = {tps[-1]}): splitting frees {freed / 2**20:.0f} MiB per device, "
            f"{int(freed // split['kv_bytes_per_block'])} more KV blocks at the same memory, for "
            f"{extra / 1024:.0f} KiB more per decode step (the logits all-gather and the embedding's "
            f"all-reduce); decode {split['decode_ms']:.0f} vs {rep['decode_ms']:.0f} ms here. The partition rules "
            "split it: on a real interconnect those bytes take microseconds, while the memory is KV cache.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence for 'max batch'")
    parser.add_argument("--kv-budget-mib", type=float, default=None,
                        help="KV bytes per device (default: free memory on an accelerator, 256 MiB on a CPU)")
    args = parser.parse_args(argv)
    if _needs_simulated_devices(max(args.tp)):
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FORCE}={max(args.tp)}".strip()}
        child = subprocess.run([sys.executable, "-m", "experiments.scaling", *(argv or sys.argv[1:])], env=env)
        sys.exit(child.returncode)

    import jax

    from experiments.common import device_slug, random_llama_checkpoint, report

    simulated = jax.devices()[0].platform == "cpu"
    budget_mib = args.kv_budget_mib or (256 if simulated else None)
    budget = int(budget_mib * 2**20) if budget_mib else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = random_llama_checkpoint(MODEL, Path(tmp), "float32")
        for tp in args.tp:
            for vocab_parallel in ((True, False) if tp > 1 else (True,)):
                rows.append(measure(path, tp, vocab_parallel, budget, args.seq_len))
                print(rows[-1], flush=True)
    report(f"scaling_{device_slug()}", "Tensor-parallel scaling" + (" (simulated CPU devices)" if simulated else ""),
           table(rows, simulated, budget_mib, args.seq_len))


def _needs_simulated_devices(count: int) -> bool:
    """On a CPU with fewer devices than asked for; decided before JAX starts (the flag is
    read once, at start-up), so it asks a child process."""
    if FORCE in os.environ.get("XLA_FLAGS", ""):
        return False
    probe = "import jax; print(jax.devices()[0].platform, len(jax.devices()))"
    platform, count_here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                          check=True).stdout.split()
    return platform == "cpu" and int(count_here) < count


if __name__ == "__main__":
    main()
