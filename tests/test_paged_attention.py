"""The paged-attention kernels agree with a dense float64 softmax attention and with their
jax.numpy references, for every dtype, head layout, head dim and block size we serve.

On a CPU the kernels run in Pallas interpret mode; on a GPU the same tests run them compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import TOLERANCE, dense_attention, make_problem, relative_error

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
    """Many tiles are sorted by context length and split into groups that stop at their own
    longest; each token must still see exactly its own context, whichever group it lands in."""
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
    "q dtype differs": (lambda p: p.q.astype(jnp.bfloat16), "dtype"),
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
