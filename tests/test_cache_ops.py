"""write_kv puts each token's K/V in its slot and nowhere else, quantized when the pages are
8-bit; copy_blocks copies whole blocks for copy-on-write, int8 scales with their pages. The
Pallas kernels, the jax.numpy references and the xla backend agree with a NumPy model of the
cache, and update the donated pools in place."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import EIGHT_BIT, dequantized

import pallas_kernels as pk

XLA = pk.get_backend("xla")
WRITERS = {"pallas": pk.write_kv, "reference": pk.write_kv_reference, "xla": XLA.write_kv}
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

    k_pages, v_pages, k_scales, v_scales = WRITERS[impl](
        jnp.asarray(k_np, dtype), jnp.asarray(v_np, dtype),
        jnp.asarray(k_new, dtype), jnp.asarray(v_new, dtype), jnp.asarray(slots),
    )
    assert k_scales is None and v_scales is None, "pages of the model's dtype have no scales"
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
    k_pages, v_pages, k_scales, v_scales = COPIERS[impl](jnp.asarray(k_np), jnp.asarray(v_np), jnp.asarray(src),
                                                         jnp.asarray(dst))
    np.testing.assert_array_equal(np.asarray(k_pages), expect_k)
    np.testing.assert_array_equal(np.asarray(v_pages), expect_v)
    assert k_scales is None and v_scales is None


@pytest.mark.parametrize("impl", list(WRITERS))
def test_write_inside_a_donating_jit_updates_the_cache_in_place(rng, impl):
    k_np, v_np, _ = random_pools(rng)
    write = WRITERS[impl]

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(cache, k, slots):
        return write(cache[0], cache[1], k, k, slots)[:2]  # float32 pages: no scales

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
    int8 = k_pages.astype(jnp.int8)
    with pytest.raises(ValueError, match="int8 pages need k_scales"):
        pk.write_kv(int8, int8, jnp.zeros((3, 2, 80)), jnp.zeros((3, 2, 80)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="int8 pages need k_scales"):
        pk.copy_blocks_reference(int8, int8, jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32))
    with pytest.raises(ValueError, match="float32 pages have no scales"):
        pk.write_kv_reference(k_pages, v_pages, jnp.zeros((3, 2, 80)), jnp.zeros((3, 2, 80)),
                              jnp.zeros(3, jnp.int32), k_pages[..., 0], v_pages[..., 0])


@pytest.mark.parametrize("held, stored, model_dtype", [
    (jnp.bfloat16, jnp.uint16, jnp.bfloat16),
    (jnp.float8_e4m3fn, jnp.uint8, jnp.float32),
], ids=["bfloat16", "float8_e4m3fn"])
def test_the_xla_backend_keeps_some_pages_as_their_bits_and_reads_them_back(rng, held, stored, model_dtype):
    """XLA's CPU scatter widens a bfloat16 or float8 cache to float32 or float16 and back on
    every write, so the xla backend stores such pages as unsigned ints of their width: writes
    and attention see the same values. uint8 can name one float8 format: float8_e4m3fn."""
    assert XLA.page_dtype(held) == stored and XLA.page_dtype(jnp.float32) == jnp.float32
    assert XLA.page_dtype(jnp.float8_e5m2) == jnp.float8_e5m2 and XLA.page_dtype(jnp.int8) == jnp.int8
    k_np, v_np, _ = random_pools(rng, head_dim=64)
    as_bits = lambda x: jax.lax.bitcast_convert_type(jnp.asarray(x, held), stored)  # noqa: E731
    k_new, v_new = (jnp.asarray(rng.normal(size=(5, 2, 64)), model_dtype) for _ in range(2))
    slots = jnp.array([0, 9, -1, 30, 47], jnp.int32)
    typed = pk.write_kv_reference(jnp.asarray(k_np, held), jnp.asarray(v_np, held), k_new, v_new, slots)[:2]
    bits = XLA.write_kv(as_bits(k_np), as_bits(v_np), k_new, v_new, slots)[:2]
    assert bits[0].dtype == stored
    for typed_pages, bit_pages in zip(typed, bits):
        np.testing.assert_array_equal(np.asarray(as_bits(typed_pages)), np.asarray(bit_pages))
    q = jnp.asarray(rng.normal(size=(3, 4, 64)), model_dtype)
    tables, lengths, cu = jnp.array([[0, 1, 2], [7, 8, 11]], jnp.int32), jnp.array([9, 12], jnp.int32), \
        jnp.array([0, 2, 3], jnp.int32)
    expected = XLA.ragged_paged_attention(q, *typed, tables, lengths, cu, max_q_len=2)
    np.testing.assert_array_equal(np.asarray(XLA.ragged_paged_attention(q, *bits, tables, lengths, cu, max_q_len=2)),
                                  np.asarray(expected))


# --- 8-bit pages ----------------------------------------------------------------------------


def written_rows(pool, slots, block_size):
    """pool [Hkv, N, B, ...] -> [T, Hkv, ...]: what each slot holds."""
    return np.swapaxes(np.asarray(pool)[:, slots // block_size, slots % block_size], 0, 1)


def assert_within_half_a_step(stored, scales, x, page_dtype):
    """stored [T, Hkv, D] as the pages hold it (scales [T, Hkv] for int8) is x [T, Hkv, D]
    rounded to the nearest step of page_dtype: int8 steps of max|x| / 127 per token and head;
    float8 steps of its own spacing at each value, saturating at the largest finite value."""
    values = dequantized(stored, scales)
    if page_dtype == jnp.int8:
        step = np.abs(x).max(axis=-1) / 127
        np.testing.assert_allclose(scales, step, rtol=1e-6, atol=1e-30)
        expected, bound = x, step[..., None] / 2
    else:
        finfo = jnp.finfo(page_dtype)
        expected = np.clip(x, -float(finfo.max), float(finfo.max))
        bound = np.maximum(np.abs(expected), float(finfo.smallest_normal)) * float(finfo.eps) / 2
    assert np.all(np.abs(values - expected) <= bound * (1 + 1e-5)), np.max(np.abs(values - expected) - bound)


@pytest.mark.parametrize("impl", list(WRITERS))
@pytest.mark.parametrize("page_dtype", EIGHT_BIT, ids=lambda d: d.__name__)
def test_write_kv_quantizes_to_within_half_a_step_and_nothing_else_changes(rng, impl, page_dtype):
    """Tokens of very different sizes, a zero vector, and values beyond float8's range
    (saturated: a float8_e4m3fn cast would make them NaN)."""
    stored_dtype = XLA.page_dtype(page_dtype) if impl == "xla" else page_dtype
    as_stored = lambda x: jax.lax.bitcast_convert_type(x, stored_dtype)  # noqa: E731
    block_size = 4
    (k_pages, k_scales), (v_pages, v_scales) = (pk.quantize(jnp.asarray(rng.normal(size=(2, 6, block_size, 32))),
                                                            page_dtype) for _ in range(2))
    before = [np.asarray(x) for x in (k_pages, v_pages, k_scales, v_scales) if x is not None]
    slots = np.array([3, 0, 17, -1, 22, 9, 8], np.int32)
    k_new, v_new = (rng.normal(size=(7, 2, 32)) * 10.0 ** rng.uniform(-4, 4, size=(7, 2, 1)) for _ in range(2))
    k_new[1, 0], v_new[2, 1] = 0.0, 0.0
    k_new[4, 1, :3], v_new[5, 0, 3:5] = [1e6, -1e6, 5e4], [-7e4, 3e5]

    written = WRITERS[impl](as_stored(k_pages), as_stored(v_pages), jnp.asarray(k_new, jnp.float32),
                            jnp.asarray(v_new, jnp.float32), jnp.asarray(slots), k_scales, v_scales)
    k_pages, v_pages = (jax.lax.bitcast_convert_type(pages, page_dtype) for pages in written[:2])
    k_scales, v_scales = written[2:]
    assert (k_scales is None) == (v_scales is None) == (not pk.needs_scales(page_dtype))
    real = slots >= 0
    for pages, scales, new in ((k_pages, k_scales, k_new), (v_pages, v_scales, v_new)):
        assert_within_half_a_step(written_rows(pages, slots[real], block_size),
                                  None if scales is None else written_rows(scales, slots[real], block_size),
                                  new[real].astype(np.float32).astype(np.float64), page_dtype)

    untouched = np.ones((6, block_size), bool)
    untouched[slots[real] // block_size, slots[real] % block_size] = False
    after = [np.asarray(x) for x in (k_pages, v_pages, k_scales, v_scales) if x is not None]
    for was, now in zip(before, after, strict=True):
        np.testing.assert_array_equal(was[:, untouched], now[:, untouched])


@pytest.mark.parametrize("impl", list(COPIERS))
def test_copy_blocks_moves_int8_scales_with_their_pages(rng, impl):
    (k_pages, k_scales), (v_pages, v_scales) = (pk.quantize(jnp.asarray(rng.normal(size=(2, 10, 16, 64))),
                                                            jnp.int8) for _ in range(2))
    src, dst = np.array([1, 4, -1, 7], np.int32), np.array([2, 9, 3, 0], np.int32)
    expected = [np.asarray(x).copy() for x in (k_pages, v_pages, k_scales, v_scales)]
    for pool in expected:
        pool[:, dst[src >= 0]] = pool[:, src[src >= 0]]
    copied = COPIERS[impl](k_pages, v_pages, jnp.asarray(src), jnp.asarray(dst), k_scales, v_scales)
    for got, want in zip(copied, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("impl", list(WRITERS))
def test_int8_writes_donate_the_pages_and_their_scales(rng, impl):
    (k_pages, k_scales), (v_pages, v_scales) = (pk.quantize(jnp.zeros((2, 6, 4, 32)), jnp.int8) for _ in range(2))
    new = jnp.asarray(rng.normal(size=(3, 2, 32)), jnp.float32)
    WRITERS[impl](k_pages, v_pages, new, new, jnp.array([0, 5, -1], jnp.int32), k_scales=k_scales, v_scales=v_scales)
    assert all(x.is_deleted() for x in (k_pages, v_pages, k_scales, v_scales))
