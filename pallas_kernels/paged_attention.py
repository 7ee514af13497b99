"""Paged attention: query tokens attend to a KV cache stored in fixed-size pages.

One Pallas kernel serves every case. Queries of many sequences are concatenated (ragged);
each sequence reads its context through its block table (logical page -> physical page) and
its queries are causal over that context: query i of a sequence with `q_len` new tokens and
`context_len` cached tokens sits at position `context_len - q_len + i`. Prefill, chunked
prefill, prompts with a cached prefix and decode (`q_len = 1`) are the same computation,
so `paged_attention` (decode) is `ragged_paged_attention` with one query per sequence.
A sliding window narrows what a query sees to its last `sliding_window` positions, and
`soft_cap` bounds the scores (Gemma 2); see tiling.sees and tiling.soft_capped.

Work is split into *query tiles*: up to `tokens_per_tile` consecutive tokens of one sequence,
with all the query heads that share one KV head (GQA/MQA), flattened into `block_rows` rows
so that the matrix unit sees at least 16 rows even for one decode token. The grid is
(query tile, KV head, context partition). Long contexts with few tiles are split over
partitions (split-K) whose partial results are merged by their log-sum-exp. Partitions count
from the tile's context_start (tiling.py): with a window, chunks before it are never read, and
the partitions split the window rather than the whole sequence.

Each program walks its partition in chunks of `chunk` tokens. A chunk is `chunk // page`
whole pages gathered through the block table (small pages are grouped so products see >= 16
rows) or a slice of one page (pages larger than a chunk). Head dims that are not a power of
two (80, 96) are processed as power-of-two column pieces (64 + 16, 64 + 32): Triton tensors
must have power-of-two sizes, and splitting the contraction is exact where padding is not free.

8-bit pages (quantization.py) are dequantized chunk by chunk as the program loads them, in
registers; int8 pages bring their scales in the same pages-and-rows gather.

GPU Pallas has no scalar prefetch, so each program reads its tile's metadata and the block
table from memory inside the kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import shapes
from pallas_kernels.platform import resolve_interpret, triton_params
from pallas_kernels.quantization import dequantize
from pallas_kernels.tiling import (
    MASK_VALUE,
    TilePlan,
    context_start,
    decode_as_ragged,
    merge_partitions,
    padded_block_tables,
    plan_tiles,
    sees,
    soft_capped,
    tile_metadata,
    token_tiles,
)


def attention_plan(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    *,
    max_q_len: int | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    sliding_window: int | None = None,
) -> TilePlan:
    """The tiling `ragged_paged_attention` uses for these shapes (for benchmarks and tests)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pages.shape
    num_seqs, table_width = block_tables.shape
    return plan_tiles(
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        max_q_len=max_q_len or num_tokens,
        group=num_q_heads // num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        max_context=table_width * block_size,
        chunk=block_kv,
        num_splits=num_splits,
        sliding_window=sliding_window,
    )


