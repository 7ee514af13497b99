"""Decode paged-attention kernel benchmark: the paper's Fig. 18a overhead, and our kernel
against JAX's built-in Pallas paged attention.

For each (batch, context, block size) every sequence is full length and its blocks are
randomly permuted in the pool, as in a long-running server. We time:
  - ours: `paged_attention` (compiled on a GPU; interpreted on a CPU),
  - xla backend: the same tiled algorithm written in jax.numpy,
  - unpaged: the same kernel with one page per sequence (block size = context), which isolates
    the cost of paging exactly,
  - dense: attention over contiguous K/V written in jax.numpy and compiled by XLA,
  - jax builtin: `jax.experimental.pallas.ops.gpu.paged_attention` (GPU only),
and report achieved bandwidth (K/V bytes read / time) against the device's measured copy
bandwidth. Run `python -m experiments.kernel_bench [--full]`; on a CPU it runs tiny sizes as a
smoke check. Results go to experiments/results/kernel_bench_<device>.md.
"""

from __future__ import annotations

import argparse
import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from tqdm import tqdm

import pallas_kernels as pk
from experiments.common import device_slug, markdown_table, report, time_call

# Llama-3-8B attention: 32 query heads over 8 KV heads of 128, bfloat16.
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, jnp.bfloat16


@dataclass(frozen=True)
class Case:
    batch: int
    context: int
    block_size: int


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    block_sizes: tuple[int, ...]
    sweep_at: tuple[int, int]  # (batch, context) of the block-size sweep
    copy_bytes: int


GPU_SIZES = Sizes((1, 8, 32, 128), (512, 2048, 8192), (8, 16, 32, 64, 128, 256), (32, 8192), 2**30)
CPU_SIZES = Sizes((1, 4), (128, 512), (8, 16, 64), (4, 512), 2**26)


def make_case(case: Case, key: jax.Array):
    """q [B, Hq, D]; pools [Hkv, B * C / bs, bs, D] with each sequence's blocks scattered."""
    blocks_per_seq = case.context // case.block_size
    num_blocks = case.batch * blocks_per_seq
    kq, kk, kv, kp = jax.random.split(key, 4)
    pool = (NUM_KV_HEADS, num_blocks, case.block_size, HEAD_DIM)
    q = jax.random.normal(kq, (case.batch, NUM_Q_HEADS, HEAD_DIM), DTYPE)
    k_pages = jax.random.normal(kk, pool, DTYPE)
    v_pages = jax.random.normal(kv, pool, DTYPE)
    tables = jax.random.permutation(kp, num_blocks).reshape(case.batch, blocks_per_seq).astype(jnp.int32)
    lengths = jnp.full((case.batch,), case.context, jnp.int32)
    return q, k_pages, v_pages, tables, lengths


def kv_bytes(case: Case) -> int:
    itemsize = jnp.dtype(DTYPE).itemsize
    return 2 * case.batch * case.context * NUM_KV_HEADS * HEAD_DIM * itemsize


@jax.jit
def dense_attention(q, k, v, lengths):
    """q [B, Hq, D]; k, v [B, Hkv, C, D] contiguous; what a JAX user would write."""
    batch, _, head_dim = q.shape
    q = q.reshape(batch, NUM_KV_HEADS, -1, head_dim)
    scores = jnp.einsum("bhgd,bhcd->bhgc", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    visible = jnp.arange(k.shape[2]) < lengths[:, None, None, None]
    weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgc,bhcd->bhgd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, -1, head_dim).astype(q.dtype)


def jax_builtin(case: Case):
    """JAX's own Pallas GPU paged attention with its defaults, made to fit the shapes."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as builtin

    pages = case.context // case.block_size
    k_splits = max(s for s in (1, 2, 4, 8, 16) if pages % s == 0)
    per_split = pages // k_splits
    per_block = min(per_split, max(8, 16 // case.block_size))
    while per_split % per_block:
        per_block //= 2
    return functools.partial(builtin, k_splits=k_splits, pages_per_compute_block=per_block)


def copy_bandwidth(num_bytes: int) -> float:
    """GB/s of an elementwise pass that reads and writes `num_bytes` each."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    seconds = time_call(lambda: _plus_one(x))
    return 2 * num_bytes / seconds / 1e9


@jax.jit
def _plus_one(x):
    return x + 1


def measure(case: Case, impls: dict, copy_gbps: float) -> dict:
    q, k_pages, v_pages, tables, lengths = make_case(case, jax.random.PRNGKey(case.batch * 7 + case.block_size))
    results = {}
    for name, attend in impls.items():
        try:
            seconds = time_call(lambda: attend(q, k_pages, v_pages, tables, lengths))
        except Exception as error:  # a baseline that cannot run a shape is reported, not fatal
            results[name] = f"error: {type(error).__name__}"
            continue
        gbps = kv_bytes(case) / seconds / 1e9
        results[name] = (seconds, gbps, 100 * gbps / copy_gbps)
    return results


