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
bandwidth.

Sizes: quick (the default, what `make run` and experiments/gpu_check.sh run) times block 16 at
every batch x context and sweeps the block size at one of them; full times every block size
at every batch x context; tiny is two cases, for the notebook tests. On a CPU the sizes shrink
and the kernel runs in the Pallas interpreter: a check that the benchmark runs end to end.
Run `python -m experiments.kernel_bench [--size tiny|quick|full] [--tune]`; results go to
experiments/results/kernel_bench_<device>[_<size>].{md,json,png}.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from tqdm import tqdm

import pallas_kernels as pk
from experiments.common import device_kind, figure_main, markdown_table, new_figure, time_call

# Llama-3-8B attention: 32 query heads over 8 KV heads of 128, bfloat16.
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, jnp.bfloat16
BLOCK_SIZE = 16  # the engine's default, and the block size of the paper's Fig. 18a
PAPER_OVERHEAD = "+20-26 %"  # PagedAttention against FasterTransformer's contiguous kernel
NAME = "kernel_bench"
TITLE = "Paged-attention kernel benchmark (Fig. 18a)"
DEFAULT_SIZE = "quick"  # the size whose results file carries no size suffix


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
    grid_blocks: tuple[int, ...] = (BLOCK_SIZE,)  # block sizes timed at every batch x context

    def every_block(self) -> Sizes:
        return dataclasses.replace(self, grid_blocks=self.block_sizes)


GPU_SIZES = Sizes((1, 8, 32, 128), (512, 2048, 8192), (8, 16, 32, 64, 128, 256), (32, 8192), 2**30)
CPU_SIZES = Sizes((1, 4), (128, 512), (8, 16, 64), (4, 512), 2**26)
TINY_SIZES = Sizes((1,), (128,), (16, 64), (1, 128), 2**24)
SIZES = {
    "tiny": {"cpu": TINY_SIZES, "gpu": TINY_SIZES},
    "quick": {"cpu": CPU_SIZES, "gpu": GPU_SIZES},
    "full": {"cpu": CPU_SIZES.every_block(), "gpu": GPU_SIZES.every_block()},
}


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


def kv_bytes(batch: int, context: int) -> int:
    itemsize = jnp.dtype(DTYPE).itemsize
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * itemsize


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


def time_impls(case: Case, impls: dict) -> dict:
    """Seconds per call of each implementation, or the error that kept it from running: a
    baseline that cannot run a shape is reported, not fatal."""
    q, k_pages, v_pages, tables, lengths = make_case(case, jax.random.PRNGKey(case.batch * 7 + case.block_size))
    seconds = {}
    for name, attend in impls.items():
        try:
            seconds[name] = time_call(lambda: attend(q, k_pages, v_pages, tables, lengths))
        except Exception as error:
            seconds[name] = f"error: {type(error).__name__}"
    return seconds


def contiguous_baselines(batch: int, context: int, ours) -> dict:
    """Dense XLA attention, and our kernel with one page per sequence."""
    q, k_pages, v_pages, tables, lengths = make_case(Case(batch, context, context), jax.random.PRNGKey(1))
    k = k_pages.transpose(1, 0, 2, 3)  # [B, Hkv, C, D]; one page per sequence
    v = v_pages.transpose(1, 0, 2, 3)
    return dict(batch=batch, context=context,
                dense=time_call(lambda: dense_attention(q, k, v, lengths)),
                unpaged=time_call(lambda: ours(q, k_pages, v_pages, tables, lengths)))


def tune(case: Case, backend) -> dict:
    """Time the kernel's launch parameters at one shape; the defaults should sit at the top."""
    configs = [
        dict(block_kv=bk, num_warps=w, num_stages=st, num_splits=sp)
        for bk in (64, 128) for w in (4, 8) for st in (2, 3) for sp in (None, 4, 8)
    ]
    impls = {str(c): functools.partial(backend.paged_attention, **c) for c in configs}
    return dict(case=dataclasses.asdict(case), seconds=time_impls(case, impls))


