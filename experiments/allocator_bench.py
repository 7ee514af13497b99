"""The block allocator in numpy on the host or jitted in jax.numpy: the measurement behind the choice.

The scheduler calls the allocator between steps, a few blocks at a time, and plans with the
free count and reference counts. This times the operations the block manager issues (allocate
n blocks, free, fork, copy-on-write of n shared blocks, at widths 1..64 on a pool of 4096
blocks) through each allocator's BlockPool, as the block manager calls it: the numpy one
(paged_jax/kv/allocator.py) against the jitted jax.numpy one it replaced, loaded from git
(commit BEFORE, with the BlockPool that padded requests to power-of-two widths and read the
free count and reference counts back after every operation). The jitted operation alone
(dispatched and waited for, no read back) is shown too. Then the host cost of a block
manager's `grow` for one decode step of 64 sequences (block size 16: a few sequences cross
into a new block each step), with either pool under the same BlockManager.

Medians over repeats, the contenders taking turns (a shared machine is noisy); ratio = jitted
pool / numpy pool.

    python -m experiments.allocator_bench [--repeats 15] [--num-blocks 4096]

It reads the old allocator from the repository's history, so it needs a clone that has commit
BEFORE (not a shallow one); the tests do not run it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import statistics
import subprocess
import tempfile
import timeit
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from experiments.common import device_slug, markdown_table, report
from paged_jax.kv.block_manager import BlockManager, BlockPool
from paged_jax.sequence import Sequence

BEFORE = "2fcdad9"  # the last commit with the jitted allocator (paged_jax/allocator.py, paged_jax/block_manager.py)
WIDTHS = (1, 2, 4, 8, 16, 32, 64)
REPO = Path(__file__).resolve().parent.parent


def _git_show(path: str) -> str:
    return subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


def load_jax_allocator():
    """The jitted allocator module and its BlockPool class, as they were at BEFORE."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jax_allocator.py"
        path.write_text(_git_show("paged_jax/allocator.py"))
        spec = importlib.util.spec_from_file_location("jax_allocator", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    # Only BlockPool and its _padded from the old block_manager.py: its imports name old paths.
    tree = ast.parse(_git_show("paged_jax/block_manager.py"))
    tree.body = [node for node in tree.body if getattr(node, "name", None) in ("_padded", "BlockPool")]
    namespace = {"allocator": module, "np": np, "jax": jax, "Counter": Counter}
    exec(compile(tree, f"{BEFORE}:paged_jax/block_manager.py", "exec"), namespace)
    return module, namespace["BlockPool"], namespace["_padded"]


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Each call's mean time, median over repeats (after one call to warm up). The calls take
    turns, so that the load of a shared machine falls on each alike."""
    numbers = []
    for fn in fns:
        fn()
        numbers.append(max(1, int(0.02 / max(timeit.timeit(fn, number=1), 1e-7))))
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, number, times in zip(fns, numbers, samples):
            times.append(timeit.timeit(fn, number=number) / number)
    return [statistics.median(times) for times in samples]


def pool_states(pool, n: int) -> dict[str, object]:
    """The pool's states that the operations start from: empty, n blocks held once, n held twice."""
    empty = pool.state
    held = pool.allocate(n)
    once = pool.state
    pool.fork(held)
    twice = pool.state
    pool.state = empty
    return {"empty": empty, "once": once, "twice": twice, "blocks": held}


def pool_operations(pool, n: int) -> dict[str, object]:
    """Each operation as the block manager issues it, from a fixed starting state."""
    s = pool_states(pool, n)

    def run(start, op):
        def call():
            pool.state = start
            op()
        return call

    return {"allocate": run(s["empty"], lambda: pool.allocate(n)),
            "free": run(s["once"], lambda: pool.free(s["blocks"])),
            "fork": run(s["once"], lambda: pool.fork(s["blocks"])),
            "copy_on_write": run(s["twice"], lambda: pool.copy_on_write(s["blocks"]))}


def jitted_operations(module, padded, pool, n: int) -> dict[str, object]:
    """The jitted operations alone, on the same padded host arrays, waited for, not read back."""
    s = pool_states(pool, n)
    ids = padded(s["blocks"])
    want = padded([0] * n) >= 0
    return {"allocate": lambda: jax.block_until_ready(module.allocate_where(s["empty"], want)),
            "free": lambda: jax.block_until_ready(module.free(s["once"], ids)),
            "fork": lambda: jax.block_until_ready(module.fork(s["once"], ids)),
            "copy_on_write": lambda: jax.block_until_ready(module.copy_on_write(s["twice"], ids))}


def grow_steps(pool, steps: int = 256, num_seqs: int = 64, block_size: int = 16):
    """A run of decode steps of num_seqs sequences, timing BlockManager.grow with pool as its
    device pool: a function returning (host seconds per step, blocks taken per step)."""
    bm = BlockManager(pool.num_blocks, block_size, watermark=0)
    bm.device_pool = pool
    # Prompts of staggered lengths, so that a few sequences cross into a new block each step.
    seqs = [Sequence(seq_id=i, index=0, prompt_token_ids=[1] * (100 + 7 * i), key=np.zeros(2, np.uint32),
                     detokenizer=None) for i in range(num_seqs)]

    def run() -> tuple[float, float]:
        for seq in seqs:
            seq.num_computed_tokens = 0
        assert bm.grow([(seq, seq.num_tokens) for seq in seqs])  # the prompts' blocks, not timed
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
        prompt_blocks = bm.num_blocks - bm.num_free_blocks
        start = timeit.default_timer()
        for _ in range(steps):
            assert bm.grow([(seq, seq.num_computed_tokens + 1) for seq in seqs])
            for seq in seqs:
                seq.num_computed_tokens += 1
        seconds = timeit.default_timer() - start
        new_blocks = bm.num_blocks - bm.num_free_blocks - prompt_blocks
        bm.free(seqs)
        return seconds / steps, new_blocks / steps

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--num-blocks", type=int, default=4096)
    args = parser.parse_args(argv)
    module, JaxBlockPool, padded = load_jax_allocator()
    cpu = jax.local_devices(backend="cpu")[0]  # where the block manager kept the jitted allocator's state

    def jax_pool(num_blocks: int):
        pool = JaxBlockPool(num_blocks, cpu)
        pool.warm_up(max(WIDTHS))  # what the engine did at start-up: every padded width compiled
        return pool

    numpy_pool, old_pool = BlockPool(args.num_blocks), jax_pool(args.num_blocks)
    rows = []
    for op in ("allocate", "free", "fork", "copy_on_write"):
        for n in WIDTHS:
            ours, jitted, theirs = median_seconds([pool_operations(numpy_pool, n)[op],
                                                   jitted_operations(module, padded, old_pool, n)[op],
                                                   pool_operations(old_pool, n)[op]], args.repeats)
            rows.append([op, n, f"{1e6 * ours:.1f}", f"{1e6 * jitted:.1f}", f"{1e6 * theirs:.1f}",
                         f"{theirs / ours:.1f}x"])
    table = markdown_table(["operation", "blocks", "numpy pool (us)", "jitted op alone (us)",
                            "jitted pool (us)", "ratio"], rows)
    runs = [grow_steps(BlockPool(args.num_blocks)), grow_steps(jax_pool(args.num_blocks))]
    for run in runs:
        run()  # warm up
    samples = [[run() for run in runs] for _ in range(args.repeats)]
    ours, theirs = (statistics.median(sample[i][0] for sample in samples) for i in range(2))
    grow = markdown_table(["BlockManager.grow, 64 decoding sequences", "numpy pool (us/step)",
                           "jitted pool (us/step)", "ratio"],
                          [[f"block size 16, {samples[0][0][1]:.2f} new blocks per step", f"{1e6 * ours:.1f}",
                            f"{1e6 * theirs:.1f}", f"{theirs / ours:.1f}x"]])
    body = (f"Pool of {args.num_blocks} blocks; median over {args.repeats} repeats. numpy pool: "
            f"paged_jax/kv/allocator.py through BlockPool. jitted op alone: the jax.numpy allocator of "
            f"{BEFORE} on the CPU device, dispatched and waited for. jitted pool: {BEFORE}'s BlockPool over it, "
            "as the block manager called it (requests padded to a power-of-two width, free count and reference "
            "counts read back after each operation). ratio = jitted pool / numpy pool.\n\n"
            f"{table}\n\nHost cost of growing the block tables for one decode step:\n\n{grow}")
    report(f"allocator_{device_slug()}", "Block allocator: numpy on the host vs jitted jax.numpy", body)


if __name__ == "__main__":
    main()
