"""The paged-attention kernels agree with a dense float64 softmax attention and with their
jax.numpy references, for every dtype, head layout, head dim and block size we serve, and on
8-bit pages they read the values the pages stand for.

On a CPU the kernels run in Pallas interpret mode; on a GPU the same tests run them compiled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
    EIGHT_BIT,
    QUANTIZATION_ERROR,
    TOLERANCE,
    dense_attention,
    make_problem,
    quantized,
    relative_error,
)

import pallas_kernels as pk

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
HEAD_DIMS = [64, 80, 96, 128, 256]
HEAD_LAYOUTS = [(4, 4), (8, 2), (6, 1), (14, 2)]  # MHA, GQA, MQA, a group of 7


def decode_problem(rng, *, block_size, lengths=None, num_seqs=4, **kw):
    if lengths is None:
        lengths = rng.integers(1, 3 * block_size + 40, size=num_seqs)
    return make_problem(rng, context_lens=lengths, q_lens=np.ones(len(lengths)), block_size=block_size, **kw)


def check_decode(problem, dtype, **kw):
    lengths = problem.context_lens
    out = pk.paged_attention(problem.q, problem.k_pages, problem.v_pages, problem.block_tables, lengths, **kw)
    assert out.shape == problem.q.shape and out.dtype == problem.q.dtype
    assert relative_error(out, dense_attention(problem)) < TOLERANCE[dtype]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_every_block_size(rng, block_size):
    i = BLOCK_SIZES.index(block_size)
    dtype, (hq, hkv) = DTYPES[i % 3], HEAD_LAYOUTS[i % 4]
    problem = decode_problem(rng, block_size=block_size, dtype=dtype, num_q_heads=hq, num_kv_heads=hkv)
    check_decode(problem, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_every_head_dim_and_dtype(rng, head_dim, dtype):
    problem = decode_problem(rng, block_size=16, dtype=dtype, head_dim=head_dim, num_q_heads=4, num_kv_heads=2)
    check_decode(problem, dtype)


@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_mha_gqa_mqa(rng, heads):
    problem = decode_problem(rng, block_size=8, num_q_heads=heads[0], num_kv_heads=heads[1])
    check_decode(problem, jnp.float32)


def test_decode_lengths_of_one_and_exact_block_boundaries(rng):
    problem = decode_problem(rng, block_size=16, lengths=[1, 16, 17, 32, 15, 48])
    check_decode(problem, jnp.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_k_partitions_merge_exactly(rng, num_splits):
    problem = decode_problem(rng, block_size=8, lengths=[300, 1, 129, 64], extra_table_width=4)
    check_decode(problem, jnp.float32, num_splits=num_splits, block_kv=32)


def test_long_context_splits_automatically(rng):
    problem = decode_problem(rng, block_size=32, lengths=[1500, 700])
    plan = pk.attention_plan(problem.q, problem.k_pages, problem.block_tables, max_q_len=1)
    assert plan.num_splits > 1
    check_decode(problem, jnp.float32)


def test_zero_length_rows_return_zeros(rng):
    problem = decode_problem(rng, block_size=16, lengths=[5, 9])
    lengths = problem.context_lens.at[1].set(0)
    out = pk.paged_attention(problem.q, problem.k_pages, problem.v_pages, problem.block_tables, lengths)
    assert np.all(np.asarray(out[1]) == 0)


# --- ragged: prefill, chunked prefill, cached prefixes, decode mixed in one batch ----------

RAGGED_BATCHES = {
    "prefill": ([37, 5, 64], [37, 5, 64]),
    "chunked_prefill": ([90, 40], [17, 40]),
    "cached_prefix_and_decode": ([70, 33, 1, 129], [6, 1, 1, 50]),
    "empty_sequence_in_between": ([20, 9, 12], [20, 0, 3]),
}


@pytest.mark.parametrize("batch", list(RAGGED_BATCHES))
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_ragged_matches_dense(rng, batch, block_size):
    context_lens, q_lens = RAGGED_BATCHES[batch]
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=block_size,
                           num_q_heads=6, num_kv_heads=2, head_dim=80, padding_tokens=3)
    out = pk.ragged_paged_attention(*problem.args)
    expected = dense_attention(problem)
    assert relative_error(out, expected) < TOLERANCE[jnp.float32]
    assert np.all(np.asarray(out[-3:]) == 0), "padding tokens past cu_q_lens[-1] must be zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_ragged_dtypes_with_max_q_len_hint(rng, dtype):
    problem = make_problem(rng, context_lens=[50, 23, 8], q_lens=[12, 23, 1], dtype=dtype,
                           num_q_heads=8, num_kv_heads=1, head_dim=128, block_size=8)
    out = pk.ragged_paged_attention(*problem.args, max_q_len=23)
    assert relative_error(out, dense_attention(problem)) < TOLERANCE[dtype]


def test_sm_scale_is_applied(rng):
    problem = make_problem(rng, context_lens=[30], q_lens=[4])
    out = pk.ragged_paged_attention(*problem.args, sm_scale=0.3)
    assert relative_error(out, dense_attention(problem, sm_scale=0.3)) < TOLERANCE[jnp.float32]


# --- the references and the backends -----------------------------------------------------


@pytest.mark.parametrize("batch", list(RAGGED_BATCHES))
@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_xla_backend_matches_dense(rng, batch, block_size):
    context_lens, q_lens = RAGGED_BATCHES[batch]
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=block_size,
                           num_q_heads=6, num_kv_heads=2, head_dim=40, padding_tokens=2)
    xla = pk.get_backend("xla")
    for max_q_len in (None, max(q_lens)):
        out = xla.ragged_paged_attention(*problem.args, max_q_len=max_q_len)
        assert relative_error(out, dense_attention(problem)) < 1e-5
        assert np.all(np.asarray(out[-2:]) == 0)


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "mixed"])
def test_xla_backend_length_groups_keep_every_tile_exact(rng, prefill):
    """Many tiles are sorted by context length and attended in batches that stop at their own
    longest; each token must still see exactly its own context, whichever batch it lands in."""
    import pallas_kernels.xla_attention as xa

    context_lens = list(rng.integers(1, 300, 37)) + [1, 299, 64]
    q_lens = [1] * 37 + ([1, 40, 64] if prefill else [1, 1, 1])
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=16,
                           num_q_heads=6, num_kv_heads=2, head_dim=32, padding_tokens=3)
    assert len(context_lens) >= xa.MIN_TILES_TO_GROUP > 1 and xa.LENGTH_GROUPS > 1
    for max_q_len in (None, max(q_lens)):
        out = pk.get_backend("xla").ragged_paged_attention(*problem.args, max_q_len=max_q_len)
        assert relative_error(out, dense_attention(problem)) < 1e-5
        assert np.all(np.asarray(out[-3:]) == 0)


def test_xla_backend_mixed_step_as_the_engine_pads_it_is_exact(rng):
    """A step's bucket: sequences decoding one token (tiles of one token of their own), a
    prompt, chunks and a two-token sequence (tiles of many tokens), then empty sequence slots
    and padding tokens. Most of the bucket's tiles hold nothing and are never run; every token
    must still see exactly its own context, and padding stays zero."""
    context_lens = list(rng.integers(1, 300, 40)) + [1, 64, 299, 50] + [0] * 30
    q_lens = [1] * 40 + [1, 64, 40, 2] + [0] * 30
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=16,
                           num_q_heads=4, num_kv_heads=2, head_dim=32, padding_tokens=20)
    out = pk.get_backend("xla").ragged_paged_attention(*problem.args)
    assert relative_error(out, dense_attention(problem)) < 1e-5
    assert np.all(np.asarray(out[-20:]) == 0)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_references_match_dense(rng, block_size):
    problem = make_problem(rng, context_lens=[45, 3, 77], q_lens=[45, 1, 10], block_size=block_size,
                           num_q_heads=4, num_kv_heads=1, head_dim=24)
    assert relative_error(pk.ragged_paged_attention_reference(*problem.args), dense_attention(problem)) < 1e-5
    decode = decode_problem(rng, block_size=block_size, head_dim=24)
    out = pk.paged_attention_reference(decode.q, decode.k_pages, decode.v_pages, decode.block_tables,
                                       decode.context_lens)
    assert relative_error(out, dense_attention(decode)) < 1e-5


def test_every_backend_gives_the_same_result(rng):
    problem = make_problem(rng, context_lens=[33, 64, 2], q_lens=[3, 64, 1], block_size=16)
    results = {}
    for name in pk.BACKENDS:
        backend = pk.get_backend(name)
        if name == "pallas" and jax.default_backend() != "gpu":
            continue  # compiled Triton needs a GPU; gpu_check.sh covers it there
        results[name] = np.asarray(backend.ragged_paged_attention(*problem.args))
    reference = np.asarray(pk.ragged_paged_attention_reference(*problem.args))
    for name, out in results.items():
        np.testing.assert_allclose(out, reference, atol=2e-5, err_msg=name)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention_backend 'cuda'"):
        pk.get_backend("cuda")


# --- bad input fails at trace time with a message that names the problem ------------------


def _good(rng):
    return make_problem(rng, context_lens=[10, 20], q_lens=[1, 1], num_q_heads=4, num_kv_heads=2)


BAD_CALLS = {
    "q heads not a multiple": (lambda p: p.q[:, :3], "multiple of num_kv_heads"),
    "head_dim mismatch": (lambda p: p.q[:, :, :32], "head_dim"),
    "q dtype not a float": (lambda p: p.q.astype(jnp.int32), "dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("fn", ["kernel", "reference"])
def test_bad_q_raises_value_error(rng, case, fn):
    p = _good(rng)
    make_q, message = BAD_CALLS[case]
    attend = pk.paged_attention if fn == "kernel" else pk.paged_attention_reference
    with pytest.raises(ValueError, match=message):
        attend(make_q(p), p.k_pages, p.v_pages, p.block_tables, p.context_lens)


def test_bad_metadata_raises_value_error(rng):
    p = _good(rng)
    with pytest.raises(ValueError, match="block_tables"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables[:1], p.context_lens)
    with pytest.raises(ValueError, match="lengths"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens[:1])
    with pytest.raises(ValueError, match="cu_q_lens"):
        pk.ragged_paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens, p.cu_q_lens[:2])
    with pytest.raises(ValueError, match="same shape"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages[:1], p.block_tables, p.context_lens)
    with pytest.raises(ValueError, match="integer"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables.astype(jnp.float32), p.context_lens)


def test_pallas_needs_power_of_two_blocks_and_head_dim_multiple_of_16(rng):
    p = make_problem(rng, context_lens=[10], q_lens=[1], head_dim=40, block_size=12)
    with pytest.raises(ValueError, match="multiple of 16"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens)
    p = make_problem(rng, context_lens=[10], q_lens=[1], head_dim=32, block_size=12)
    with pytest.raises(ValueError, match="power of two"):
        pk.paged_attention(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens)
    # The reference serves any shape.
    out = pk.paged_attention_reference(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens)
    assert relative_error(out, dense_attention(p)) < 1e-5


# --- sliding windows and logit soft-capping ------------------------------------------------

# What a model runs on: the xla backend and the Pallas kernels (compiled on a GPU).
WINDOWED_BACKENDS = ["xla", "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"]
MASKED = {  # name: (block_size, context_lens, q_lens, sliding_window, soft_cap)
    "window_smaller_than_a_block": (16, [40, 9, 70], [7, 9, 1], 5, None),
    "window_of_one_block_and_soft_cap": (8, [33, 64, 2], [3, 20, 1], 8, 2.0),
    "window_not_a_multiple_of_blocks": (4, [50, 23, 12], [12, 1, 12], 11, None),
    "context_several_windows_long": (16, [200, 131], [1, 40], 24, None),
    "soft_cap_alone": (4, [50, 23, 12], [12, 1, 12], None, 2.0),
}
LONGEST_CHUNK = 128  # no backend reads more context per step (tiling.plan_tiles)


def masked_problem(rng, case, **kw):
    """A problem of MASKED and its options (sliding_window, soft_cap)."""
    block_size, context_lens, q_lens, window, soft_cap = MASKED[case]
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=block_size, **kw)
    return problem, dict(sliding_window=window, soft_cap=soft_cap)


def first_seen(problem, window) -> np.ndarray:
    """Each sequence's earliest position any of its queries sees."""
    q_lens = np.diff(np.asarray(problem.cu_q_lens))
    return np.maximum(np.asarray(problem.context_lens) - q_lens - window + 1, 0)