def measure(size: str = DEFAULT_SIZE, *, tune: bool = False) -> dict:
    """Time every case of the size on this machine's sizes (tune: also the kernel's
    launch parameters at the sweep shape)."""
    platform = "gpu" if jax.default_backend() == "gpu" else "cpu"
    sizes = SIZES[size][platform]
    backend = pk.get_backend("pallas" if platform == "gpu" else "pallas_interpret")
    impls = {"ours": backend.paged_attention, "xla backend": pk.get_backend("xla").paged_attention}
    if platform == "gpu":
        impls["jax builtin"] = None  # made per case: its split parameters depend on the shape

    copy_gbps = copy_bandwidth(sizes.copy_bytes)
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")

    cases = [Case(b, c, bs) for b in sizes.batches for c in sizes.contexts for bs in sizes.grid_blocks]
    cases += [Case(*sizes.sweep_at, bs) for bs in sizes.block_sizes]
    cases = sorted(set(cases), key=lambda c: (c.batch, c.context, c.block_size))
    timed = []
    for case in tqdm(cases, desc="kernel_bench"):
        case_impls = {k: (jax_builtin(case) if k == "jax builtin" else v) for k, v in impls.items()}
        timed.append(dict(dataclasses.asdict(case), seconds=time_impls(case, case_impls)))
    shapes = sorted({(c.batch, c.context) for c in cases})
    data = dict(
        machine=device_kind(), size=size, platform=platform, backend=backend.name,
        shape=dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                   dtype=jnp.dtype(DTYPE).name),
        sizes=_jsonable(dataclasses.asdict(sizes)), copy_gbps=copy_gbps, impls=list(impls), cases=timed,
        contiguous=[contiguous_baselines(b, c, backend.paged_attention) for b, c in shapes],
    )
    if tune:
        data["tune"] = tune(Case(*sizes.sweep_at, BLOCK_SIZE), backend)
    return data


def _jsonable(sizes: dict) -> dict:
    """Tuples as lists: the data compares the same before and after a JSON round trip."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}


# -- the table --------------------------------------------------------------------------------

def fmt_time(seconds) -> str:
    return seconds if isinstance(seconds, str) else f"{seconds * 1e6:.1f}"


def _bandwidth_cells(seconds, num_bytes: int, copy_gbps: float) -> list[str]:
    if isinstance(seconds, str):
        return ["-", "-"]
    gbps = num_bytes / seconds / 1e9
    return [f"{gbps:.3g}", f"{100 * gbps / copy_gbps:.0f}%"]


def _baseline(data: dict, batch: int, context: int) -> dict:
    return next(b for b in data["contiguous"] if (b["batch"], b["context"]) == (batch, context))


def _overhead(seconds, base: float) -> str:
    return "-" if isinstance(seconds, str) else f"{100 * (seconds / base - 1):+.0f}%"


def _row(data: dict, case: dict) -> list:
    base = _baseline(data, case["batch"], case["context"])
    mine = case["seconds"]["ours"]
    return [case["batch"], case["context"], case["block_size"], fmt_time(mine),
            *_bandwidth_cells(mine, kv_bytes(case["batch"], case["context"]), data["copy_gbps"]),
            *[fmt_time(case["seconds"][name]) for name in data["impls"][1:]],
            f"{base['unpaged'] * 1e6:.1f}", f"{base['dense'] * 1e6:.1f}",
            _overhead(mine, base["unpaged"]), _overhead(mine, base["dense"])]


def _grid(data: dict) -> list[dict]:
    return [c for c in data["cases"] if c["block_size"] in data["sizes"]["grid_blocks"]]


def _sweep(data: dict) -> list[dict]:
    return [c for c in data["cases"] if [c["batch"], c["context"]] == data["sizes"]["sweep_at"]]


def _tune_table(data: dict) -> str:
    tuned, case = data["tune"]["seconds"], data["tune"]["case"]
    num_bytes = kv_bytes(case["batch"], case["context"])
    ranked = sorted(tuned.items(), key=lambda kv: math.inf if isinstance(kv[1], str) else kv[1])
    rows = [[name, fmt_time(s), *_bandwidth_cells(s, num_bytes, data["copy_gbps"])] for name, s in ranked]
    return (f"## Launch parameters at batch {case['batch']} x context {case['context']}, block {case['block_size']}\n\n"
            + markdown_table(["config", "us", "GB/s", "% of copy BW"], rows))


def table(data: dict) -> str:
    sizes, shape = data["sizes"], data["shape"]
    header = ["batch", "context", "block", "ours (us)", "GB/s", "% of copy BW",
              *[f"{name} (us)" for name in data["impls"][1:]],
              "unpaged (us)", "dense XLA (us)", "paged vs unpaged", "paged vs dense"]
    sweep_batch, sweep_context = sizes["sweep_at"]
    body = (
        f"Decode attention, {shape['num_q_heads']} query / {shape['num_kv_heads']} KV heads of "
        f"{shape['head_dim']}, {shape['dtype']}; backend `{data['backend']}`. Device copy bandwidth "
        f"(read + write of {sizes['copy_bytes'] >> 20} MiB): {data['copy_gbps']:.0f} GB/s. "
        "GB/s counts the K/V bytes each call must read. The paper (Fig. 18a): PagedAttention latency "
        f"{PAPER_OVERHEAD} against FasterTransformer's contiguous kernel.\n\n"
        "## Batch x context\n\n" + markdown_table(header, [_row(data, c) for c in _grid(data)]) + "\n\n"
        f"## Block-size sweep at batch {sweep_batch} x context {sweep_context}\n\n"
        + markdown_table(header, [_row(data, c) for c in _sweep(data)])
    )
    if "tune" in data:
        body += "\n\n" + _tune_table(data)
    if data["platform"] != "gpu":
        body += (
            "\n\nOn a CPU the kernel runs in the Pallas interpreter: these times check that the "
            "benchmark runs end to end and say nothing about GPU performance."
        )
    return body


# -- the figure and the headline ----------------------------------------------------------------

def _us(seconds) -> float:
    """Microseconds, NaN (a gap in the plot) for an implementation that could not run."""
    return math.nan if isinstance(seconds, str) else seconds * 1e6


def plot(data: dict):
    """Latency against context at the sweep's batch (block 16), and against block size at the
    sweep's shape; the contiguous baselines drawn alongside."""
    fig, (by_context, by_block) = new_figure(ncols=2)
    batch, context = data["sizes"]["sweep_at"]
    paged = [c for c in data["cases"] if c["batch"] == batch and c["block_size"] == BLOCK_SIZE]
    bases = [_baseline(data, batch, c["context"]) for c in paged]
    contexts = [c["context"] for c in paged]
    by_context.plot(contexts, [_us(c["seconds"]["ours"]) for c in paged], "o-",
                    label=f"ours (paged, block {BLOCK_SIZE})")
    by_context.plot(contexts, [_us(b["unpaged"]) for b in bases], "s--", label="ours unpaged (contiguous)")
    by_context.plot(contexts, [_us(b["dense"]) for b in bases], "^:", label="dense XLA")
    _log2_axis(by_context, contexts, "context (tokens)")
    by_context.set_title(f"latency vs context, batch {batch}", fontsize=9)

    sweep, base = _sweep(data), _baseline(data, batch, context)
    blocks = [c["block_size"] for c in sweep]
    by_block.plot(blocks, [_us(c["seconds"]["ours"]) for c in sweep], "o-", label="ours (paged)")
    by_block.axhline(_us(base["unpaged"]), color="C1", linestyle="--", label="ours unpaged (contiguous)")
    by_block.axhline(_us(base["dense"]), color="C2", linestyle=":", label="dense XLA")
    _log2_axis(by_block, blocks, "block size (tokens)")
    by_block.set_title(f"block-size sweep, batch {batch} x context {context}", fontsize=9)
    by_context.legend(fontsize="small")
    fig.suptitle(f"Fig. 18a: decode paged attention, backend {data['backend']} ({data['machine']})", fontsize=9)
    fig.tight_layout()
    return fig


