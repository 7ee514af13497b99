"""KV-cache writes and block copies, in place on the donated page pools.

`write_kv` is the paper's fused reshape-and-write: the new tokens' K/V ([tokens, heads, dim])
go straight into their slots of the paged layout, quantized first when the pages are 8-bit
(quantization.py). `copy_blocks` is the fused block copy behind copy-on-write: one launch for
every (src, dst) pair of a step. Both alias their outputs to the page pools
(`input_output_aliases`) and the public functions donate them, so XLA updates the cache in
place instead of copying gigabytes.

Both kernels move *pools*: arrays [num_kv_heads, num_blocks, block_size, ...] addressed by
block and slot. The K and V pages are two; int8 pages bring their scales
[num_kv_heads, num_blocks, block_size] as two more, written and copied by the same loop, so a
block's scales always travel with its pages.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import shapes
from pallas_kernels.platform import resolve_interpret, triton_params
from pallas_kernels.quantization import quantize
from pallas_kernels.tiling import head_dim_pieces

TOKENS_PER_PROGRAM = 16
COPY_ROWS = 64  # page rows moved per copy program


def _columns(pool_ref, pieces: tuple[tuple[int, int], ...]) -> list[tuple]:
    """How a slot of a pool is moved: pages [num_blocks, block_size, head_dim] in power-of-two
    column pieces (Triton tensors), scales [num_blocks, block_size] whole (no column index)."""
    return [(pl.ds(c0, dc),) for c0, dc in pieces] if pool_ref.ndim == 3 else [()]


def _per_head(shape: tuple[int, ...]) -> pl.BlockSpec:
    """One KV head's slice of an array [num_kv_heads, ...], whatever the grid point."""
    return pl.BlockSpec((None, *shape[1:]), lambda h, *_: (h,) + (0,) * (len(shape) - 1))


def _write_kernel(
    slots_ref,  # int32[num_tokens_padded]
    rows_refs,  # per pool, this KV head's new rows: [num_tokens_padded, head_dim] or [num_tokens_padded]
    pools_in,  # per pool, [num_blocks, block_size, head_dim] or [num_blocks, block_size]; aliased to pools
    *pools,  # the same pools, written
    block_size: int,
    pieces: tuple[tuple[int, int], ...],
):
    del pools_in  # the outputs alias them; untouched slots keep their values
    first = pl.program_id(1) * TOKENS_PER_PROGRAM

    def write_token(i, _):
        token = first + i
        slot = slots_ref[token]

        @pl.when(slot >= 0)  # negative slots are padding
        def _():
            block, offset = slot // block_size, slot % block_size
            for rows_ref, pool_ref in zip(rows_refs, pools):
                for cols in _columns(pool_ref, pieces):
                    pool_ref[block, pl.ds(offset, 1), *cols] = rows_ref[pl.ds(token, 1), *cols]

    lax.fori_loop(0, TOKENS_PER_PROGRAM, write_token, None)