def test_reference_window_and_soft_cap_match_dense(rng):
    problem = make_problem(rng, context_lens=[50, 23, 12], q_lens=[12, 1, 12], block_size=4, head_dim=24)
    out = pk.ragged_paged_attention_reference(*problem.args, sliding_window=11, soft_cap=2.0)
    assert relative_error(out, dense_attention(problem, sliding_window=11, soft_cap=2.0)) < 1e-5
    assert relative_error(out, dense_attention(problem, sliding_window=11)) > 1e-2
    assert relative_error(out, dense_attention(problem, soft_cap=2.0)) > 1e-2


@pytest.mark.parametrize("case", list(MASKED))
@pytest.mark.parametrize("name", WINDOWED_BACKENDS)
def test_backends_match_the_reference_with_windows_and_soft_caps(rng, name, case):
    problem, options = masked_problem(rng, case)
    out = pk.get_backend(name).ragged_paged_attention(*problem.args, **options)
    np.testing.assert_allclose(out, pk.ragged_paged_attention_reference(*problem.args, **options), atol=2e-5)


@pytest.mark.parametrize("name", WINDOWED_BACKENDS)
def test_decode_honours_the_sliding_window(rng, name):
    problem = decode_problem(rng, block_size=8, lengths=[1, 8, 9, 100, 37])
    args = (problem.q, problem.k_pages, problem.v_pages, problem.block_tables, problem.context_lens)
    out = pk.get_backend(name).paged_attention(*args, sliding_window=9, soft_cap=3.0)
    np.testing.assert_allclose(out, pk.paged_attention_reference(*args, sliding_window=9, soft_cap=3.0), atol=2e-5)


