"""A pure-functional block allocator for the paged KV cache.

The state is an immutable pytree: a stack of free block ids, how many are free, and a
reference count per block. Every operation is a jitted function `state -> (state, result)`
written in jax.numpy, so the same code runs on the host (the scheduler keeps its state on
the CPU device) and inside a jitted loop (a multi-step decode that allocates on device).
Sharing is reference counting: fork increments counts, free decrements them and returns a
block to the stack when its count reaches zero, copy-on-write moves a writer off a shared
block. Shapes are static: requests are padded with -1, which every operation ignores.

A failed allocation leaves the state unchanged and says so (`ok`), so callers never need to
undo half an allocation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class AllocatorState:
    free_stack: jax.Array  # int32[num_blocks]; entries [0, num_free) are free, the top is last
    num_free: jax.Array  # int32[]
    ref_counts: jax.Array  # int32[num_blocks]; 0 for a free block

    @property
    def num_blocks(self) -> int:
        return self.ref_counts.shape[0]


def init_allocator(num_blocks: int, device: jax.Device | None = None) -> AllocatorState:
    """All blocks free; block 0 is handed out first."""
    state = AllocatorState(
        free_stack=jnp.arange(num_blocks - 1, -1, -1, dtype=jnp.int32),
        num_free=jnp.int32(num_blocks),
        ref_counts=jnp.zeros(num_blocks, jnp.int32),
    )
    return jax.device_put(state, device) if device is not None else state


def _slot(state: AllocatorState, blocks: jax.Array) -> jax.Array:
    """Scatter index of each block; padding (-1) maps past the end and is dropped."""
    return jnp.where(blocks >= 0, blocks, state.num_blocks)


@jax.jit
def allocate_where(state: AllocatorState, want: jax.Array) -> tuple[AllocatorState, jax.Array, jax.Array]:
    """One new block for each True in want (bool[K]), all or nothing.

    Returns (state, blocks int32[K] with -1 where not wanted or on failure, ok)."""
    count = want.sum(dtype=jnp.int32)
    ok = count <= state.num_free
    take = want & ok
    rank = jnp.cumsum(take, dtype=jnp.int32) - 1
    top = jnp.clip(state.num_free - 1 - rank, 0, state.num_blocks - 1)
    blocks = jnp.where(take, state.free_stack[top], -1)
    return (
        state.replace(
            num_free=state.num_free - jnp.where(ok, count, 0),
            ref_counts=state.ref_counts.at[_slot(state, blocks)].set(1, mode="drop"),
        ),
        blocks,
        ok,
    )


def allocate(state: AllocatorState, n: int) -> tuple[AllocatorState, jax.Array, jax.Array]:
    """n new blocks (n static), all or nothing: (state, blocks int32[n], ok)."""
    return allocate_where(state, jnp.ones(n, bool))


@jax.jit
def free(state: AllocatorState, blocks: jax.Array) -> AllocatorState:
    """Drop one reference to each block (int32[K], -1 = padding; a block may repeat). Blocks
    whose count reaches zero go back on the stack, each once."""
    slots = _slot(state, blocks)
    ref_counts = state.ref_counts.at[slots].add(-1, mode="drop")
    ordered = jnp.sort(slots)
    first = jnp.concatenate([jnp.ones(1, bool), ordered[1:] != ordered[:-1]])
    released = first & (ordered < state.num_blocks)
    released &= ref_counts[jnp.minimum(ordered, state.num_blocks - 1)] == 0
    position = state.num_free + jnp.cumsum(released, dtype=jnp.int32) - 1
    stack = state.free_stack.at[jnp.where(released, position, state.num_blocks)].set(ordered, mode="drop")
    return state.replace(
        free_stack=stack,
        num_free=state.num_free + released.sum(dtype=jnp.int32),
        ref_counts=ref_counts,
    )


@jax.jit
def fork(state: AllocatorState, blocks: jax.Array) -> AllocatorState:
    """One more reference to each block (int32[K], -1 = padding): a second table shares it."""
    return state.replace(ref_counts=state.ref_counts.at[_slot(state, blocks)].add(1, mode="drop"))


@jax.jit
def copy_on_write(state: AllocatorState, blocks: jax.Array) -> tuple[AllocatorState, jax.Array, jax.Array, jax.Array]:
    """Make each block (int32[K], -1 = padding) private to its writer before a write.

    A block with one reference is already private and is kept. A shared block is replaced by
    a new one (the caller copies the contents), and the shared one loses a reference. Done in
    order, so two writers of one block shared by exactly two: the first gets a copy, the
    second keeps the original. All or nothing: (state, targets int32[K], copied bool[K], ok)."""

    def one(carry, block):
        s, ok = carry
        shared = (block >= 0) & (s.ref_counts[jnp.maximum(block, 0)] > 1)
        s2, new, got = allocate_where(s, shared[None])
        s2 = s2.replace(ref_counts=s2.ref_counts.at[_slot(s2, jnp.where(shared, block, -1))].add(-1, mode="drop"))
        return (s2, ok & got), (jnp.where(shared, new[0], block), shared)

    (new_state, ok), (targets, copied) = lax.scan(one, (state, jnp.bool_(True)), blocks)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
    return new_state, jnp.where(ok, targets, blocks), copied & ok, ok