def _attention_kernel(
    tiles_ref,  # int32[num_tiles, 4]: (seq, first token, tokens in tile, position of first token)
    block_tables_ref,  # int32[num_seqs, table_width]
    q_ref,  # [q_rows_padded, head_dim]  this KV head's query rows, (token, group head) flattened
    k_pages_ref,  # [num_blocks, block_size, head_dim]  this KV head's pages
    v_pages_ref,  # [num_blocks, block_size, head_dim]
    k_scales_ref,  # float32[num_blocks, block_size]  beside int8 pages; else None
    v_scales_ref,  # float32[num_blocks, block_size]  beside int8 pages; else None
    o_ref,  # [block_rows, head_dim]  float32 when split, else q's dtype
    lse_ref,  # [block_rows]  float32 log-sum-exp of each row's scores in this partition
    *,
    plan: TilePlan,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    num_blocks: int,
    block_size: int,
    precision: lax.Precision,
):
    tile, split = pl.program_id(0), pl.program_id(2)
    seq = tiles_ref[tile, 0]
    row0 = tiles_ref[tile, 1] * plan.group
    num_q = tiles_ref[tile, 2]
    first_pos = tiles_ref[tile, 3]
    rows = plan.block_rows

    # Row r holds token r // group of the tile; rows past the tile's tokens attend to nothing.
    token = lax.broadcasted_iota(jnp.int32, (rows,), 0) // plan.group
    row_pos = jnp.where(token < num_q, first_pos + token, -1)  # [rows]
    kv_end = jnp.where(num_q > 0, first_pos + num_q, 0)
    start = context_start(first_pos, sliding_window, plan.chunk) + split * plan.partition
    stop = jnp.minimum(start + plan.partition, kv_end)
    num_chunks = pl.cdiv(jnp.maximum(stop - start, 0), plan.chunk)

    q_rows = pl.ds(row0, rows)
    q = [q_ref[q_rows, pl.ds(c0, dc)] for c0, dc in plan.pieces]  # [rows, dc] each

    def chunk_slots(first):  # the chunk from position `first`: its pages and rows within them
        ids = block_tables_ref[seq, pl.ds(first // block_size, plan.pages_per_chunk)]  # [pages_per_chunk]
        ids = jnp.clip(ids, 0, num_blocks - 1)  # table padding may hold any sentinel
        return ids, pl.ds(first % block_size, plan.page_rows)

    def load_scales(scales_ref, slots):  # -> float32[chunk], or None for pages without scales
        ids, rows_in_page = slots
        return None if scales_ref is None else scales_ref[ids, rows_in_page].reshape(plan.chunk)

    def load_chunk(pages_ref, scales, slots, c0, dc):  # -> [chunk, dc] q's dtype
        ids, rows_in_page = slots
        stored = pages_ref[ids, rows_in_page, pl.ds(c0, dc)].reshape(plan.chunk, dc)
        return dequantize(stored, scales, q_ref.dtype)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        first = start + i * plan.chunk
        slots = chunk_slots(first)
        k_scales = load_scales(k_scales_ref, slots)
        scores = sum(
            lax.dot_general(
                qp,
                load_chunk(k_pages_ref, k_scales, slots, c0, dc),
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            for qp, (c0, dc) in zip(q, plan.pieces)
        )  # [rows, chunk]
        kv_pos = first + lax.broadcasted_iota(jnp.int32, (rows, plan.chunk), 1)
        visible = sees(row_pos[:, None], kv_pos, sliding_window) & (kv_pos < stop)
        scores = jnp.where(visible, soft_capped(scores * sm_scale, soft_cap), MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(scores - m_next[:, None]), 0.0)  # [rows, chunk]
        l_next = l_prev * correction + p.sum(axis=1)
        v_scales = load_scales(v_scales_ref, slots)
        acc = [
            a * correction[:, None]
            + lax.dot_general(
                p.astype(q_ref.dtype),
                load_chunk(v_pages_ref, v_scales, slots, c0, dc),
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )
            for a, (c0, dc) in zip(acc, plan.pieces)
        ]
        return acc, m_next, l_next

    acc0 = [jnp.zeros((rows, dc), jnp.float32) for _, dc in plan.pieces]
    m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    acc, m, l = lax.fori_loop(0, num_chunks, body, (acc0, m0, l0))

    nonempty = l > 0.0
    inv_l = jnp.where(nonempty, 1.0 / jnp.where(nonempty, l, 1.0), 0.0)
    for a, (c0, dc) in zip(acc, plan.pieces):
        o_ref[:, pl.ds(c0, dc)] = (a * inv_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), MASK_VALUE)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "max_q_len", "sliding_window", "soft_cap", "block_kv", "num_splits",
                     "interpret", "num_warps", "num_stages"),
)
def ragged_paged_attention(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    context_lens: jax.Array,  # int32[num_seqs]: cached tokens, this step's included
    cu_q_lens: jax.Array,  # int32[num_seqs + 1]: query token offsets of each sequence
    *,
    sm_scale: float | None = None,
    max_q_len: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    """Causal attention of ragged query tokens over their sequences' paged contexts.

    `max_q_len` (static) bounds any sequence's query count and sizes the tiles; the default,
    num_tokens, is always safe. Tokens past `cu_q_lens[-1]` are padding and return zeros.
    With `sliding_window`, table entries of blocks wholly before a tile's context_start may
    name any block (freed, reused, a sentinel): they are never read.
    `block_kv` (context tokens per step) and `num_splits` (split-K partitions) default to
    choices made from the shapes. Pages may be 8-bit (quantization.py): int8 pages need their
    k_scales and v_scales.
    """
    shapes.check_attention(q, k_pages, v_pages, block_tables, context_lens, cu_q_lens,
                           sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales,
                           v_scales=v_scales)
    shapes.check_pallas_shapes(q.shape[-1], k_pages.shape[2])
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    plan = attention_plan(q, k_pages, block_tables, max_q_len=max_q_len, block_kv=block_kv,
                          num_splits=num_splits, sliding_window=sliding_window)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)

    tiles, tile_start = tile_metadata(cu_q_lens, context_lens, plan)
    block_tables = padded_block_tables(block_tables, plan)
    # [T, Hq, D] -> [Hkv, T * group (+ one tile of padding), D]: a tile is a contiguous row range.
    q_rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(num_kv_heads, num_tokens * group, head_dim)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, plan.block_rows), (0, 0)))

    split = plan.num_splits > 1
    out_dtype = jnp.float32 if split else q.dtype
    out_shape = (plan.num_splits, num_kv_heads, plan.num_tiles, plan.block_rows)
    kernel = functools.partial(
        _attention_kernel,
        plan=plan,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap),
        num_blocks=num_blocks,
        block_size=block_size,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT,
    )
    whole = lambda *block: pl.BlockSpec(block, lambda t, h, s: (0,) * len(block))  # noqa: E731
    per_head = lambda *block: pl.BlockSpec(block, lambda t, h, s: (h,) + (0,) * (len(block) - 1))  # noqa: E731
    scales = None if k_scales is None else per_head(None, num_blocks, block_size)
    o, lse = pl.pallas_call(
        kernel,
        grid=(plan.num_tiles, num_kv_heads, plan.num_splits),
        in_specs=[
            whole(*tiles.shape),
            whole(*block_tables.shape),
            per_head(None, *q_rows.shape[1:]),
            per_head(None, num_blocks, block_size, head_dim),
            per_head(None, num_blocks, block_size, head_dim),
            scales,
            scales,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, plan.block_rows, head_dim), lambda t, h, s: (s, h, t, 0, 0)),
            pl.BlockSpec((None, None, None, plan.block_rows), lambda t, h, s: (s, h, t, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(out_shape + (head_dim,), out_dtype),
            jax.ShapeDtypeStruct(out_shape, jnp.float32),
        ],
        interpret=resolve_interpret(interpret),
        compiler_params=triton_params(num_warps, num_stages),
        name=f"ragged_paged_attention_rows{plan.block_rows}_chunk{plan.chunk}",
    )(tiles, block_tables, q_rows, k_pages, v_pages, k_scales, v_scales)
    o = merge_partitions(o, lse).astype(q.dtype) if split else o[0]  # [Hkv, tiles, rows, D]

    # Gather each token's group rows back out of its tile.
    tile, index, is_query = token_tiles(cu_q_lens, tile_start, plan, num_tokens)
    flat = (tile * plan.block_rows + index * group)[:, None] + jnp.arange(group)  # [T, group]
    flat = jnp.clip(flat, 0, plan.num_tiles * plan.block_rows - 1)
    o = o.reshape(num_kv_heads, plan.num_tiles * plan.block_rows, head_dim)[:, flat]
    o = o.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(is_query[:, None, None], o, jnp.zeros((), q.dtype))


def paged_attention(
    q: jax.Array,  # [num_seqs, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    lengths: jax.Array,  # int32[num_seqs]: context length including the current token
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]
) -> jax.Array:  # [num_seqs, num_q_heads, head_dim]
    """Decode attention: one query token per sequence over its paged context."""
    return decode_as_ragged(
        ragged_paged_attention, q, k_pages, v_pages, block_tables, lengths,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, block_kv=block_kv,
        num_splits=num_splits, interpret=interpret, num_warps=num_warps, num_stages=num_stages,
        k_scales=k_scales, v_scales=v_scales,
    )