def test_xla_length_groups_keep_windows_exact(rng):
    """Enough tiles to sort them into groups by how much context they read."""
    import pallas_kernels.xla_attention as xa

    context_lens = list(rng.integers(1, 100, xa.MIN_TILES_TO_GROUP)) + [200]
    problem = make_problem(rng, context_lens=context_lens, q_lens=[1] * xa.MIN_TILES_TO_GROUP + [40],
                           block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16)
    out = pk.get_backend("xla").ragged_paged_attention(*problem.args, sliding_window=20, max_q_len=40)
    np.testing.assert_allclose(out, pk.ragged_paged_attention_reference(*problem.args, sliding_window=20),
                               atol=2e-5)


@pytest.mark.parametrize("name", WINDOWED_BACKENDS)
def test_blocks_before_the_window_may_name_any_block(rng, name):
    """The block manager frees a sequence's blocks once its window has passed them: the table
    entries may then name a block another sequence reuses, the sentinel, or a freed block full
    of garbage, and the result must not change at all."""
    problem, options = masked_problem(rng, "context_several_windows_long")
    attend = functools.partial(pk.get_backend(name).ragged_paged_attention, **options)
    expected = np.asarray(attend(*problem.args))

    tables = np.array(problem.block_tables)
    k_pages, v_pages = np.array(problem.k_pages), np.array(problem.v_pages)
    block_size = k_pages.shape[2]
    for s, start in enumerate(first_seen(problem, options["sliding_window"])):
        passed = slice(0, start // block_size)
        k_pages[:, tables[s, passed]] = 1e4 * rng.normal(size=k_pages[:, tables[s, passed]].shape)
        v_pages[:, tables[s, passed]] = 1e4 * rng.normal(size=v_pages[:, tables[s, passed]].shape)
        tables[s, passed] = rng.integers(0, k_pages.shape[1], size=start // block_size)
    assert (tables != np.asarray(problem.block_tables)).sum() >= 10
    out = attend(problem.q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables),
                 problem.context_lens, problem.cu_q_lens)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", WINDOWED_BACKENDS)
def test_chunks_before_the_window_are_never_read(rng, name):
    """A long sequence with a short window reads about a window: NaN in every chunk before
    the one holding its tile's first visible position cannot reach the result (0 * NaN would)."""
    window, block_size = 16, 16
    problem = make_problem(rng, context_lens=[300], q_lens=[20], block_size=block_size)
    expected = pk.ragged_paged_attention_reference(*problem.args, sliding_window=window)
    skipped = first_seen(problem, window)[0] // LONGEST_CHUNK * LONGEST_CHUNK
    assert skipped >= LONGEST_CHUNK
    tables = np.array(problem.block_tables)
    last = -(-300 // block_size) - 1
    tables[0, last:] = tables[0, last]  # padding is read (masked) in the last chunk: keep it clean
    tables[0, : skipped // block_size] = tables[0, 0]  # every skipped entry names one block of NaN
    poison = lambda pages: pages.at[:, tables[0, 0]].set(jnp.nan)  # noqa: E731
    out = pk.get_backend(name).ragged_paged_attention(
        problem.q, poison(problem.k_pages), poison(problem.v_pages), jnp.asarray(tables),
        problem.context_lens, problem.cu_q_lens, sliding_window=window)
    np.testing.assert_allclose(out, expected, atol=2e-5)


def test_split_k_splits_the_window_not_the_sequence(rng):
    problem = decode_problem(rng, block_size=8, lengths=[300, 1, 129, 64])
    long_table = jnp.zeros((4, 512), jnp.int32)  # 4096 tokens
    assert pk.attention_plan(problem.q, problem.k_pages, long_table, max_q_len=1).num_splits > 1
    assert pk.attention_plan(problem.q, problem.k_pages, long_table, max_q_len=1, sliding_window=50).num_splits == 1
    args = (problem.q, problem.k_pages, problem.v_pages, problem.block_tables, problem.context_lens)
    out = pk.paged_attention(*args, sliding_window=50, num_splits=3, block_kv=16)
    np.testing.assert_allclose(out, pk.paged_attention_reference(*args, sliding_window=50), atol=2e-5)


@pytest.mark.parametrize("options", [dict(sliding_window=0), dict(soft_cap=0.0)], ids=["window", "cap"])
@pytest.mark.parametrize("fn", ["kernel", "reference"])
def test_window_and_cap_must_be_positive(rng, fn, options):
    attend = pk.paged_attention if fn == "kernel" else pk.paged_attention_reference
    p = _good(rng)
    with pytest.raises(ValueError, match="positive"):
        attend(p.q, p.k_pages, p.v_pages, p.block_tables, p.context_lens, **options)


# --- 8-bit pages: dequantized inside every kernel ------------------------------------------

REFERENCE = pk.AttentionBackend(
    name="reference",
    paged_attention=pk.paged_attention_reference,
    ragged_paged_attention=pk.ragged_paged_attention_reference,
    write_kv=pk.write_kv_reference,
    copy_blocks=pk.copy_blocks_reference,
)
EIGHT_BIT_CASES = {  # name: (block_size, context_lens, q_lens, decode, options)
    "decode_in_a_sliding_window": (8, [1, 8, 9, 70, 37], [1, 1, 1, 1, 1], True, dict(sliding_window=9)),
    "ragged_prefill_chunk_and_decode": (16, [37, 70, 33, 1], [37, 6, 1, 1], False, dict(soft_cap=20.0)),
}


def eight_bit_problem(rng, case, page_dtype):
    """A case of EIGHT_BIT_CASES at full precision, the same with its pages in page_dtype,
    whether it is decode, and its attention options."""
    block_size, context_lens, q_lens, decode, options = EIGHT_BIT_CASES[case]
    problem = make_problem(rng, context_lens=context_lens, q_lens=q_lens, block_size=block_size, head_dim=32)
    return problem, quantized(problem, page_dtype), decode, options


def attend(backend: pk.AttentionBackend, problem, decode: bool, options: dict):
    """Decode through paged_attention, any other batch through ragged_paged_attention."""
    if decode:
        return backend.paged_attention(*problem.args[:5], **problem.scales, **options)
    return backend.ragged_paged_attention(*problem.args, **problem.scales, **options)


@pytest.mark.parametrize("case", list(EIGHT_BIT_CASES))
@pytest.mark.parametrize("page_dtype", EIGHT_BIT, ids=lambda d: d.__name__)
def test_the_reference_reads_8bit_pages_as_the_values_they_stand_for(rng, page_dtype, case):
    problem, pages8, decode, options = eight_bit_problem(rng, case, page_dtype)
    out = attend(REFERENCE, pages8, decode, options)
    assert relative_error(out, dense_attention(pages8, **options)) < TOLERANCE[jnp.float32]
    assert relative_error(out, dense_attention(problem, **options)) < QUANTIZATION_ERROR[page_dtype]


@pytest.mark.parametrize("case", list(EIGHT_BIT_CASES))
@pytest.mark.parametrize("page_dtype", EIGHT_BIT, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name", WINDOWED_BACKENDS)
def test_backends_dequantize_8bit_pages_as_the_reference_does(rng, name, page_dtype, case):
    """Each backend reads the pages as it stores them (xla: float8_e4m3fn as uint8) and
    dequantizes every chunk it loads; the result is the reference's on the same pages."""
    problem, pages8, decode, options = eight_bit_problem(rng, case, page_dtype)
    backend = pk.get_backend(name)
    out = attend(backend, pages8.stored_for(backend), decode, options)
    np.testing.assert_allclose(out, attend(REFERENCE, pages8, decode, options), atol=2e-5)
    assert relative_error(out, dense_attention(problem, **options)) < QUANTIZATION_ERROR[page_dtype]


@pytest.mark.parametrize("name", ["reference", *WINDOWED_BACKENDS])
def test_int8_pages_need_their_scales_and_other_pages_take_none(rng, name):
    backend = REFERENCE if name == "reference" else pk.get_backend(name)
    problem = _good(rng)
    int8 = quantized(problem, jnp.int8)
    with pytest.raises(ValueError, match="int8 pages need v_scales"):
        backend.paged_attention(*int8.args[:5], k_scales=int8.k_scales)
    with pytest.raises(ValueError, match=r"need k_scales: float32 .* got float32 \(2, 6\)"):
        backend.paged_attention(*int8.args[:5], k_scales=int8.k_scales[:, :, 0], v_scales=int8.v_scales)
    fp8 = quantized(problem, jnp.float8_e4m3fn).stored_for(backend)
    with pytest.raises(ValueError, match="pages have no scales"):
        backend.paged_attention(*fp8.args[:5], k_scales=int8.k_scales, v_scales=int8.v_scales)
