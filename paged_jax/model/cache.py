"""The paged KV cache as the model sees it: per-layer page pools, and the metadata that tells
a ragged batch of tokens where their context lives and where their own K/V go.

The cache is a plain pytree passed into every jitted step and returned (donated), never hidden
state. Block tables, context lengths and slot mappings are built on the host by whoever owns
the blocks (the scheduler, or a test) with `build_metadata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from paged_jax.model.config import ModelConfig
from paged_jax.model.sharding import cache_sharding

# Per layer (k_pages, v_pages), each [num_kv_heads, num_blocks, block_size, head_dim].
KVCache = tuple[tuple[jax.Array, jax.Array], ...]


def init_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype, mesh: Mesh) -> KVCache:
    """Zero pages made directly in their shards on the model's mesh, split on the head axis
    (the whole cache never sits on one device)."""
    shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=cache_sharding(mesh))
    return tuple((zeros(), zeros()) for _ in range(config.num_layers))


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    """Bytes one block costs across all layers, K and V."""
    per_layer = 2 * config.num_kv_heads * block_size * config.head_dim * jnp.dtype(dtype).itemsize
    return per_layer * config.num_layers


@flax.struct.dataclass
class AttentionMetadata:
    """Where a ragged batch's tokens sit in the paged cache (device arrays, padded)."""

    block_tables: jax.Array  # int32[num_seqs, max_blocks_per_seq]; padding entries are 0
    context_lens: jax.Array  # int32[num_seqs]: tokens cached after this step's are written
    cu_q_lens: jax.Array  # int32[num_seqs + 1]: offsets of each sequence's tokens in the batch
    slot_mapping: jax.Array  # int32[num_tokens]: block * block_size + offset; -1 = padding
    max_q_len: int = flax.struct.field(pytree_node=False)  # bound on any q_len; sizes tiles


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `num_new` tokens after `num_cached` already in cache."""

    block_table: Sequence[int]  # physical block of each logical block (enough for all tokens)
    num_cached: int
    num_new: int


def build_metadata(
    chunks: Sequence[SequenceChunk],
    block_size: int,
    *,
    max_blocks_per_seq: int,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_q_len: int | None = None,
) -> tuple[np.ndarray, AttentionMetadata]:
    """Host-side (numpy) positions (int32[num_tokens]) and metadata for one step, padded to
    (num_tokens, num_seqs) so that a few shapes cover every batch. Padding sequences have no
    tokens; padding tokens sit at position 0 and write nowhere."""
    total = sum(c.num_new for c in chunks)
    num_tokens = num_tokens or total
    num_seqs = num_seqs or len(chunks)
    if total > num_tokens or len(chunks) > num_seqs:
        raise ValueError(f"{len(chunks)} sequences / {total} tokens exceed the padded "
                         f"shape ({num_seqs} sequences, {num_tokens} tokens)")
    tables = np.zeros((num_seqs, max_blocks_per_seq), np.int32)
    context_lens = np.zeros(num_seqs, np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    slots = np.full(num_tokens, -1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    for i, chunk in enumerate(chunks):
        end = chunk.num_cached + chunk.num_new
        needed = -(-end // block_size)
        if needed > len(chunk.block_table) or len(chunk.block_table) > max_blocks_per_seq:
            raise ValueError(f"sequence {i} needs {needed} blocks for {end} tokens; its table "
                             f"has {len(chunk.block_table)}, the limit is {max_blocks_per_seq}")
        table = np.asarray(chunk.block_table, np.int32)  # all of it: a decode loop writes ahead
        tables[i, : len(table)] = table
        context_lens[i] = end
        cu_q_lens[i + 1] = cu_q_lens[i] + chunk.num_new
        pos = np.arange(chunk.num_cached, end)
        batch = slice(cu_q_lens[i], cu_q_lens[i + 1])
        positions[batch] = pos
        slots[batch] = table[pos // block_size] * block_size + pos % block_size
    cu_q_lens[len(chunks) + 1 :] = cu_q_lens[len(chunks)]
    longest = max((c.num_new for c in chunks), default=1)
    return positions, AttentionMetadata(
        block_tables=tables,
        context_lens=context_lens,
        cu_q_lens=cu_q_lens,
        slot_mapping=slots,
        max_q_len=max_q_len or max(1, longest),
    )
