"""write_kv puts each token's K/V in its slot and nowhere else; copy_blocks copies whole
blocks for copy-on-write. The Pallas kernels and the jax.numpy references agree with a NumPy
model of the cache, and both update the donated pools in place."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

WRITERS = {"pallas": pk.write_kv, "reference": pk.write_kv_reference}
COPIERS = {"pallas": pk.copy_blocks, "reference": pk.copy_blocks_reference}


def random_pools(rng, num_kv_heads=2, num_blocks=12, block_size=4, head_dim=80, dtype=jnp.float32):
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32), dtype


@pytest.mark.parametrize("impl", list(WRITERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
def test_write_kv_fills_exactly_the_mapped_slots(rng, impl, dtype):
    k_np, v_np, _ = random_pools(rng)
    num_slots = k_np.shape[1] * k_np.shape[2]
    num_tokens = 21  # not a multiple of the kernel's tokens per program
    slots = rng.choice(num_slots, size=num_tokens, replace=False).astype(np.int32)
    slots[[3, 10, 20]] = -1  # padding tokens are skipped
    k_new = rng.normal(size=(num_tokens, 2, 80)).astype(np.float32)
    v_new = rng.normal(size=(num_tokens, 2, 80)).astype(np.float32)

    expect_k, expect_v = k_np.copy(), v_np.copy()
    for t, slot in enumerate(slots):
        if slot >= 0:
            block, offset = divmod(slot, k_np.shape[2])
            expect_k[:, block, offset] = k_new[t]
            expect_v[:, block, offset] = v_new[t]

    k_pages, v_pages = WRITERS[impl](
        jnp.asarray(k_np, dtype), jnp.asarray(v_np, dtype),
        jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype), jnp.asarray(slots),
    )
    cast = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(k_pages.astype(jnp.float32)), cast(expect_k))
    np.testing.assert_array_equal(np.asarray(v_pages.astype(jnp.float32)), cast(expect_v))


@pytest.mark.parametrize("impl", list(COPIERS))
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_copy_blocks_copies_every_head_of_each_pair(rng, impl, block_size):
    k_np, v_np, _ = random_pools(rng, num_blocks=10, block_size=block_size, head_dim=96)
    src = np.array([1, 4, -1, 7], np.int32)
    dst = np.array([2, 9, 3, 0], np.int32)  # the padding pair (-1 -> 3) copies nothing
    expect_k, expect_v = k_np.copy(), v_np.copy()
    for s, d in zip(src, dst):
        if s >= 0:
            expect_k[:, d], expect_v[:, d] = k_np[:, s], v_np[:, s]
    k_pages, v_pages = COPIERS[impl](jnp.asarray(k_np), jnp.asarray(v_np), jnp.asarray(src), jnp.asarray(dst))
    np.testing.assert_array_equal(np.asarray(k_pages), expect_k)
    np.testing.assert_array_equal(np.asarray(v_pages), expect_v)


@pytest.mark.parametrize("impl", list(WRITERS))
def test_write_inside_a_donating_jit_updates_the_cache_in_place(rng, impl):
    k_np, v_np, _ = random_pools(rng)
    write = WRITERS[impl]

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(cache, k, slots):
        return write(cache[0], cache[1], k, k, slots)

    cache = (jnp.asarray(k_np), jnp.asarray(v_np))
    k = jnp.ones((3, 2, 80))
    cache = step(cache, k, jnp.array([0, 5, 47], jnp.int32))
    cache = step(cache, 2 * k, jnp.array([1, -1, 46], jnp.int32))
    k_pages = np.asarray(cache[0])
    assert np.all(k_pages[:, 0, 0] == 1) and np.all(k_pages[:, 0, 1] == 2)
    assert np.all(k_pages[:, 11, 3] == 1) and np.all(k_pages[:, 11, 2] == 2)
    np.testing.assert_array_equal(k_pages[:, 2:11], k_np[:, 2:11])


def test_bad_shapes_raise_value_error(rng):
    k_np, v_np, _ = random_pools(rng)
    k_pages, v_pages = jnp.asarray(k_np), jnp.asarray(v_np)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        pk.write_kv(k_pages, v_pages, jnp.zeros((3, 4, 80)), jnp.zeros((3, 4, 80)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        pk.write_kv(k_pages, v_pages, jnp.zeros((3, 2, 80)), jnp.zeros((3, 2, 80)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="dst"):
        pk.copy_blocks(k_pages, v_pages, jnp.zeros(3, jnp.int32), jnp.zeros(2, jnp.int32))


def test_the_xla_backend_keeps_bfloat16_pages_as_their_bits_and_reads_them_back(rng):
    """XLA's CPU scatter widens a bfloat16 cache to float32 and back on every write, so the
    xla backend stores bfloat16 pages as uint16: writes and attention see the same values."""
    xla = pk.get_backend("xla")
    assert xla.page_dtype(jnp.bfloat16) == jnp.uint16 and xla.page_dtype(jnp.float32) == jnp.float32
    k_np, v_np, _ = random_pools(rng, head_dim=64)
    as_bits = lambda x: jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16)  # noqa: E731
    k_new, v_new = (jnp.asarray(rng.normal(size=(5, 2, 64)), jnp.bfloat16) for _ in range(2))
    slots = jnp.array([0, 9, -1, 30, 47], jnp.int32)
    typed = pk.write_kv_reference(jnp.asarray(k_np, jnp.bfloat16), jnp.asarray(v_np, jnp.bfloat16), k_new, v_new,
                                  slots)
    bits = xla.write_kv(as_bits(k_np), as_bits(v_np), k_new, v_new, slots)
    assert bits[0].dtype == jnp.uint16
    for typed_pages, bit_pages in zip(typed, bits):
        np.testing.assert_array_equal(np.asarray(as_bits(typed_pages)), np.asarray(bit_pages))
    q = jnp.asarray(rng.normal(size=(3, 4, 64)), jnp.bfloat16)
    tables, lengths, cu = jnp.array([[0, 1, 2], [7, 8, 11]], jnp.int32), jnp.array([9, 12], jnp.int32), \
        jnp.array([0, 2, 3], jnp.int32)
    expected = xla.ragged_paged_attention(q, *typed, tables, lengths, cu, max_q_len=2)
    np.testing.assert_array_equal(np.asarray(xla.ragged_paged_attention(q, *bits, tables, lengths, cu, max_q_len=2)),
                                  np.asarray(expected))
