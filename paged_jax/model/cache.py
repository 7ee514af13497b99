"""The paged KV cache as the model sees it: page pools, and the metadata that tells a ragged
batch of tokens where their context lives and where their own K/V go.

The cache is a plain pytree passed into every jitted step and returned (donated), never hidden
state. Block tables, context lengths and slot mappings are built on the host by whoever owns
the blocks (the scheduler, or a test) with `build_metadata`.

Layers whose K/V live equally long form a KV group (KVLayout): a layer with a sliding window
needs only its window's blocks, a global layer all of them, so each group has its own block
table per sequence. Groups are made equal in size, and pool j holds the pages of the j-th layer
of every group (vLLM v1's hybrid KV cache): block ids come from one allocator, a block costs one
page per pool whichever group holds it, and a model whose layers are all alike is one group
with a pool per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from paged_jax.model.config import ModelConfig
from paged_jax.model.sharding import cache_sharding
from pallas_kernels import needs_scales

# vLLM's kv_cache_dtype (engine_args.KV_CACHE_DTYPES) -> what the pages hold
# (pallas_kernels/quantization.py): "auto" is the model's dtype; "fp8" is fp8_e4m3 as in vLLM.
PAGE_DTYPES = {"auto": None, "bfloat16": jnp.dtype(jnp.bfloat16), "fp8": jnp.dtype(jnp.float8_e4m3fn),
                   "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn), "fp8_e5m2": jnp.dtype(jnp.float8_e5m2),
                   "int8": jnp.dtype(jnp.int8)}


def kv_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The dtype a cache's pages hold for vLLM's kv_cache_dtype name."""
    if kv_cache_dtype not in PAGE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {list(PAGE_DTYPES)}")
    return PAGE_DTYPES[kv_cache_dtype] or jnp.dtype(model_dtype)


class KVPool(NamedTuple):
    """One pool's pages, and beside them int8 pages' scales (None for pages that need none),
    sharing their block ids and slots: whatever moves a block moves its scales."""

    k: jax.Array  # [num_kv_heads, num_blocks, block_size, head_dim]
    v: jax.Array  # [num_kv_heads, num_blocks, block_size, head_dim]
    k_scales: jax.Array | None = None  # float32[num_kv_heads, num_blocks, block_size]
    v_scales: jax.Array | None = None


KVCache = tuple[KVPool, ...]


@dataclass(frozen=True)
class KVLayout:
    """Which block table (group) and which page pool each layer uses."""

    windows: tuple[int | None, ...]  # per group: its layers' sliding window (None: global)
    group_of: tuple[int, ...]  # per layer
    pool_of: tuple[int, ...]  # per layer

    @property
    def num_pools(self) -> int:
        return max(self.pool_of) + 1


def kv_layout(layer_windows: Sequence[int | None]) -> KVLayout:
    """Groups of equal size (the greatest common divisor of how many layers share each
    window), each of layers with one window in layer order; a group's j-th layer uses pool j."""
    layer_windows = list(layer_windows)
    kinds = list(dict.fromkeys(layer_windows))
    size = math.gcd(*(layer_windows.count(kind) for kind in kinds))
    windows, group_of, pool_of = [], [0] * len(layer_windows), [0] * len(layer_windows)
    for kind in kinds:
        layers = [i for i, w in enumerate(layer_windows) if w == kind]
        for start in range(0, len(layers), size):
            for j, layer in enumerate(layers[start : start + size]):
                group_of[layer], pool_of[layer] = len(windows), j
            windows.append(kind)
    return KVLayout(tuple(windows), tuple(group_of), tuple(pool_of))


def layout_of(config: ModelConfig) -> KVLayout:
    return kv_layout([config.window_of(layer) for layer in range(config.num_layers)])


def init_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype, mesh: Mesh) -> KVCache:
    """Zero pages of dtype (as the backend stores them: Model.page_dtype) made directly in
    their shards on the model's mesh, split on the head axis (the whole cache never sits on
    one device), with zero scales where the pages need them."""
    shape = (config.num_kv_heads, num_blocks, block_size)

    def zeros(shape, dtype):
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=cache_sharding(mesh))()

    def pool() -> KVPool:
        pages = [zeros(shape + (config.head_dim,), dtype) for _ in "kv"]
        scales = [zeros(shape, jnp.float32) for _ in "kv"] if needs_scales(dtype) else [None, None]
        return KVPool(*pages, *scales)

    return tuple(pool() for _ in range(layout_of(config).num_pools))


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    """Bytes one block costs across all pools, K and V, their scales included."""
    per_slot = config.head_dim * jnp.dtype(dtype).itemsize + (4 if needs_scales(dtype) else 0)
    return 2 * config.num_kv_heads * block_size * per_slot * layout_of(config).num_pools


@flax.struct.dataclass
class AttentionMetadata:
    """Where a ragged batch's tokens sit in the paged cache (device arrays, padded), for every
    KV group; `group(g)` is what one group's layers pass their kernels."""

    block_tables: jax.Array  # int32[groups, num_seqs, max_blocks_per_seq]; padding and freed entries are 0
    context_lens: jax.Array  # int32[num_seqs]: tokens cached after this step's are written
    cu_q_lens: jax.Array  # int32[num_seqs + 1]: offsets of each sequence's tokens in the batch
    slot_mapping: jax.Array  # int32[groups, num_tokens]: block * block_size + offset; -1 = padding
    max_q_len: int = flax.struct.field(pytree_node=False)  # bound on any q_len; sizes tiles

    def group(self, g: int) -> AttentionMetadata:
        """Group g's view: block_tables [num_seqs, max_blocks_per_seq], slot_mapping [num_tokens]."""
        return self.replace(block_tables=self.block_tables[g], slot_mapping=self.slot_mapping[g])


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `num_new` tokens after `num_cached` already in cache."""

    # Per KV group, the physical block of each logical block (enough for all tokens); entries
    # a sliding window has freed are negative (kv/interface.py's NULL_BLOCK) and never read.
    block_tables: Sequence[Sequence[int]]
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
    num_groups = len(chunks[0].block_tables) if chunks else 1
    tables = np.zeros((num_groups, num_seqs, max_blocks_per_seq), np.int32)
    context_lens = np.zeros(num_seqs, np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    slots = np.full((num_groups, num_tokens), -1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    for i, chunk in enumerate(chunks):
        end = chunk.num_cached + chunk.num_new
        needed, width = -(-end // block_size), len(chunk.block_tables[0])
        if needed > width or width > max_blocks_per_seq:
            raise ValueError(f"sequence {i} needs {needed} blocks for {end} tokens; its table "
                             f"has {width}, the limit is {max_blocks_per_seq}")
        table = np.maximum(np.asarray(chunk.block_tables, np.int32), 0)  # all of it: a decode loop writes ahead
        tables[:, i, :width] = table
        context_lens[i] = end
        cu_q_lens[i + 1] = cu_q_lens[i] + chunk.num_new
        pos = np.arange(chunk.num_cached, end)
        batch = slice(cu_q_lens[i], cu_q_lens[i + 1])
        positions[batch] = pos
        slots[:, batch] = table[:, pos // block_size] * block_size + pos % block_size
    cu_q_lens[len(chunks) + 1 :] = cu_q_lens[len(chunks)]
    longest = max((c.num_new for c in chunks), default=1)
    return positions, AttentionMetadata(
        block_tables=tables,
        context_lens=context_lens,
        cu_q_lens=cu_q_lens,
        slot_mapping=slots,
        max_q_len=max_q_len or max(1, longest),
    )
