"""Random paged-attention problems and a float64 NumPy oracle, shared by the kernel tests.

A problem is built the way a serving engine lays out its cache: sequences own randomly
permuted physical blocks, the table's unused entries hold sentinels, and every slot that no
sequence owns (free blocks, the tail of a last block) holds large finite garbage, so a kernel
that reads past a sequence's length gets visibly wrong answers. `quantized` stores a problem's
pages in 8 bits, garbage included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

GARBAGE = 1e3
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
EIGHT_BIT = [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2]
# How far attention over 8-bit pages may be from attention over the K/V before quantization
# (relative_error, unit-normal K/V and queries): per-token int8 keeps about 7 bits of every
# vector, e4m3 3 mantissa bits of every value, e5m2 2.
QUANTIZATION_ERROR = {jnp.int8: 1.5e-2, jnp.float8_e4m3fn: 0.1, jnp.float8_e5m2: 0.2}


@dataclass
class Problem:
    q: jnp.ndarray  # [num_tokens, num_q_heads, head_dim]
    k_pages: jnp.ndarray  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jnp.ndarray
    block_tables: jnp.ndarray  # int32[num_seqs, max_blocks]
    context_lens: jnp.ndarray  # int32[num_seqs]
    cu_q_lens: jnp.ndarray  # int32[num_seqs + 1]
    k_scales: jnp.ndarray | None = None  # float32[num_kv_heads, num_blocks, block_size]: int8 pages
    v_scales: jnp.ndarray | None = None

    @property
    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.context_lens, self.cu_q_lens)

    @property
    def scales(self) -> dict:
        """The keyword arguments every attention function takes the pages' scales in."""
        return dict(k_scales=self.k_scales, v_scales=self.v_scales)

    def stored_for(self, backend: pk.AttentionBackend) -> Problem:
        """The problem with its pages as the backend stores them (page_dtype: the xla backend
        keeps some dtypes as their bits)."""
        stored = backend.page_dtype(self.k_pages.dtype)
        bits = lambda pages: jax.lax.bitcast_convert_type(pages, stored)  # noqa: E731
        return dataclasses.replace(self, k_pages=bits(self.k_pages), v_pages=bits(self.v_pages))


def make_problem(
    rng: np.random.Generator,
    *,
    context_lens,
    q_lens,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    block_size: int = 16,
    dtype=jnp.float32,
    spare_blocks: int = 3,
    extra_table_width: int = 1,
    padding_tokens: int = 0,
) -> Problem:
    context_lens = np.asarray(context_lens, np.int32)
    q_lens = np.asarray(q_lens, np.int32)
    assert np.all(q_lens <= context_lens)
    blocks_per_seq = -(-context_lens // block_size)
    width = int(blocks_per_seq.max(initial=1)) + extra_table_width
    num_blocks = int(blocks_per_seq.sum()) + spare_blocks
    physical = rng.permutation(num_blocks)
    sentinels = np.array([-1, num_blocks, 2**30, 0], np.int32)
    tables = rng.choice(sentinels, size=(len(context_lens), width)).astype(np.int32)
    pool_shape = (num_kv_heads, num_blocks, block_size, head_dim)
    k_pages = rng.uniform(-GARBAGE, GARBAGE, pool_shape)
    v_pages = rng.uniform(-GARBAGE, GARBAGE, pool_shape)
    used = 0
    for s, (ctx, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        tables[s, :nb] = physical[used : used + nb]
        used += nb
        for t in range(ctx):
            block, offset = tables[s, t // block_size], t % block_size
            k_pages[:, block, offset] = rng.normal(size=(num_kv_heads, head_dim))
            v_pages[:, block, offset] = rng.normal(size=(num_kv_heads, head_dim))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.normal(size=(int(cu[-1]) + padding_tokens, num_q_heads, head_dim))
    return Problem(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(context_lens),
        cu_q_lens=jnp.asarray(cu),
    )


def quantized(problem: Problem, page_dtype) -> Problem:
    """The problem with its pages stored in page_dtype, as write_kv would have written them."""
    (k_pages, k_scales), (v_pages, v_scales) = (pk.quantize(pages, page_dtype)
                                                for pages in (problem.k_pages, problem.v_pages))
    return dataclasses.replace(problem, k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales)


def dequantized(pages, scales) -> np.ndarray:
    """float64 values of pages (of any dtype) times their scales, if any."""
    values = np.asarray(pages).astype(np.float64)
    return values if scales is None else values * np.asarray(scales, np.float64)[..., None]


def dense_attention(problem: Problem, sm_scale: float | None = None, sliding_window: int | None = None,
                    soft_cap: float | None = None) -> np.ndarray:
    """Plain causal softmax attention over each sequence's gathered K/V, in float64: a query at
    position p sees positions max(0, p - sliding_window + 1) .. p, scores soft-capped. 8-bit
    pages are read as the values they stand for."""
    q = np.asarray(problem.q.astype(jnp.float32), np.float64)
    k_pages = dequantized(problem.k_pages, problem.k_scales)
    v_pages = dequantized(problem.v_pages, problem.v_scales)
    tables = np.asarray(problem.block_tables)
    cu = np.asarray(problem.cu_q_lens)
    num_kv_heads, _, block_size, head_dim = k_pages.shape
    group = q.shape[1] // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    for s, ctx in enumerate(np.asarray(problem.context_lens)):
        positions = np.arange(ctx)
        blocks = tables[s, positions // block_size]
        k = k_pages[:, blocks, positions % block_size]  # [Hkv, ctx, D]
        v = v_pages[:, blocks, positions % block_size]
        q_len = cu[s + 1] - cu[s]
        for i in range(q_len):
            pos = ctx - q_len + i
            seen = slice(0 if sliding_window is None else max(0, pos - sliding_window + 1), pos + 1)
            for h in range(q.shape[1]):
                scores = k[h // group, seen] @ q[cu[s] + i, h] * scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                w = np.exp(scores - scores.max())
                out[cu[s] + i, h] = (w / w.sum()) @ v[h // group, seen]
    return out


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6))
