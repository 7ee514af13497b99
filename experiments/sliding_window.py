"""Sliding windows that free their blocks: the memory a sequence holds at 4x its window, and
the batch that fits, for today's sliding-window models at their real sizes.

Each model's layer types come from its config (model/config.py) and make its KV groups and
page pools (model/cache.py: kv_layout). The real BlockManager then holds one sequence of 4
windows, prefilled in window-sized chunks (as the scheduler cuts them) and decoded 32 tokens:
the blocks it holds at its peak are measured, not computed. The baseline is what every block
kept costs, the layout before groups: one table, a pool per layer. Nothing here is timed, so
the numbers hold on any machine.

Run `python -m experiments.sliding_window`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.common import markdown_table, report
from paged_jax.kv.block_manager import BlockManager
from paged_jax.kv.interface import held_blocks
from paged_jax.model.cache import kv_cache_bytes_per_block, layout_of
from paged_jax.model.config import ModelConfig, from_hf_config
from paged_jax.sequence import Sequence

BLOCK_SIZE = 16
KV_BUDGET_GIB = 40  # what an 80 GB card has for K/V beside a 7-9B model's weights
DECODE_TOKENS = 32


def _every(n: int, layers: int) -> list[str]:
    """Gemma's pattern: every n-th layer global, the others sliding."""
    return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(layers)]


MODELS = {  # the shapes of their config.json files on the hub
    "Mistral-7B-v0.1": dict(architectures=["MistralForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                            max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                            vocab_size=32000),
    "gemma-2-9b": dict(architectures=["Gemma2ForCausalLM"], hidden_size=3584, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, intermediate_size=14336,
                       max_position_embeddings=8192, sliding_window=4096, rms_norm_eps=1e-6, vocab_size=256000,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, layer_types=_every(2, 42)),
    "gemma-3-4b (text)": dict(architectures=["Gemma3ForCausalLM"], hidden_size=2560, num_hidden_layers=34,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=256, intermediate_size=10240,
                              max_position_embeddings=131072, sliding_window=1024, rms_norm_eps=1e-6,
                              vocab_size=262208, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                              rope_local_base_freq=10000.0, layer_types=_every(6, 34)),
    "gemma-3-1b": dict(architectures=["Gemma3ForCausalLM"], hidden_size=1152, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=6912,
                       max_position_embeddings=32768, sliding_window=512, rms_norm_eps=1e-6, vocab_size=262144,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
                       rope_local_base_freq=10000.0, layer_types=_every(6, 26)),
}


def peak_blocks(config: ModelConfig) -> int:
    """Blocks one sequence of 4 windows holds at its most, through the real BlockManager."""
    window = config.sliding_window
    manager = BlockManager(1 << 16, BLOCK_SIZE, watermark=0, windows=layout_of(config).windows)
    seq = Sequence(0, 0, list(range(4 * window)), key=np.zeros(2, np.uint32), detokenizer=None)
    peak = 0
    while seq.num_computed_tokens < 4 * window + DECODE_TOKENS:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(0)
        step = min(manager.max_tokens_per_step or seq.num_tokens, seq.num_tokens - seq.num_computed_tokens)
        assert manager.grow([(seq, seq.num_computed_tokens + step)])
        seq.num_computed_tokens += step
        peak = max(peak, len(held_blocks(seq.block_tables)))
    return peak


def measure() -> list[dict]:
    rows = []
    for name, hf in MODELS.items():
        config = from_hf_config(hf)
        layout = layout_of(config)
        flat = ModelConfig(**{**config.__dict__, "layer_types": ("full_attention",) * config.num_layers})
        kept_blocks = -(-(4 * config.sliding_window + DECODE_TOKENS) // BLOCK_SIZE)
        kept = kept_blocks * kv_cache_bytes_per_block(flat, BLOCK_SIZE, jnp.bfloat16)
        blocks = peak_blocks(config)
        freed = blocks * kv_cache_bytes_per_block(config, BLOCK_SIZE, jnp.bfloat16)
        sliding = sum(t == "sliding_attention" for t in config.layer_types)
        rows.append(dict(model=name, window=config.sliding_window, sliding=sliding,
                         global_=config.num_layers - sliding, groups=len(layout.windows), pools=layout.num_pools,
                         kept_blocks=kept_blocks, blocks=blocks, kept_mib=kept / 2**20, freed_mib=freed / 2**20,
                         kept_batch=KV_BUDGET_GIB * 2**30 // kept, batch=KV_BUDGET_GIB * 2**30 // freed))
    return rows


def main() -> None:
    rows = measure()
    table = markdown_table(
        ["model", "window", "layers sliding : global", "KV groups x pools", "blocks per sequence (kept / freed)",
         "KV MiB per sequence (kept / freed)", f"sequences in {KV_BUDGET_GIB} GiB (kept / freed)", "memory saved"],
        [[r["model"], r["window"], f"{r['sliding']} : {r['global_']}", f"{r['groups']} x {r['pools']}",
          f"{r['kept_blocks']} / {r['blocks']}", f"{r['kept_mib']:.0f} / {r['freed_mib']:.0f}",
          f"{r['kept_batch']} / {r['batch']}", f"{1 - r['freed_mib'] / r['kept_mib']:.0%}"] for r in rows])
    body = (f"One sequence of 4 windows + {DECODE_TOKENS} decoded tokens, blocks of {BLOCK_SIZE}, bfloat16 K/V. "
            "\"kept\": every block held (one table, a pool per layer: the layout before KV groups); \"freed\": "
            "the blocks the BlockManager holds at the sequence's peak with sliding groups freeing what left "
            "their window (a block is a page in each pool, so a block costs pools / layers of a kept one).\n\n"
            + table)
    report("sliding_window", "Sliding windows free their blocks (issue 20)", body)


if __name__ == "__main__":
    main()
