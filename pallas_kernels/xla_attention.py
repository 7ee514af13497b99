"""The `xla` backend's ragged paged attention: the kernel's tiled algorithm in jax.numpy.

The dense reference (reference.py) gathers every sequence's whole block table and lays
queries out as [num_seqs, max_q_len]: obviously right, and the oracle, but it reads the full
table width for every sequence and grows with num_seqs x max_q_len. Here all query tiles (the
same tiles as the Pallas kernel, see tiling.py) advance together through their contexts one
chunk of pages at a time with an online softmax, so a step reads about as much K/V as its
sequences actually hold, whatever max_q_len is. XLA compiles it for any device; on a CPU it is
the fast backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import reference, shapes
from pallas_kernels.tiling import (
    MASK_VALUE,
    cdiv,
    decode_as_ragged,
    padded_block_tables,
    plan_tiles,
    tile_metadata,
    token_tiles,
)

CHUNK_TOKENS = 32  # measured on a 2-core CPU: 16-64 similar, 128 is 2-4x slower (cache misses)
# Tiles are sorted by context length and cut into this many groups, each looping only to its
# own longest (a batch of 48 decodes with ShareGPT-like lengths: 2.3x faster attention than
# one group; lengths all alike: 1.2x slower, from the extra loops). Measured on a 2-core CPU
# with 2, 4 and 8 groups; small calls keep one group.
LENGTH_GROUPS = 4
MIN_TILES_TO_GROUP = 16
# bfloat16 pages are stored as their bits. XLA's CPU scatter widens a bfloat16 operand to
# float32 and back, the whole cache for a write of a few tokens (48 ms a step for a 64 MiB
# cache, against 0.05 ms for uint16 or float32); a bitcast of the donated cache inside the
# step copies it too (26 ms). So the cache is made uint16, writes bitcast the new tokens and
# reads bitcast the pages they gather (experiments/results/dtype_cpu.md).
STORED_AS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}


def page_dtype(dtype) -> jnp.dtype:
    """The dtype this backend's pages hold for a model computing in dtype."""
    return STORED_AS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def _as_computed(pages, dtype):
    """The pages as the model's dtype sees them (a view for the shape checks)."""
    return jax.ShapeDtypeStruct(pages.shape, dtype) if pages.dtype != dtype else pages


@functools.partial(jax.jit, donate_argnums=(0, 1))
def write_kv_xla(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim], page_dtype(k.dtype)
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # int32[num_tokens]: block * block_size + offset, < 0 = skip
) -> tuple[jax.Array, jax.Array]:
    """write_kv on pages held as the model's dtype or as its bits (STORED_AS)."""
    shapes.check_write(_as_computed(k_pages, k.dtype), _as_computed(v_pages, v.dtype), k, v, slot_mapping)
    if k_pages.dtype != k.dtype:
        k, v = lax.bitcast_convert_type(k, k_pages.dtype), lax.bitcast_convert_type(v, v_pages.dtype)
    return reference.scatter_tokens(k_pages, v_pages, k, v, slot_mapping)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_q_len"))
