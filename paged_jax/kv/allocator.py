"""A pure-functional block allocator for the paged KV cache, in numpy on the host.

The state is immutable: a stack of free block ids, how many are free, and a reference count
per block (read-only arrays; an operation builds the ones it changes). Every operation is a function
`state -> (state, result)`. Sharing is reference counting: fork increments counts, free
decrements them and returns a block to the stack when its count reaches zero, copy-on-write
moves a writer off a shared block.

A failed allocation leaves the state unchanged and says so (`ok`), so callers never need to
undo half an allocation.

Why numpy on the host: the scheduler calls the allocator between steps, a few blocks at a
time, and plans with the free count and reference counts it leaves. A jitted jax.numpy
operation pays a device dispatch for such a few-element update, and reading its result back
to plan pays again; a numpy operation does neither and leaves its result where the scheduler
reads it (the two compared: experiments/allocator_bench.py, results/allocator_cpu.md). What a
jitted allocator allowed,
allocating inside a device-side multi-step decode loop, is not needed: the engine gives each
sequence the blocks for all of a loop's tokens before the loop runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AllocatorState:
    free_stack: np.ndarray  # int32[num_blocks]; entries [0, num_free) are free, the top is last
    num_free: int
    ref_counts: np.ndarray  # int32[num_blocks]; 0 for a free block

    def __post_init__(self):
        # Read-only: states share arrays (allocate keeps the free stack), so a write would change both.
        self.free_stack.flags.writeable = False
        self.ref_counts.flags.writeable = False

    @property
    def num_blocks(self) -> int:
        return self.ref_counts.shape[0]


def init_allocator(num_blocks: int) -> AllocatorState:
    """All blocks free; block 0 is handed out first."""
    return AllocatorState(np.arange(num_blocks - 1, -1, -1, dtype=np.int32), num_blocks, np.zeros(num_blocks, np.int32))


def allocate(state: AllocatorState, n: int) -> tuple[AllocatorState, np.ndarray, bool]:
    """n new blocks, all or nothing: (state, blocks int32[n], ok); none on failure. Asking
    for none, or handing back none, leaves the state as it is: the block manager asks every
    step for every growing sequence, and most of them need nothing."""
    if n == 0 or n > state.num_free:
        return state, np.zeros(0, np.int32), n == 0
    top = state.num_free - n
    blocks = state.free_stack[top:state.num_free][::-1].copy()  # the top of the stack first
    ref_counts = state.ref_counts.copy()
    ref_counts[blocks] = 1
    return AllocatorState(state.free_stack, top, ref_counts), blocks, True


def free(state: AllocatorState, blocks) -> AllocatorState:
    """Drop one reference to each block (int32[K]; a block may repeat). Blocks whose count
    reaches zero go back on the stack, each once, in ascending order."""
    blocks = np.asarray(blocks, np.int32)
    if blocks.size == 0:
        return state
    ref_counts = state.ref_counts.copy()
    np.subtract.at(ref_counts, blocks, 1)
    released = np.unique(blocks[ref_counts[blocks] == 0])
    free_stack = state.free_stack.copy()
    free_stack[state.num_free:state.num_free + len(released)] = released
    return AllocatorState(free_stack, state.num_free + len(released), ref_counts)


def fork(state: AllocatorState, blocks) -> AllocatorState:
    """One more reference to each block (int32[K]; a block may repeat): a second table shares it."""
    blocks = np.asarray(blocks, np.int32)
    if blocks.size == 0:
        return state
    ref_counts = state.ref_counts.copy()
    np.add.at(ref_counts, blocks, 1)
    return AllocatorState(state.free_stack, state.num_free, ref_counts)


def copy_on_write(state: AllocatorState, blocks) -> tuple[AllocatorState, np.ndarray, np.ndarray, bool]:
    """Make each block (int32[K]) private to its writer before a write.

    A block with one reference is already private and is kept. A shared block is replaced by
    a new one (the caller copies the contents), and the shared one loses a reference. Done in
    order, so two writers of one block shared by exactly two: the first gets a copy, the
    second keeps the original. All or nothing: (state, targets int32[K], copied bool[K], ok)."""
    blocks = np.asarray(blocks, np.int32)
    ref_counts = state.ref_counts.copy()
    targets = blocks.copy()
    num_free = state.num_free
    for i, block in enumerate(blocks.tolist()):
        if ref_counts[block] <= 1:
            continue
        if num_free == 0:
            return state, blocks, np.zeros(blocks.shape, bool), False
        num_free -= 1
        targets[i] = state.free_stack[num_free]
        ref_counts[block] -= 1
        ref_counts[targets[i]] = 1
    return AllocatorState(state.free_stack, num_free, ref_counts), targets, targets != blocks, True
