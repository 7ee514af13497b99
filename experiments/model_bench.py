"""Model benchmark: prefill throughput and decode step time vs batch size for an OPT-125m-shaped
random model on the paged KV cache (issue: models).

Prefill runs `batch` prompts of `prompt_len` tokens in one ragged step; decode runs one token
for each of `batch` sequences whose contexts hold `context` tokens. Random weights: the cost of
a model does not depend on what it has learnt. Run `python -m experiments.model_bench`;
on a GPU it compares the `pallas` and `xla` attention backends, on a CPU it uses `xla`.
Results go to experiments/results/model_bench_<device>.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.common import device_slug, markdown_table, report, time_call
from paged_jax.model import random_model
from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache
from paged_jax.model.config import ModelConfig

OPT_125M = ModelConfig(
    family="opt", architecture="OPTForCausalLM", vocab_size=50272, hidden_size=768, num_layers=12,
    num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=2048,
    activation="relu", norm="layernorm", norm_eps=1e-5, qkv_bias=True, out_bias=True, mlp_bias=True,
    tie_word_embeddings=True, learned_positions=True, position_offset=2,
)
BLOCK_SIZE = 16
GPU = dict(prompt_len=512, prefill_batches=(1, 4, 16), context=512, decode_batches=(1, 8, 32, 128, 256),
           dtype=jnp.bfloat16, backends=("pallas", "xla"))
CPU = dict(prompt_len=128, prefill_batches=(1, 4), context=128, decode_batches=(1, 8, 32),
           dtype=jnp.float32, backends=("xla",))


def step_time(model, batch: int, new_tokens: int, context: int) -> float:
    """Seconds per forward step: `batch` sequences, each adding `new_tokens` after
    `context - new_tokens` cached ones."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    tables = np.random.default_rng(0).permutation(batch * blocks_per_seq).reshape(batch, blocks_per_seq)
    chunks = [SequenceChunk([table.tolist()], context - new_tokens, new_tokens) for table in tables]
    positions, meta = build_metadata(chunks, BLOCK_SIZE, max_blocks_per_seq=blocks_per_seq)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, model.config.vocab_size, batch * new_tokens), jnp.int32)
    state = {"cache": init_kv_cache(model.config, batch * blocks_per_seq, BLOCK_SIZE, model.page_dtype(), model.mesh)}

    def call():
        logits, state["cache"] = model.forward(model.params, tokens, positions, state["cache"], meta)
        return logits

    return time_call(call, repeats=3)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    sizes = GPU if jax.default_backend() == "gpu" else CPU
    rows = []
    for backend in sizes["backends"]:
        model = random_model(OPT_125M, dtype=sizes["dtype"], attention_backend=backend)
        for batch in tqdm(sizes["prefill_batches"], desc=f"prefill ({backend})"):
            seconds = step_time(model, batch, sizes["prompt_len"], sizes["prompt_len"])
            rows.append([backend, "prefill", batch, sizes["prompt_len"], f"{seconds * 1e3:.2f}",
                         f"{batch * sizes['prompt_len'] / seconds:,.0f}"])
        for batch in tqdm(sizes["decode_batches"], desc=f"decode ({backend})"):
            seconds = step_time(model, batch, 1, sizes["context"])
            rows.append([backend, "decode", batch, sizes["context"], f"{seconds * 1e3:.2f}", f"{batch / seconds:,.0f}"])
    body = (
        f"OPT-125m-shaped random model ({jnp.dtype(sizes['dtype']).name}), block size {BLOCK_SIZE}. "
        "Prefill: one step over `batch` prompts of `tokens` each. Decode: one token for each of "
        "`batch` sequences with `tokens` of context. Tokens/s = tokens processed per second.\n\n"
        + markdown_table(["backend", "phase", "batch", "tokens", "step (ms)", "tokens/s"], rows)
    )
    report(f"model_bench_{device_slug()}", "Model benchmark", body)
    return body


if __name__ == "__main__":
    main()
