"""KV-cache writes and block copies, in place on the donated page pools.

`write_kv` is the paper's fused reshape-and-write: the new tokens' K/V ([tokens, heads, dim])
go straight into their slots of the paged layout. `copy_blocks` is the fused block copy behind
copy-on-write: one launch for every (src, dst) pair of a step. Both alias their outputs to the
page pools (`input_output_aliases`) and the public functions donate them, so XLA updates the
cache in place instead of copying gigabytes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import shapes
from pallas_kernels.platform import resolve_interpret, triton_params
from pallas_kernels.tiling import head_dim_pieces

TOKENS_PER_PROGRAM = 16
COPY_ROWS = 64  # page rows moved per copy program


def _write_kernel(
    slots_ref,  # int32[num_tokens_padded]
    k_ref,  # [num_tokens_padded, head_dim]  this KV head's new keys
    v_ref,  # [num_tokens_padded, head_dim]
    k_pages_in,  # [num_blocks, block_size, head_dim]  aliased to k_pages_ref
    v_pages_in,  # [num_blocks, block_size, head_dim]  aliased to v_pages_ref
    k_pages_ref,  # [num_blocks, block_size, head_dim]
    v_pages_ref,  # [num_blocks, block_size, head_dim]
    *,
    block_size: int,
    pieces: tuple[tuple[int, int], ...],
):
    del k_pages_in, v_pages_in  # the outputs alias them; untouched slots keep their values
    first = pl.program_id(1) * TOKENS_PER_PROGRAM

    def write_token(i, _):
        token = first + i
        slot = slots_ref[token]

        @pl.when(slot >= 0)  # negative slots are padding
        def _():
            block, offset = slot // block_size, slot % block_size
            for c0, dc in pieces:
                cols = pl.ds(c0, dc)
                k_pages_ref[block, pl.ds(offset, 1), cols] = k_ref[pl.ds(token, 1), cols]
                v_pages_ref[block, pl.ds(offset, 1), cols] = v_ref[pl.ds(token, 1), cols]

    lax.fori_loop(0, TOKENS_PER_PROGRAM, write_token, None)


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("interpret",))
def write_kv(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    k: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    v: jax.Array,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # int32[num_tokens]: block * block_size + offset; < 0 skips
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write each token's K/V into its cache slot; returns the updated (k_pages, v_pages)."""
    shapes.check_write(k_pages, v_pages, k, v, slot_mapping)
    shapes.check_pallas_shapes(k_pages.shape[3], k_pages.shape[2])
    num_kv_heads, num_blocks, block_size, head_dim = k_pages.shape
    num_tokens = k.shape[0]
    padded = pl.cdiv(num_tokens, TOKENS_PER_PROGRAM) * TOKENS_PER_PROGRAM
    slots = jnp.pad(slot_mapping.astype(jnp.int32), (0, padded - num_tokens), constant_values=-1)
    # [T, Hkv, D] -> [Hkv, T_padded, D]: one head's tokens are contiguous rows.
    k, v = (jnp.pad(x.astype(k_pages.dtype).transpose(1, 0, 2), ((0, 0), (0, padded - num_tokens), (0, 0)))
            for x in (k, v))
    pages = pl.BlockSpec((None, num_blocks, block_size, head_dim), lambda h, i: (h, 0, 0, 0))
    rows = pl.BlockSpec((None, padded, head_dim), lambda h, i: (h, 0, 0))
    kernel = functools.partial(_write_kernel, block_size=block_size, pieces=head_dim_pieces(head_dim))
    return pl.pallas_call(
        kernel,
        grid=(num_kv_heads, padded // TOKENS_PER_PROGRAM),
        in_specs=[pl.BlockSpec((padded,), lambda h, i: (0,)), rows, rows, pages, pages],
        out_specs=[pages, pages],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        interpret=resolve_interpret(interpret),
        compiler_params=triton_params(num_warps=1, num_stages=1),
        name="write_kv",
    )(slots, k, v, k_pages, v_pages)


def _copy_kernel(
    src_ref,  # int32[num_copies]
    dst_ref,  # int32[num_copies]
    k_pages_in,  # [num_blocks, block_size, head_dim]  aliased to k_pages_ref
    v_pages_in,  # [num_blocks, block_size, head_dim]  aliased to v_pages_ref
    k_pages_ref,  # [num_blocks, block_size, head_dim]
    v_pages_ref,  # [num_blocks, block_size, head_dim]
    *,
    rows: int,
    pieces: tuple[tuple[int, int], ...],
):
    pair = pl.program_id(1)
    src, dst = src_ref[pair], dst_ref[pair]
    page_rows = pl.ds(pl.program_id(2) * rows, rows)

    @pl.when((src >= 0) & (dst >= 0))  # negative ids are padding
    def _():
        for c0, dc in pieces:
            cols = pl.ds(c0, dc)
            k_pages_ref[dst, page_rows, cols] = k_pages_in[src, page_rows, cols]
            v_pages_ref[dst, page_rows, cols] = v_pages_in[src, page_rows, cols]


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnames=("interpret",))
def copy_blocks(
    k_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    src: jax.Array,  # int32[num_copies]; a negative entry is padding
    dst: jax.Array,  # int32[num_copies]; distinct, and none of them a source
    *,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Copy whole blocks src[i] -> dst[i] in every KV head; returns the updated pools."""
    shapes.check_copy(k_pages, v_pages, src, dst)
    num_kv_heads, num_blocks, block_size, head_dim = k_pages.shape
    shapes.check_pallas_shapes(head_dim, block_size)
    rows = min(block_size, COPY_ROWS)
    pages = pl.BlockSpec((None, num_blocks, block_size, head_dim), lambda h, i, r: (h, 0, 0, 0))
    ids = pl.BlockSpec((src.shape[0],), lambda h, i, r: (0,))
    kernel = functools.partial(_copy_kernel, rows=rows, pieces=head_dim_pieces(head_dim))
    return pl.pallas_call(
        kernel,
        grid=(num_kv_heads, src.shape[0], block_size // rows),
        in_specs=[ids, ids, pages, pages],
        out_specs=[pages, pages],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2,
        input_output_aliases={2: 0, 3: 1},
        interpret=resolve_interpret(interpret),
        compiler_params=triton_params(num_warps=4, num_stages=1),
        name="copy_blocks",
    )(src.astype(jnp.int32), dst.astype(jnp.int32), k_pages, v_pages)