def contiguous_baselines(case: Case, ours) -> dict:
    """Dense XLA attention, and our kernel with one page per sequence."""
    q, k_pages, v_pages, tables, lengths = make_case(Case(case.batch, case.context, case.context), jax.random.PRNGKey(1))
    k = k_pages.transpose(1, 0, 2, 3)  # [B, Hkv, C, D]; one page per sequence
    v = v_pages.transpose(1, 0, 2, 3)
    return {
        "dense": time_call(lambda: dense_attention(q, k, v, lengths)),
        "unpaged": time_call(lambda: ours(q, k_pages, v_pages, tables, lengths)),
    }


def tune(case: Case, backend, copy_gbps: float) -> str:
    """Time the kernel's launch parameters at one shape; the defaults should sit at the top."""
    configs = [
        dict(block_kv=bk, num_warps=w, num_stages=st, num_splits=sp)
        for bk in (64, 128) for w in (4, 8) for st in (2, 3) for sp in (None, 4, 8)
    ]
    impls = {str(c): functools.partial(backend.paged_attention, **c) for c in configs}
    result = measure(case, impls, copy_gbps)
    ranked = sorted(result.items(), key=lambda kv: kv[1][0] if not isinstance(kv[1], str) else math.inf)
    rows = [[name, fmt_time(r), *([f"{r[1]:.3g}", f"{r[2]:.0f}%"] if not isinstance(r, str) else ["-", "-"])]
            for name, r in ranked]
    return (f"## Launch parameters at batch {case.batch} x context {case.context}, block {case.block_size}\n\n"
            + markdown_table(["config", "us", "GB/s", "% of copy BW"], rows))


def fmt_time(result) -> str:
    return result if isinstance(result, str) else f"{result[0] * 1e6:.1f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every block size at every batch x context")
    parser.add_argument("--tune", action="store_true", help="also sweep the kernel's launch parameters")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    backend = pk.get_backend("pallas" if on_gpu else "pallas_interpret")
    ours = backend.paged_attention
    impls = {"ours": ours, "xla backend": pk.get_backend("xla").paged_attention}
    if on_gpu:
        impls["jax builtin"] = None  # made per case: its split parameters depend on the shape

    copy_gbps = copy_bandwidth(sizes.copy_bytes)
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")

    grid_blocks = sizes.block_sizes if args.full else (16,)
    cases = [Case(b, c, bs) for b in sizes.batches for c in sizes.contexts for bs in grid_blocks]
    sweep_batch, sweep_context = sizes.sweep_at
    cases += [Case(sweep_batch, sweep_context, bs) for bs in sizes.block_sizes]
    cases = sorted(set(cases), key=lambda c: (c.batch, c.context, c.block_size))

    rows, sweep_rows, contiguous = [], [], {}
    for case in tqdm(cases, desc="kernel_bench"):
        case_impls = {k: (jax_builtin(case) if k == "jax builtin" else v) for k, v in impls.items()}
        result = measure(case, case_impls, copy_gbps)
        key = (case.batch, case.context)
        if key not in contiguous:
            contiguous[key] = contiguous_baselines(case, ours)
        base = contiguous[key]
        mine = result["ours"]
        other = [fmt_time(result[name]) for name in impls if name != "ours"]
        overhead = [f"{100 * (mine[0] / base[b] - 1):+.0f}%" if not isinstance(mine, str) else "-" for b in ("unpaged", "dense")]
        row = [case.batch, case.context, case.block_size, fmt_time(mine)]
        row += [f"{mine[1]:.3g}", f"{mine[2]:.0f}%"] if not isinstance(mine, str) else ["-", "-"]
        row += other + [f"{base['unpaged'] * 1e6:.1f}", f"{base['dense'] * 1e6:.1f}"] + overhead
        if case.block_size in grid_blocks:
            rows.append(row)
        if key == sizes.sweep_at:
            sweep_rows.append(row)

    other_names = [f"{name} (us)" for name in impls if name != "ours"]
    header = ["batch", "context", "block", "ours (us)", "GB/s", "% of copy BW", *other_names,
              "unpaged (us)", "dense XLA (us)", "paged vs unpaged", "paged vs dense"]
    body = (
        f"Decode attention, {NUM_Q_HEADS} query / {NUM_KV_HEADS} KV heads of {HEAD_DIM}, "
        f"{jnp.dtype(DTYPE).name}; backend `{backend.name}`. Device copy bandwidth "
        f"(read + write of {sizes.copy_bytes >> 20} MiB): {copy_gbps:.0f} GB/s. "
        "GB/s counts the K/V bytes each call must read.\n\n"
        "## Batch x context\n\n" + markdown_table(header, rows) + "\n\n"
        f"## Block-size sweep at batch {sweep_batch} x context {sweep_context}\n\n"
        + markdown_table(header, sweep_rows)
    )
    if args.tune:
        body += "\n\n" + tune(Case(sweep_batch, sweep_context, 16), backend, copy_gbps)
    if not on_gpu:
        body += (
            "\n\nOn a CPU the kernel runs in the Pallas interpreter: these times check that the "
            "benchmark runs end to end and say nothing about GPU performance."
        )
    report(f"kernel_bench_{device_slug()}", "Paged-attention kernel benchmark", body)
    return body


if __name__ == "__main__":
    main()