def ragged_paged_attention_xla(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    context_lens: jax.Array,  # int32[num_seqs]
    cu_q_lens: jax.Array,  # int32[num_seqs + 1]
    *,
    sm_scale: float | None = None,
    max_q_len: int | None = None,
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    shapes.check_attention(q, _as_computed(k_pages, q.dtype), _as_computed(v_pages, q.dtype), block_tables,
                           context_lens, cu_q_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    plan = plan_tiles(
        num_tokens=num_tokens, num_seqs=block_tables.shape[0], max_q_len=max_q_len or num_tokens,
        group=group, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        max_context=block_tables.shape[1] * block_size, min_rows=1,
        chunk=max(block_size, CHUNK_TOKENS), num_splits=1,
    )
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    tiles, tile_start = tile_metadata(cu_q_lens, context_lens, plan)
    seq, first_token, num_q, first_pos = tiles.T
    tpt, num_tiles = plan.tokens_per_tile, plan.num_tiles

    offset = jnp.arange(tpt)
    token = jnp.clip(first_token[:, None] + offset, 0, num_tokens - 1)  # [tiles, tpt]
    # Rows (token, head-in-group) of each tile, KV heads leading: [Hkv, tiles, tpt * G, D].
    q_tiles = q[token].reshape(num_tiles, tpt, num_kv_heads, group, head_dim).transpose(2, 0, 1, 3, 4)
    q_tiles = q_tiles.reshape(num_kv_heads, num_tiles, tpt * group, head_dim)
    row_pos = jnp.where(offset < num_q[:, None], first_pos[:, None] + offset, -1)  # [tiles, tpt]
    row_pos = jnp.repeat(row_pos, group, axis=1)  # [tiles, rows]
    kv_end = jnp.where(num_q > 0, first_pos + num_q, 0)
    tables = padded_block_tables(block_tables, plan, block_size)[seq]  # [tiles, width]

    # Tiles sorted by how much context they read, in groups that each stop at their own
    # longest: a batch of mostly short sequences no longer pays for its longest one everywhere.
    # Few tiles make one group, read unsorted.
    tile, index, is_query = token_tiles(cu_q_lens, tile_start, plan, num_tokens)
    tile = jnp.clip(tile, 0, num_tiles - 1)
    if num_tiles < MIN_TILES_TO_GROUP:
        out = _attend(q_tiles, k_pages, v_pages, tables, row_pos, kv_end, plan, scale)  # [Hkv, tiles, rows, D]
    else:
        size = cdiv(num_tiles, LENGTH_GROUPS)
        order = jnp.argsort(kv_end)

        def sorted_padded(x, axis, fill=0):  # tiles in order, padded with empty tiles to groups x size
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, LENGTH_GROUPS * size - num_tiles)
            return jnp.pad(jnp.take(x, order, axis=axis), widths, constant_values=fill)

        q_tiles, tables, kv_end = sorted_padded(q_tiles, 1), sorted_padded(tables, 0), sorted_padded(kv_end, 0)
        row_pos = sorted_padded(row_pos, 0, fill=-1)
        parts = []
        for g in range(LENGTH_GROUPS):
            part = functools.partial(lax.slice_in_dim, start_index=g * size, limit_index=(g + 1) * size)
            parts.append(_attend(part(q_tiles, axis=1), k_pages, v_pages, part(tables, axis=0),
                                 part(row_pos, axis=0), part(kv_end, axis=0), plan, scale))
        out = jnp.concatenate(parts, axis=1)[:, :num_tiles]  # [Hkv, tiles (sorted), rows, D]
        tile = jnp.argsort(order)[tile]  # where each token's tile went in the sorted order
    out = out.reshape(num_kv_heads, num_tiles, tpt, group, head_dim).transpose(1, 2, 0, 3, 4)
    out = out.reshape(num_tiles, tpt, num_q_heads, head_dim)
    out = out[tile, index]
    return jnp.where(is_query[:, None, None], out, 0.0).astype(q.dtype)


def _attend(q_tiles, k_pages, v_pages, tables, row_pos, kv_end, plan, scale):
    """Online-softmax attention of query tiles (q_tiles [Hkv, tiles, rows, D], rows at
    row_pos [tiles, rows], -1 = none) over their pages (tables [tiles, width]), a chunk of
    context at a time up to the longest kv_end [tiles]. Returns [Hkv, tiles, rows, D] float32."""
    num_kv_heads, num_tiles, num_rows, head_dim = q_tiles.shape
    num_blocks = k_pages.shape[1]
    pages, chunk = plan.pages_per_chunk, plan.chunk

    def load(pages_array, i):  # -> [Hkv, tiles, chunk, D]
        ids = lax.dynamic_slice_in_dim(tables, i * pages, pages, axis=1)
        ids = jnp.clip(ids, 0, num_blocks - 1)  # table padding may hold any sentinel
        gathered = pages_array[:, ids].reshape(num_kv_heads, num_tiles, chunk, head_dim)
        return gathered if gathered.dtype == q_tiles.dtype else lax.bitcast_convert_type(gathered, q_tiles.dtype)

    def body(i, carry):
        acc, m_prev, l_prev = carry  # acc [Hkv, tiles, rows, D]; m, l [Hkv, tiles, rows]
        scores = jnp.einsum("htrd,htcd->htrc", q_tiles, load(k_pages, i), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32) * scale
        kv_pos = i * chunk + jnp.arange(chunk)
        visible = kv_pos <= row_pos[:, :, None]  # [tiles, rows, chunk]
        scores = jnp.where(visible, scores, MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(scores - m_next[..., None]), 0.0)
        v = load(v_pages, i)
        update = jnp.einsum("htrc,htcd->htrd", p.astype(v.dtype), v, precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
        return acc * correction[..., None] + update, m_next, l_prev * correction + p.sum(axis=-1)

    stats_shape = (num_kv_heads, num_tiles, num_rows)
    init = (jnp.zeros(stats_shape + (head_dim,), jnp.float32), jnp.full(stats_shape, MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32))
    acc, _, l = lax.fori_loop(0, jnp.max(cdiv(kv_end, chunk)), body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def paged_attention_xla(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None):
    """Decode: the ragged case with one query per sequence."""
    return decode_as_ragged(ragged_paged_attention_xla, q, k_pages, v_pages, block_tables, lengths,
                            sm_scale=sm_scale)
