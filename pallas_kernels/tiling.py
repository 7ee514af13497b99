"""How a ragged attention call is cut into work: query tiles, context chunks, partitions,
and which keys a query sees.

Shared by the Pallas kernel, the jax.numpy (`xla`) implementation and the reference, so all
three walk the same tiles and apply the same rule. A *query tile* holds up to
`tokens_per_tile` consecutive query tokens of one sequence, with all the query heads that
share one KV head; the tile's rows are its (token, head) pairs. Every choice of sizes here is
made from static shapes, never device values.

A tile walks its context from `context_start` (the chunk holding the first position its first
token sees; 0 without a sliding window) to its last token, so with a window of W it reads
about W + tokens_per_tile positions however long the sequence, and the blocks wholly before
that start are never read: the block manager may free them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pallas_kernels import shapes

# Masked scores and empty rows use a large finite value: -inf - -inf would be NaN.
MASK_VALUE = -1e30
# Programs wanted in flight before split-K stops paying off (about 2 per SM on an H100).
TARGET_PROGRAMS = 264
MIN_PARTITION_TOKENS = 512


def cdiv(a, b):
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class TilePlan:
    group: int  # query heads per KV head
    block_rows: int  # rows per tile: tokens_per_tile * group, padded to a power of two
    tokens_per_tile: int
    num_tiles: int
    chunk: int  # context tokens per inner step
    page_rows: int  # tokens read from each page per step: min(block_size, chunk)
    pages_per_chunk: int
    partition: int  # context tokens per split-K partition, a multiple of chunk
    num_splits: int
    pieces: tuple[tuple[int, int], ...]  # (start, size) power-of-two column pieces of head_dim


def sees(q_pos: jax.Array, kv_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Whether a query at q_pos attends to the key at kv_pos: causal and, with a window,
    within the last sliding_window positions counting its own (Mistral's and Gemma's rule).
    Broadcasts; a q_pos of -1 (no query) sees nothing."""
    visible = kv_pos <= q_pos
    if sliding_window is not None:
        visible &= q_pos - kv_pos < sliding_window
    return visible


