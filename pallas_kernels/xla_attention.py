"""The `xla` backend's ragged paged attention: the kernel's tiled algorithm in jax.numpy.

The dense reference (reference.py) gathers every sequence's whole block table and lays
queries out as [num_seqs, max_q_len]: obviously right, and the oracle, but it reads the full
table width for every sequence and grows with num_seqs x max_q_len. Here all query tiles (the
same tiles as the Pallas kernel, see tiling.py) advance together through their contexts one
chunk of pages at a time with an online softmax, each from its own context_start (see
tiling.py), so a step reads about as much K/V as its tiles actually see, whatever max_q_len
is and however long a sequence with a sliding window has grown. In a step that mixes prompts
with decoding sequences, the decoding ones get tiles of one token of their own (on a CPU a
tile's empty rows cost as much as full ones). XLA compiles it for any device; on a CPU it is
the fast backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import reference, shapes
from pallas_kernels.quantization import dequantize, quantize
from pallas_kernels.tiling import (
    MASK_VALUE,
    TilePlan,
    cdiv,
    context_start,
    decode_as_ragged,
    padded_block_tables,
    plan_tiles,
    sees,
    soft_capped,
    tile_metadata,
)

CHUNK_TOKENS = 32  # measured on a 2-core CPU: 16-64 similar, 128 is 2-4x slower (cache misses)
# Tiles are sorted by how much context they read and attended a batch at a time, each batch
# looping only as long as its own longest; a full call makes about LENGTH_GROUPS batches (a
# batch of 48 decodes with ShareGPT-like lengths: 2.3x faster attention than one batch; lengths
# all alike: 1.2x slower, from the extra loops; measured on a 2-core CPU with 2, 4 and 8), and
# a batch holds at most TILES_PER_BATCH tiles (decodes of 100-200 tokens in a bucket of 128
# to 256: 1.2-1.4x faster than batches of a quarter of them, smaller buckets alike; presumably
# a smaller batch's gathered K/V stays in cache: experiments/results/mixed_attention_batch_cpu.md).
# Small calls keep one batch.
LENGTH_GROUPS = 4
TILES_PER_BATCH = 16
MIN_TILES_TO_GROUP = 16
# bfloat16 and float8_e4m3fn pages are stored as their bits. XLA's CPU scatter widens a
# bfloat16 operand to float32 and back, the whole cache for a write of a few tokens (48 ms a
# step for a 64 MiB cache, against 0.05 ms for uint16 or float32); a bitcast of the donated
# cache inside the step copies it too (26 ms). So the cache is made uint16, writes bitcast the
# new tokens and reads bitcast the pages they gather (experiments/results/dtype_cpu.md).
# float8 is widened the same way, to float16 (the compiled scatter shows it; a write takes
# thousands of times a uint8 one), so float8_e4m3fn, vLLM's "fp8", is stored as uint8. uint8
# can name only one format: float8_e5m2 pages stay float8_e5m2 here, and their writes pay the
# widening.
STORED_AS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16), jnp.dtype(jnp.float8_e4m3fn): jnp.dtype(jnp.uint8)}
HELD_IN = {stored: held for held, stored in STORED_AS.items()}


def page_dtype(dtype) -> jnp.dtype:
    """The dtype this backend's pages are stored as, for pages holding dtype (the model's
    dtype, or an 8-bit one: quantization.py)."""
    return STORED_AS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def _held(pages) -> jax.ShapeDtypeStruct:
    """The pages as they are meant (a view for the shape checks and dtype choices)."""
    return jax.ShapeDtypeStruct(pages.shape, HELD_IN.get(pages.dtype, pages.dtype))


def _reinterpret(x: jax.Array, dtype) -> jax.Array:
    """x's bits as dtype (bits stored for a value, or back)."""
    return x if x.dtype == dtype else lax.bitcast_convert_type(x, dtype)