@functools.partial(jax.jit, donate_argnums=(0, 1, 5, 6), static_argnames=("interpret",))
def write_kv(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # int32[num_tokens]: block * block_size + offset; < 0 skips
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Write each token's K/V, quantized to the pages' dtype, into its cache slot; returns the
    updated (k_pages, v_pages, k_scales, v_scales), the scales None as given for pages without."""
    shapes.check_write(k_pages, v_pages, k, v, slot_mapping, k_scales, v_scales)
    shapes.check_pallas_shapes(k_pages.shape[3], k_pages.shape[2])
    num_kv_heads, _, block_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    padded = pl.cdiv(num_tokens, TOKENS_PER_PROGRAM) * TOKENS_PER_PROGRAM
    slots = jnp.pad(slot_mapping.astype(jnp.int32), (0, padded - num_tokens), constant_values=-1)
    (k, k_new_scales), (v, v_new_scales) = quantize(k, k_pages.dtype), quantize(v, v_pages.dtype)
    pools, structure = jax.tree.flatten((k_pages, v_pages, k_scales, v_scales))  # the Nones dropped
    # [T, Hkv, ...] -> [Hkv, T_padded, ...]: one head's tokens are contiguous rows.
    rows = [jnp.pad(jnp.swapaxes(x, 0, 1), [(0, 0), (0, padded - num_tokens)] + [(0, 0)] * (x.ndim - 2))
            for x in jax.tree.leaves((k, v, k_new_scales, v_new_scales))]
    pool_specs = [_per_head(pool.shape) for pool in pools]
    kernel = functools.partial(_write_kernel, block_size=block_size, pieces=head_dim_pieces(head_dim))
    written = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, padded // TOKENS_PER_PROGRAM),
        in_specs=[pl.BlockSpec((padded,), lambda h, i: (0,)), [_per_head(x.shape) for x in rows], pool_specs],
        out_specs=pool_specs,
        out_shape=[jax.ShapeDtypeStruct(pool.shape, pool.dtype) for pool in pools],
        input_output_aliases={1 + len(rows) + i: i for i in range(len(pools))},
        interpret=resolve_interpret(interpret),
        compiler_params=triton_params(num_warps=1, num_stages=1),
        name="write_kv",
    )(slots, rows, pools)
    return jax.tree.unflatten(structure, written)


def _copy_kernel(
    src_ref,  # int32[num_copies]
    dst_ref,  # int32[num_copies]
    pools_in,  # per pool, [num_blocks, block_size, head_dim] or [num_blocks, block_size]; aliased to pools
    *pools,  # the same pools, written
    rows: int,
    pieces: tuple[tuple[int, int], ...],
):
    pair = pl.program_id(1)
    src, dst = src_ref[pair], dst_ref[pair]
    page_rows = pl.ds(pl.program_id(2) * rows, rows)

    @pl.when((src >= 0) & (dst >= 0))  # negative ids are padding
    def _():
        for pool_in, pool in zip(pools_in, pools):
            for cols in _columns(pool, pieces):
                pool[dst, page_rows, *cols] = pool_in[src, page_rows, *cols]


@functools.partial(jax.jit, donate_argnums=(0, 1, 4, 5), static_argnames=("interpret",))
def copy_blocks(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    src: jax.Array,  # int32[num_copies]; a negative entry is padding
    dst: jax.Array,  # int32[num_copies]; distinct, and none of them a source
    k_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jax.Array | None = None,  # float32[num_kv_heads, num_blocks, block_size]
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """Copy whole blocks src[i] -> dst[i] in every KV head, scales with their pages; returns
    the updated (k_pages, v_pages, k_scales, v_scales)."""
    shapes.check_copy(k_pages, v_pages, src, dst, k_scales, v_scales)
    num_kv_heads, _, block_size, head_dim = k_pages.shape
    shapes.check_pallas_shapes(head_dim, block_size)
    rows = min(block_size, COPY_ROWS)
    pools, structure = jax.tree.flatten((k_pages, v_pages, k_scales, v_scales))  # the Nones dropped
    pool_specs = [_per_head(pool.shape) for pool in pools]
    ids = pl.BlockSpec((src.shape[0],), lambda h, i, r: (0,))
    kernel = functools.partial(_copy_kernel, rows=rows, pieces=head_dim_pieces(head_dim))
    copied = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, src.shape[0], block_size // rows),
        in_specs=[ids, ids, pool_specs],
        out_specs=pool_specs,
        out_shape=[jax.ShapeDtypeStruct(pool.shape, pool.dtype) for pool in pools],
        input_output_aliases={2 + i: i for i in range(len(pools))},
        interpret=resolve_interpret(interpret),
        compiler_params=triton_params(num_warps=4, num_stages=1),
        name="copy_blocks",
    )(src.astype(jnp.int32), dst.astype(jnp.int32), pools)
    return jax.tree.unflatten(structure, copied)