def _log2_axis(ax, ticks: list[int], xlabel: str) -> None:
    """Log-log axes labelled at the measured points only."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.set(xlabel=xlabel, ylabel="latency (us)")
    ax.grid(alpha=0.3)


def headline(data: dict) -> list[list[str]]:
    """Paged against unpaged at block 16, over the batch x context grid; on a CPU, why there is
    no number: the interpreter runs the kernel's program op by op in Python, so its times
    measure the interpreter, and a block table's cost on a GPU (scattered reads from HBM)
    has nothing to show there."""
    quantity = "paged kernel latency vs contiguous (unpaged)"
    if data["platform"] != "gpu":
        return [["Fig. 18a", quantity, PAPER_OVERHEAD,
                 "not measured: needs a GPU (on a CPU the Pallas kernel runs in its interpreter, whose times "
                 "measure the interpreter)"]]
    overheads = sorted(100 * (c["seconds"]["ours"] / _baseline(data, c["batch"], c["context"])["unpaged"] - 1)
                       for c in _grid(data)
                       if c["block_size"] == BLOCK_SIZE and not isinstance(c["seconds"]["ours"], str))
    ours = f"{overheads[0]:+.0f} %" if len(overheads) == 1 else f"{overheads[0]:+.0f} to {overheads[-1]:+.0f} %"
    return [["Fig. 18a", quantity, PAPER_OVERHEAD, ours]]


def main(argv: list[str] | None = None) -> dict:
    return figure_main(sys.modules[__name__], argv, flags={"tune": "also sweep the kernel's launch parameters"})


if __name__ == "__main__":
    main()
