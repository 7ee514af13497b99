"""The KV cache manager: block tables of sequences over the pure-functional allocator.

One allocator state for the device cache and one for the host swap space, both kept on the
CPU device so the scheduler never waits on an accelerator. Requests are batched and padded to
power-of-two widths, so a handful of allocator shapes compile once. The host mirrors the free
counts after every operation; the scheduler plans with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax import allocator
from paged_jax.sequence import Sequence


def _padded(blocks: list[int]) -> jax.Array:
    width = 8
    while width < len(blocks):
        width *= 2
    return np.asarray(blocks + [-1] * (width - len(blocks)), np.int32)


class BlockPool:
    """A pool of blocks (device cache or host swap space) and its free count."""

    def __init__(self, num_blocks: int, device: jax.Device):
        self.num_blocks = num_blocks
        self.device = device
        self.state = allocator.init_allocator(num_blocks, device)
        self.num_free = num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, or None (and nothing taken) when fewer are free."""
        if n == 0:
            return []
        if n > self.num_free:
            return None
        want = _padded([0] * n) >= 0
        self.state, blocks, ok = allocator.allocate_where(self.state, jax.device_put(want, self.device))
        assert bool(ok)
        self.num_free -= n
        return [int(b) for b in np.asarray(blocks)[:n]]

    def free(self, blocks: list[int]) -> None:
        if blocks:
            self.state = allocator.free(self.state, jax.device_put(_padded(blocks), self.device))
            self.num_free = int(self.state.num_free)

    def fork(self, blocks: list[int]) -> None:
        if blocks:
            self.state = allocator.fork(self.state, jax.device_put(_padded(blocks), self.device))

    def warm_up(self, max_blocks: int) -> None:
        """Compile the allocator for every padded width up to max_blocks (no-op requests)."""
        width = 8
        while True:
            nothing = jax.device_put(np.full(width, -1, np.int32), self.device)
            self.state, _, _ = allocator.allocate_where(self.state, nothing >= 0)
            self.state = allocator.free(self.state, nothing)
            if width >= max_blocks:
                return
            width *= 2

    def ref_counts(self) -> np.ndarray:
        return np.asarray(self.state.ref_counts)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_swap_blocks: int = 0, watermark: float = 0.01):
        cpu = jax.devices("cpu")[0]
        self.block_size = block_size
        self.device_pool = BlockPool(num_blocks, cpu)
        self.swap_pool = BlockPool(num_swap_blocks, cpu) if num_swap_blocks else None
        self.watermark_blocks = int(watermark * num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.device_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.device_pool.num_free

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_admit(self, num_blocks: int) -> bool:
        """Admission keeps a watermark free, so running sequences can grow a while."""
        return self.num_free_blocks - num_blocks >= self.watermark_blocks

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Give each sequence enough blocks for its token count, in one allocation, all or
        nothing. growth: (sequence, tokens it must hold)."""
        needs = [(seq, self.blocks_to_grow(seq, tokens)) for seq, tokens in growth]
        blocks = self.device_pool.allocate(sum(n for _, n in needs))
        if blocks is None:
            return False
        for seq, n in needs:
            seq.block_table.extend(blocks[:n])
            blocks = blocks[n:]
        return True

    def free(self, seqs: list[Sequence]) -> None:
        self.device_pool.free([b for seq in seqs for b in seq.block_table])
        for seq in seqs:
            seq.block_table = []

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self.swap_pool is not None and sum(len(s.block_table) for s in seqs) <= self.swap_pool.num_free

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to host memory: (device block, host block) pairs to copy.
        Their tables now name host blocks."""
        return self._move(seqs, self.device_pool, self.swap_pool)

    def can_swap_in(self, seqs: list[Sequence]) -> bool:
        return self.can_admit(sum(len(s.block_table) for s in seqs))

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring swapped sequences back: (host block, device block) pairs to copy."""
        return self._move(seqs, self.swap_pool, self.device_pool)

    @staticmethod
    def _move(seqs, source: BlockPool, target: BlockPool) -> list[tuple[int, int]]:
        old = [b for seq in seqs for b in seq.block_table]
        new = target.allocate(len(old))
        assert new is not None, "caller checks room first"
        source.free(old)
        mapping, offset = list(zip(old, new)), 0
        for seq in seqs:
            n = len(seq.block_table)
            seq.block_table = new[offset : offset + n]
            offset += n
        return mapping

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Every device block is free or held by exactly the live sequences' tables."""
        held = np.zeros(self.num_blocks, np.int64)
        for seq in live:
            np.add.at(held, seq.block_table, 1)
        refs = self.device_pool.ref_counts()
        assert np.array_equal(refs, held), "block reference counts disagree with the block tables"
        assert self.num_free_blocks == int((refs == 0).sum())