@functools.partial(jax.jit, donate_argnums=(0, 1, 5, 6))
def write_kv_xla(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim], page_dtype(pages' format)
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # int32[num_tokens]: block * block_size + offset, < 0 = skip
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """write_kv on pages held as themselves or as their bits (STORED_AS)."""
    held = _held(k_pages)
    shapes.check_write(held, _held(v_pages), k, v, slot_mapping, k_scales, v_scales)
    (k, k_new_scales), (v, v_new_scales) = quantize(k, held.dtype), quantize(v, held.dtype)
    rows = (_reinterpret(k, k_pages.dtype), _reinterpret(v, v_pages.dtype), k_new_scales, v_new_scales)
    return reference.scatter_tokens((k_pages, v_pages, k_scales, v_scales), rows, slot_mapping)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_q_len", "sliding_window", "soft_cap"))
def ragged_paged_attention_xla(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim], page_dtype(pages' format)
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    context_lens: jax.Array,  # int32[num_seqs]
    cu_q_lens: jax.Array,  # int32[num_seqs + 1]
    *,
    sm_scale: float | None = None,
    max_q_len: int | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim]
    shapes.check_attention(q, _held(k_pages), _held(v_pages), block_tables, context_lens, cu_q_lens,
                           sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales,
                           v_scales=v_scales)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pages.shape
    num_seqs = block_tables.shape[0]
    plan_for = functools.partial(
        plan_tiles, num_tokens=num_tokens, group=num_q_heads // num_kv_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, max_context=block_tables.shape[1] * block_size, min_rows=1,
        chunk=max(block_size, CHUNK_TOKENS), num_splits=1,
    )
    plan = plan_for(num_seqs=num_seqs, max_q_len=max_q_len or num_tokens)
    attend = functools.partial(
        _attend_plan, q, (k_pages, k_scales), (v_pages, v_scales), block_tables, context_lens, cu_q_lens,
        scale=1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if plan.tokens_per_tile == 1:
        return attend(plan).astype(q.dtype)
    # A step that mixes prompts with sequences decoding one token: a tile of `plan` would give
    # each of those a whole tile's rows for its one token (a step of 160 decodes and 3 prompts
    # took 3.5-4.5x the time of the two apart, experiments/results/mixed_attention_cpu.md). So
    # they get tiles of one token of their own, and the others (at most half the tokens) the
    # plan's tiles.
    single = cu_q_lens[1:] - cu_q_lens[:-1] == 1  # bool[num_seqs]
    many = plan_for(num_seqs=min(num_seqs, num_tokens // 2), max_q_len=max_q_len or num_tokens)
    out = attend(plan_for(num_seqs=num_seqs, max_q_len=1), single) + attend(many, ~single)
    return out.astype(q.dtype)


def _attend_plan(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_cache: tuple,  # (pages [Hkv, num_blocks, block_size, D] as stored, float32[Hkv, num_blocks, block_size] | None)
    v_cache: tuple,  # (pages, scales) likewise
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    context_lens: jax.Array,  # int32[num_seqs]
    cu_q_lens: jax.Array,  # int32[num_seqs + 1]
    plan: TilePlan,
    owned: jax.Array | None = None,  # bool[num_seqs]: the sequences plan's tiles hold; None = all
    **options,  # scale, sliding_window, soft_cap: see _attend
) -> jax.Array:  # [num_tokens, num_q_heads, head_dim] float32, zeros for tokens the tiles do not hold
    """Attention of the query tokens that plan's tiles hold. The tiles are sorted by how much
    context they read, longest first, and attended a batch at a time, each batch looping only
    as long as its own longest: a batch of mostly short sequences does not pay for the longest
    one everywhere. The loop stops at the last batch with work, so the tiles a bucket has
    beyond its step's sequences cost nothing (a mixed step's plan bounds its tiles by many
    more sequences than it has), and each batch gathers its own queries and scatters its own
    results. Few tiles are attended together, unsorted."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, group, tpt = k_cache[0].shape[0], plan.group, plan.tokens_per_tile
    tiles, _ = tile_metadata(cu_q_lens, context_lens, plan, owned)
    seq, first_token, num_q, first_pos = tiles.T  # each [tiles]
    kv_end = jnp.where(num_q > 0, first_pos + num_q, 0)
    kv_start = jnp.where(num_q > 0, context_start(first_pos, options["sliding_window"], plan.chunk), 0)
    tables = padded_block_tables(block_tables, plan)  # [num_seqs, width]
    offset = jnp.arange(tpt)

    def attend(ids, out):  # tiles ids [n]: their tokens' attention written into out [T, Hq, D]
        token = jnp.clip(first_token[ids, None] + offset, 0, num_tokens - 1)  # [n, tpt]
        # Rows (token, head-in-group) of each tile, KV heads leading: [Hkv, n, tpt * G, D].
        q_tiles = q[token].reshape(-1, tpt, num_kv_heads, group, head_dim).transpose(2, 0, 1, 3, 4)
        q_tiles = q_tiles.reshape(num_kv_heads, -1, tpt * group, head_dim)
        is_query = offset < num_q[ids, None]  # [n, tpt]
        row_pos = jnp.repeat(jnp.where(is_query, first_pos[ids, None] + offset, -1), group, axis=1)
        done = _attend(q_tiles, tables[seq[ids]], row_pos, kv_start[ids], kv_end[ids], k_cache=k_cache,
                       v_cache=v_cache, plan=plan, **options)  # [Hkv, n, rows, D]
        done = done.reshape(num_kv_heads, -1, tpt, group, head_dim).transpose(1, 2, 0, 3, 4)
        rows = jnp.where(is_query, token, num_tokens)  # rows past a tile's tokens go nowhere
        return out.at[rows].set(done.reshape(-1, tpt, num_q_heads, head_dim), mode="drop")

    out = jnp.zeros(q.shape, jnp.float32)
    num_tiles = plan.num_tiles
    if num_tiles < MIN_TILES_TO_GROUP:
        return attend(jnp.arange(num_tiles), out)
    batch = min(cdiv(min(num_tiles, cdiv(num_tokens, tpt)), LENGTH_GROUPS), TILES_PER_BATCH)
    order = jnp.argsort(kv_start - kv_end)  # longest first; empty tiles last

    def run(b, out):  # the last batch may start before the previous one ended (dynamic_slice
        # stays in range): its tiles are attended again, and write the same results
        return attend(lax.dynamic_slice_in_dim(order, b * batch, batch), out)

    return lax.fori_loop(0, cdiv(jnp.count_nonzero(num_q), batch), run, out)


def _attend(
    q_tiles: jax.Array,  # [Hkv, tiles, rows, D]
    tables: jax.Array,  # int32[tiles, width]: each tile's sequence's block table
    row_pos: jax.Array,  # int32[tiles, rows]: each row's query position, -1 = none
    kv_start: jax.Array,  # int32[tiles]: each tile's context_start, a multiple of plan.chunk
    kv_end: jax.Array,  # int32[tiles]: one past each tile's last query position
    *,
    k_cache: tuple,  # (pages [Hkv, num_blocks, block_size, D] as stored, float32[Hkv, num_blocks, block_size] | None)
    v_cache: tuple,  # (pages, scales) likewise
    plan: TilePlan,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:  # [Hkv, tiles, rows, D] float32
    """Online-softmax attention of query tiles over their pages, a chunk of context at a time.
    Step i reads chunk i of every tile counted from the tile's own kv_start, and the loop runs
    as many steps as the tile with the most context to read needs. Each chunk is dequantized
    as it is gathered."""
    num_kv_heads, num_tiles, num_rows, head_dim = q_tiles.shape
    num_blocks, block_size = k_cache[0].shape[1:3]
    pages, chunk = plan.pages_per_chunk, plan.chunk
    first_page = kv_start // block_size  # [tiles]
    tile = jnp.arange(num_tiles)[:, None]

    def load(cache, i):  # -> [Hkv, tiles, chunk, D] q's dtype
        stored, scales = cache
        page = jnp.minimum(first_page[:, None] + i * pages + jnp.arange(pages), tables.shape[1] - 1)
        ids = jnp.clip(tables[tile, page], 0, num_blocks - 1)  # table padding may hold any sentinel
        gathered = _reinterpret(stored[:, ids], _held(stored).dtype).reshape(num_kv_heads, num_tiles, chunk, head_dim)
        if scales is not None:
            scales = scales[:, ids].reshape(num_kv_heads, num_tiles, chunk)
        return dequantize(gathered, scales, q_tiles.dtype)

    def body(i, carry):
        acc, m_prev, l_prev = carry  # acc [Hkv, tiles, rows, D]; m, l [Hkv, tiles, rows]
        scores = jnp.einsum("htrd,htcd->htrc", q_tiles, load(k_cache, i), precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
        kv_pos = kv_start[:, None] + i * chunk + jnp.arange(chunk)  # [tiles, chunk]
        visible = sees(row_pos[:, :, None], kv_pos[:, None, :], sliding_window)  # [tiles, rows, chunk]
        scores = jnp.where(visible, soft_capped(scores * scale, soft_cap), MASK_VALUE)
        m_next = jnp.maximum(m_prev, scores.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(visible, jnp.exp(scores - m_next[..., None]), 0.0)
        v = load(v_cache, i)
        update = jnp.einsum("htrc,htcd->htrd", p.astype(v.dtype), v, precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
        return acc * correction[..., None] + update, m_next, l_prev * correction + p.sum(axis=-1)

    stats_shape = (num_kv_heads, num_tiles, num_rows)
    init = (jnp.zeros(stats_shape + (head_dim,), jnp.float32), jnp.full(stats_shape, MASK_VALUE, jnp.float32),
            jnp.zeros(stats_shape, jnp.float32))
    acc, _, l = lax.fori_loop(0, jnp.max(cdiv(kv_end - kv_start, chunk)), body, init)
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def paged_attention_xla(
    q: jax.Array,  # [num_seqs, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim], page_dtype(pages' format)
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    lengths: jax.Array,  # int32[num_seqs]: context length including the current token
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,
) -> jax.Array:  # [num_seqs, num_q_heads, head_dim]
    """Decode: the ragged case with one query per sequence."""
    return decode_as_ragged(ragged_paged_attention_xla, q, k_pages, v_pages, block_tables, lengths,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                            k_scales=k_scales, v_scales=v_scales)
