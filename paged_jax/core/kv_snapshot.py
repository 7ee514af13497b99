"""A read-only picture of the paged KV cache between steps, for researchers to draw.

The paper's Fig. 6-8 as data: every physical block with its reference count and the block-table
entries that name it, and every live sequence's block table (logical block -> physical block,
with the slots it has filled). Running sequences' tables name device blocks, swapped ones'
name host blocks of the swap space, sequences waiting (new, or preempted by recompute) hold
none. Blocks the prefix cache names carry one reference of the cache's own, so a cached block
shared by two sequences has reference count 3 and two owners.

Taking one reads the scheduler's queues and the block manager's host mirrors and copies them
into immutable tuples: it changes nothing and touches no device array.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_jax.core.scheduler import Scheduler
from paged_jax.kv.block_manager import BlockManager
from paged_jax.kv.interface import NULL_BLOCK, KVCacheManager
from paged_jax.sequence import Sequence, SequenceGroup


@dataclass(frozen=True)
class BlockOwner:
    """One block-table entry: logical block `logical` of the request's sequence `seq_id`
    (`index`: which of the request's completions or beams it is), in KV group `group`."""

    request_id: str
    seq_id: int
    index: int
    logical: int
    group: int = 0


@dataclass(frozen=True)
class SequenceBlocks:
    """One live sequence's block table, as the paper draws it."""

    request_id: str
    seq_id: int
    index: int
    status: str  # "running" (device blocks), "swapped" (host blocks) or "waiting" (no blocks)
    # logical block -> physical block (host block when swapped) of the first KV group: the
    # model's only one unless its layers mix sliding-window and global attention
    block_table: tuple[int, ...]
    filled: tuple[int, ...]  # per entry, slots holding computed K/V (0 where NULL_BLOCK)
    num_tokens: int  # prompt + output so far; the last one's K/V is computed next step
    # Every KV group's table, the first included; a sliding group's entries before its window
    # are NULL_BLOCK (freed)
    group_tables: tuple[tuple[int, ...], ...] = ()

    @property
    def last_block_filled(self) -> int:
        return self.filled[-1] if self.filled else 0


@dataclass(frozen=True)
class KVSnapshot:
    step: int  # model steps run so far (a multi-step decode loop counts each of its steps)
    block_size: int
    refs: tuple[int, ...]  # per device block: references (table entries, plus the prefix cache's)
    owners: tuple[tuple[BlockOwner, ...], ...]  # per device block: the table entries naming it
    # The swap space's blocks in use (it is often far larger than the cache): host block ->
    # its references, and the swapped sequences' table entries naming it.
    host_refs: dict[int, int]
    host_owners: dict[int, tuple[BlockOwner, ...]]
    cached: frozenset[int]  # device blocks the prefix cache names
    idle_cached: tuple[int, ...]  # cached blocks no sequence holds, next to be evicted first
    sequences: tuple[SequenceBlocks, ...]  # running, then swapped, then waiting, each in queue order

    @property
    def num_blocks(self) -> int:
        return len(self.refs)

    @property
    def free(self) -> tuple[int, ...]:
        """Device blocks the allocator can hand out now (idle cached blocks are not among
        them: they are evicted on demand)."""
        return tuple(b for b, r in enumerate(self.refs) if r == 0)

    @property
    def shared(self) -> tuple[int, ...]:
        """Device blocks more than one table entry names."""
        return tuple(b for b, owners in enumerate(self.owners) if len(owners) > 1)

    def sequence(self, request_id: str, index: int = 0) -> SequenceBlocks:
        """The request's sequence with this completion (or beam) index."""
        for seq in self.sequences:
            if seq.request_id == request_id and seq.index == index:
                return seq
        raise KeyError(f"no live sequence {index} of request {request_id!r}")


def take_snapshot(step: int, scheduler: Scheduler, blocks: KVCacheManager) -> KVSnapshot:
    """The cache as the scheduler's queues and the block manager hold it now."""
    if not isinstance(blocks, BlockManager):
        raise ValueError("kv_snapshot draws the paged memory manager: the Orca baselines (memory_manager='orca-*') "
                         "reserve one contiguous chunk per request, with no shared blocks or reference counts and "
                         "a reserved tail no table names yet; their memory is described by memory_usage()")
    queues = (("running", scheduler.running), ("swapped", scheduler.swapped), ("waiting", scheduler.waiting))
    sequences = tuple(_sequence(group, seq, status, blocks.block_size)
                      for status, queue in queues for group in queue for seq in group.active)
    device_owners = _owners([s for s in sequences if s.status == "running"])
    host_owners = _owners([s for s in sequences if s.status == "swapped"])
    caches = blocks.prefix_caches or []
    return KVSnapshot(
        step=step,
        block_size=blocks.block_size,
        refs=tuple(blocks.device_pool.refs.tolist()),
        owners=tuple(device_owners.get(b, ()) for b in range(blocks.num_blocks)),
        host_refs={b: int(blocks.swap_pool.refs[b]) for b in host_owners},
        host_owners=host_owners,
        cached=frozenset(b for cache in caches for b in cache.name_of),
        idle_cached=tuple(b for cache in caches for b in cache.evictable),
        sequences=sequences,
    )


def _sequence(group: SequenceGroup, seq: Sequence, status: str, block_size: int) -> SequenceBlocks:
    computed = seq.num_computed_tokens
    tables = tuple(tuple(table) for table in seq.block_tables) or ((),)
    return SequenceBlocks(
        request_id=group.request_id, seq_id=seq.seq_id, index=seq.index, status=status,
        block_table=tables[0],
        filled=tuple(0 if b == NULL_BLOCK else min(block_size, max(0, computed - i * block_size))
                     for i, b in enumerate(tables[0])),
        num_tokens=seq.num_tokens, group_tables=tables)


def _owners(sequences: list[SequenceBlocks]) -> dict[int, tuple[BlockOwner, ...]]:
    """Block -> the table entries naming it, for the blocks the sequences hold."""
    owners: dict[int, tuple[BlockOwner, ...]] = {}
    for seq in sequences:
        for group, table in enumerate(seq.group_tables):
            for logical, block in enumerate(table):
                if block != NULL_BLOCK:
                    owner = BlockOwner(seq.request_id, seq.seq_id, seq.index, logical, group)
                    owners[block] = owners.get(block, ()) + (owner,)
    return owners