def soft_capped(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """Gemma 2's logit soft-capping (attn_logit_softcapping), on scaled scores before masking:
    the model was trained with scores bounded smoothly by |score| < soft_cap."""
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def context_start(first_pos: jax.Array, sliding_window: int | None, chunk: int) -> jax.Array:
    """Where a tile whose first token is at first_pos starts reading its context: the start of
    the chunk holding the earliest position that token sees (its later tokens see no earlier)."""
    if sliding_window is None:
        return jnp.zeros_like(first_pos)
    return jnp.maximum(first_pos - (sliding_window - 1), 0) // chunk * chunk


def head_dim_pieces(head_dim: int) -> tuple[tuple[int, int], ...]:
    """Power-of-two column pieces covering head_dim, largest first: 80 -> (0,64), (64,16)."""
    pieces, start = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        size = 1 << bit
        if head_dim - start >= size:
            pieces.append((start, size))
            start += size
    return tuple(pieces)


def plan_tiles(
    *,
    num_tokens: int,
    num_seqs: int,
    max_q_len: int,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_context: int,
    min_rows: int = 16,
    chunk: int | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
) -> TilePlan:
    """Tile sizes and split-K partitions for one call.

    `min_rows` is the fewest rows a tile may have (16 for the matrix unit of a GPU; 1 where
    padding rows only costs). `chunk` defaults to a [chunk, head_dim] K tile of at most 16K
    elements (a register / shared-memory budget); split-K defaults to enough partitions to
    keep TARGET_PROGRAMS programs busy without making partitions shorter than 512 tokens.
    Partitions count from a tile's context_start, so with a sliding window they split the
    window, not the whole table."""
    max_q_len = max(1, min(max_q_len, num_tokens))
    row_cap = max(64, next_power_of_2(group))
    block_rows = min(max(min_rows, next_power_of_2(group * max_q_len)), row_cap)
    tokens_per_tile = block_rows // group
    # Each sequence adds at most one partly filled tile to the ceil(T / tpt) full ones.
    num_tiles = min(
        cdiv(num_tokens, tokens_per_tile) + num_seqs,
        num_seqs * cdiv(max_q_len, tokens_per_tile),
    )
    chunk = max(16, chunk or min(128, 16384 // next_power_of_2(head_dim)))
    page_rows = min(block_size, chunk)
    if sliding_window is not None:
        # What a tile reads: from its chunk-aligned context_start to its last token.
        max_context = min(max_context, (chunk - 1) + (sliding_window - 1) + tokens_per_tile)
    if num_splits is None:
        programs = num_tiles * num_kv_heads
        num_splits = 1
        if programs < TARGET_PROGRAMS:
            num_splits = min(cdiv(TARGET_PROGRAMS, programs), max(1, max_context // MIN_PARTITION_TOKENS))
    num_splits = max(1, min(num_splits, cdiv(max_context, chunk)))
    partition = cdiv(cdiv(max_context, num_splits), chunk) * chunk
    return TilePlan(
        group=group,
        block_rows=block_rows,
        tokens_per_tile=tokens_per_tile,
        num_tiles=num_tiles,
        chunk=chunk,
        page_rows=page_rows,
        pages_per_chunk=chunk // page_rows,
        partition=partition,
        num_splits=cdiv(max_context, partition),
        pieces=head_dim_pieces(head_dim),
    )


def padded_block_tables(block_tables: jax.Array, plan: TilePlan) -> jax.Array:
    """Pad the table to whole chunks, so the chunk holding a full table's last tokens reads
    inside it (chunks are read only up to a sequence's length)."""
    width = cdiv(block_tables.shape[1], plan.pages_per_chunk) * plan.pages_per_chunk
    return jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))


def owner(ends: jax.Array, index: jax.Array) -> jax.Array:
    """The sequence owning each index, given the sequences' cumulative end offsets [S].
    `compare_all` because a binary search lowers to a while loop: one device round trip per
    step on a GPU."""
    found = jnp.searchsorted(ends, index, side="right", method="compare_all")
    return jnp.minimum(found, ends.shape[0] - 1)


def tile_metadata(cu_q_lens: jax.Array, context_lens: jax.Array, plan: TilePlan, owned: jax.Array | None = None):
    """int32[num_tiles, 4]: (seq, first query token, tokens in tile, position of the first
    token), and int32[num_seqs]: each sequence's first tile. Unused tiles have no tokens.
    With `owned` (bool[num_seqs]) the tiles cover only those sequences (a plan for some of a
    batch's sequences, e.g. those decoding one token); the others get none."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    if owned is not None:
        q_lens = jnp.where(owned, q_lens, 0)
    tiles_per_seq = cdiv(q_lens, plan.tokens_per_tile)
    tile_end = jnp.cumsum(tiles_per_seq)
    tile_start = tile_end - tiles_per_seq
    tile = jnp.arange(plan.num_tiles, dtype=jnp.int32)
    seq = owner(tile_end, tile)
    in_seq = (tile - tile_start[seq]) * plan.tokens_per_tile
    num_q = jnp.clip(q_lens[seq] - in_seq, 0, plan.tokens_per_tile)
    num_q = jnp.where(tile < tile_end[-1], num_q, 0)
    first_pos = context_lens[seq] - q_lens[seq] + in_seq
    tiles = jnp.stack([seq, cu_q_lens[seq] + in_seq, num_q, first_pos], axis=1).astype(jnp.int32)
    return tiles, tile_start


def token_tiles(cu_q_lens: jax.Array, tile_start: jax.Array, plan: TilePlan, num_tokens: int):
    """For each query token: its tile, its index within the tile, and whether it is a real
    token (tokens past cu_q_lens[-1] are padding)."""
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = owner(cu_q_lens[1:], token)
    in_seq = token - cu_q_lens[seq]
    return tile_start[seq] + in_seq // plan.tokens_per_tile, in_seq % plan.tokens_per_tile, token < cu_q_lens[-1]


def merge_partitions(o: jax.Array, lse: jax.Array) -> jax.Array:
    """Combine split-K partials: o [splits, ...rows, D] float32, lse [splits, ...rows]."""
    weight = jnp.exp(lse - lse.max(axis=0)[None])
    total = weight.sum(axis=0)
    return (o * weight[..., None]).sum(axis=0) / jnp.where(total > 0, total, 1.0)[..., None]


def decode_as_ragged(ragged: Callable, q, k_pages, v_pages, block_tables, lengths, **kwargs) -> jax.Array:
    """Decode attention (q [num_seqs, Hq, D], lengths int32[num_seqs]) through a ragged
    attention function: one query per sequence, so tiles of one token (max_q_len=1)."""
    shapes.check_decode(q, block_tables, lengths)
    cu_q_lens = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged(q, k_pages, v_pages, block_tables, lengths, cu_q_lens, max_q_len=1, **kwargs)
