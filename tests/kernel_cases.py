"""Random paged-attention problems and a float64 NumPy oracle, shared by the kernel tests.

A problem is built the way a serving engine lays out its cache: sequences own randomly
permuted physical blocks, the table's unused entries hold sentinels, and every slot that no
sequence owns (free blocks, the tail of a last block) holds large finite garbage, so a kernel
that reads past a sequence's length gets visibly wrong answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

GARBAGE = 1e3
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@dataclass
class Problem:
    q: jnp.ndarray  # [num_tokens, num_q_heads, head_dim]
    k_pages: jnp.ndarray  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_pages: jnp.ndarray
    block_tables: jnp.ndarray  # int32[num_seqs, max_blocks]
    context_lens: jnp.ndarray  # int32[num_seqs]
    cu_q_lens: jnp.ndarray  # int32[num_seqs + 1]

    @property
    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.context_lens, self.cu_q_lens)


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


def dense_attention(problem: Problem, sm_scale: float | None = None) -> np.ndarray:
    """Plain causal softmax attention over each sequence's gathered K/V, in float64."""
    q = np.asarray(problem.q.astype(jnp.float32), np.float64)
    k_pages = np.asarray(problem.k_pages.astype(jnp.float32), np.float64)
    v_pages = np.asarray(problem.v_pages.astype(jnp.float32), np.float64)
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
            for h in range(q.shape[1]):
                scores = k[h // group, : pos + 1] @ q[cu[s] + i, h] * scale
                w = np.exp(scores - scores.max())
                out[cu[s] + i, h] = (w / w.sum()) @ v[h // group, : pos + 1]
    return out


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-6))
