"""Pure jax.numpy references for every kernel, with the same signatures and results.

They define the semantics the kernels are tested against, and they are the `xla` attention
backend: on a CPU, XLA runs them far faster than the Pallas interpreter runs the kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import shapes
from pallas_kernels.quantization import dequantize, quantize
from pallas_kernels.tiling import decode_as_ragged, sees, soft_capped


def _gather_context(
    pages: jax.Array,  # [Hkv, N, B, D]
    scales: jax.Array | None,  # float32[Hkv, N, B] beside int8 pages, else None
    block_tables: jax.Array,  # int32[S, M]
    dtype,  # the model's dtype
) -> jax.Array:  # [S, Hkv, M * B, D] dtype: each sequence's contiguous context, dequantized
    num_kv_heads, num_blocks, block_size, head_dim = pages.shape
    num_seqs, width = block_tables.shape
    ids = jnp.clip(block_tables, 0, num_blocks - 1)  # the table's padding may hold any sentinel
    context = dequantize(pages[:, ids], None if scales is None else scales[:, ids], dtype)  # [Hkv, S, M, B, D]
    return context.reshape(num_kv_heads, num_seqs, width * block_size, head_dim).transpose(1, 0, 2, 3)


@functools.partial(jax.jit, static_argnames=("sm_scale", "max_q_len", "sliding_window", "soft_cap"))
def ragged_paged_attention_reference(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
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
    """Queries are regrouped per sequence into [num_seqs, max_q_len] (static, default
    num_tokens) and attend causally (within `sliding_window`, see tiling.sees) over the whole
    gathered contexts, scores soft-capped by `soft_cap`: the masks alone keep out blocks
    before a window, whatever they hold. 8-bit pages are dequantized as gathered."""
    shapes.check_attention(q, k_pages, v_pages, block_tables, context_lens, cu_q_lens,
                           sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales,
                           v_scales=v_scales)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_q_heads // num_kv_heads
    q_max = max(1, min(max_q_len or num_tokens, num_tokens))
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    precision = lax.Precision.HIGHEST

    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    offset = jnp.arange(q_max)
    token = cu_q_lens[:-1, None] + offset  # [S, Qmax]
    is_query = offset < q_lens[:, None]
    q_seq = q[jnp.clip(token, 0, num_tokens - 1)]  # [S, Qmax, Hq, D]
    q_seq = q_seq.reshape(*token.shape, num_kv_heads, group, head_dim)

    k = _gather_context(k_pages, k_scales, block_tables, q.dtype)  # [S, Hkv, C, D]
    v = _gather_context(v_pages, v_scales, block_tables, q.dtype)
    scores = jnp.einsum("sqhgd,shcd->shgqc", q_seq, k, precision=precision,
                        preferred_element_type=jnp.float32)
    scores = soft_capped(scores * scale, soft_cap)
    position = context_lens[:, None] - q_lens[:, None] + offset  # [S, Qmax]
    kv_pos = jnp.arange(k.shape[2])
    visible = sees(position[:, :, None], kv_pos, sliding_window) & (kv_pos < context_lens[:, None, None])
    visible = (visible & is_query[:, :, None])[:, None, None]  # [S, 1, 1, Qmax, C]
    scores = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    weights = p / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("shgqc,shcd->sqhgd", weights.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
    out = out.reshape(*token.shape, num_q_heads, head_dim).astype(q.dtype)

    # Scatter back to token order; padding tokens stay zero.
    token = jnp.where(is_query, token, num_tokens)
    return jnp.zeros_like(q).at[token].set(out, mode="drop")


def paged_attention_reference(
    q: jax.Array,  # [num_seqs, num_q_heads, head_dim]
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,
    block_tables: jax.Array,  # int32[num_seqs, max_blocks_per_seq]
    lengths: jax.Array,  # int32[num_seqs]
    *,
    sm_scale: float | None = None,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,
) -> jax.Array:  # [num_seqs, num_q_heads, head_dim]
    """Decode: the ragged case with one query per sequence."""
    return decode_as_ragged(ragged_paged_attention_reference, q, k_pages, v_pages, block_tables, lengths,
                            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                            k_scales=k_scales, v_scales=v_scales)


@functools.partial(jax.jit, donate_argnums=(0, 1, 5, 6))
def write_kv_reference(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,
    slot_mapping: jax.Array,  # int32[num_tokens]: block * block_size + offset, < 0 = skip
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    shapes.check_write(k_pages, v_pages, k, v, slot_mapping, k_scales, v_scales)
    (k, k_new_scales), (v, v_new_scales) = quantize(k, k_pages.dtype), quantize(v, v_pages.dtype)
    return scatter_tokens((k_pages, v_pages, k_scales, v_scales), (k, v, k_new_scales, v_new_scales),
                          slot_mapping)


def scatter_tokens(
    pools: tuple,  # arrays [Hkv, num_blocks, block_size, ...] (pages, scales) or None
    rows: tuple,  # per pool, [num_tokens, Hkv, ...] in its dtype (None for a None pool)
    slot_mapping: jax.Array,  # int32[num_tokens]
) -> tuple:
    """write_kv's scatter, unchecked: each token's rows into its slot of every pool (also the
    xla backend's, on pages of any dtype)."""
    num_blocks, block_size = pools[0].shape[1:3]
    # Out-of-range indices are dropped by the scatter, so padding maps to block num_blocks.
    block = jnp.where(slot_mapping >= 0, slot_mapping // block_size, num_blocks)
    offset = slot_mapping % block_size
    return jax.tree.map(lambda pool, new: pool.at[:, block, offset].set(jnp.swapaxes(new, 0, 1), mode="drop"),
                        pools, rows)


@functools.partial(jax.jit, donate_argnums=(0, 1, 4, 5))
def copy_blocks_reference(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,
    src: jax.Array,  # int32[num_copies]; a negative entry is padding
    dst: jax.Array,  # int32[num_copies]; distinct, and none of them a source
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """A block's scales move with its pages."""
    shapes.check_copy(k_pages, v_pages, src, dst, k_scales, v_scales)
    num_blocks = k_pages.shape[1]
    skip = (src < 0) | (dst < 0)
    src = jnp.clip(src, 0, num_blocks - 1)
    dst = jnp.where(skip, num_blocks, dst)
    return jax.tree.map(lambda pool: pool.at[:, dst].set(pool[:, src], mode="drop"),
                        (k_pages, v_pages, k_scales, v_scales))
