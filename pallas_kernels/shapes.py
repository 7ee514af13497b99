"""Shape and dtype checks shared by the kernels and their references.

They run at trace time (shapes are static), so a bad call fails with a ValueError that names
the argument before any kernel is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import quantization

COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
EIGHT_BIT_DTYPES = (*quantization.FLOAT8_DTYPES, jnp.dtype(jnp.int8))  # see quantization.py


def _fail(message: str) -> None:
    raise ValueError(message)


def _check_int_vector(name: str, x: jax.Array, length: int) -> None:
    if x.shape != (length,):
        _fail(f"{name} must have shape ({length},), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        _fail(f"{name} must be an integer array, got {x.dtype}")


def check_pages(k_pages: jax.Array, v_pages: jax.Array, *, any_dtype: bool = False) -> None:
    """k_pages, v_pages: [num_kv_heads, num_blocks, block_size, head_dim], same shape and dtype
    (one the kernels compute in or an 8-bit one, unless any_dtype: a copy moves bits, whatever
    they mean)."""
    if k_pages.ndim != 4:
        _fail(
            "k_pages must be [num_kv_heads, num_blocks, block_size, head_dim], "
            f"got shape {k_pages.shape}"
        )
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        _fail(
            f"k_pages {k_pages.shape} {k_pages.dtype} and v_pages {v_pages.shape} "
            f"{v_pages.dtype} must have the same shape and dtype"
        )
    if not any_dtype and k_pages.dtype not in COMPUTE_DTYPES + EIGHT_BIT_DTYPES:
        _fail(
            "pages dtype must be float32, bfloat16, float16, float8_e4m3fn, float8_e5m2 or int8, "
            f"got {k_pages.dtype}"
        )


def check_scales(k_pages: jax.Array, k_scales: jax.Array | None, v_scales: jax.Array | None) -> None:
    """k_scales, v_scales: float32 [num_kv_heads, num_blocks, block_size] beside int8 pages,
    None beside any other (quantization.py)."""
    if not quantization.needs_scales(k_pages.dtype):
        if k_scales is not None or v_scales is not None:
            _fail(f"{k_pages.dtype} pages have no scales: pass k_scales=None and v_scales=None")
        return
    expected = k_pages.shape[:3]
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is None or scales.shape != expected or scales.dtype != jnp.float32:
            got = "None" if scales is None else f"{scales.dtype} {scales.shape}"
            _fail(
                f"{k_pages.dtype} pages need {name}: float32 [num_kv_heads, num_blocks, block_size] "
                f"= {expected}, got {got}"
            )


def check_attention(q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, *,
                    sliding_window: int | None = None, soft_cap: float | None = None,
                    k_scales: jax.Array | None = None, v_scales: jax.Array | None = None) -> None:
    """The ragged attention contract (see ragged_paged_attention)."""
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        _fail(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and not soft_cap > 0:
        _fail(f"soft_cap must be positive or None, got {soft_cap!r}")
    check_pages(k_pages, v_pages)
    check_scales(k_pages, k_scales, v_scales)
    if q.ndim != 3:
        _fail(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    num_kv_heads, _, _, head_dim = k_pages.shape
    if q.shape[2] != head_dim:
        _fail(f"q head_dim {q.shape[2]} does not match the pages' head_dim {head_dim}")
    if q.shape[1] % num_kv_heads:
        _fail(f"num_q_heads {q.shape[1]} must be a multiple of num_kv_heads {num_kv_heads}")
    if q.dtype not in COMPUTE_DTYPES:
        _fail(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if block_tables.ndim != 2 or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        _fail(
            "block_tables must be an integer [num_seqs, max_blocks_per_seq] array, "
            f"got {block_tables.shape} {block_tables.dtype}"
        )
    num_seqs = block_tables.shape[0]
    _check_int_vector("context_lens", context_lens, num_seqs)
    _check_int_vector("cu_q_lens", cu_q_lens, num_seqs + 1)


def check_decode(q, block_tables, lengths) -> None:
    """The decode contract: one query per sequence."""
    if q.ndim != 3:
        _fail(f"q must be [num_seqs, num_q_heads, head_dim], got shape {q.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        _fail(
            f"block_tables must be [num_seqs={q.shape[0]}, max_blocks_per_seq], "
            f"got shape {block_tables.shape}"
        )
    _check_int_vector("lengths", lengths, q.shape[0])


def check_pallas_shapes(head_dim: int, block_size: int) -> None:
    """What the Pallas kernels need beyond the contract: Triton tiles are powers of two."""
    if head_dim % 16:
        _fail(f"the Pallas kernels need head_dim to be a multiple of 16, got {head_dim}")
    if block_size & (block_size - 1):
        _fail(f"the Pallas kernels need block_size to be a power of two, got {block_size}")


def check_write(k_pages, v_pages, k, v, slot_mapping, k_scales=None, v_scales=None) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: int[num_tokens]."""
    check_pages(k_pages, v_pages)
    check_scales(k_pages, k_scales, v_scales)
    num_kv_heads, _, _, head_dim = k_pages.shape
    expected = (k.shape[0], num_kv_heads, head_dim)
    if k.ndim != 3 or k.shape != expected or v.shape != expected:
        _fail(
            f"k and v must be [num_tokens, num_kv_heads={num_kv_heads}, head_dim={head_dim}], "
            f"got {k.shape} and {v.shape}"
        )
    _check_int_vector("slot_mapping", slot_mapping, k.shape[0])


def check_copy(k_pages, v_pages, src, dst, k_scales=None, v_scales=None) -> None:
    """src, dst: int[num_copies] block ids."""
    check_pages(k_pages, v_pages, any_dtype=True)
    check_scales(k_pages, k_scales, v_scales)
    if src.ndim != 1:
        _fail(f"src must be a 1-D block id array, got shape {src.shape}")
    _check_int_vector("dst", dst, src.shape[0])
    _check_int_vector("src", src, src.shape[0])
