"""The KV cache manager: block tables of sequences over the pure-functional allocator.

One allocator state for the device cache and one for the host swap space. The allocator runs
on the host in numpy (allocator.py says why), so the free count and reference counts the
scheduler plans with are read straight from its state.

Sharing (§4.4 of the paper) is reference counting. A fork gives a second sequence the same
blocks; before a sequence writes into a block that another holds, the write is moved to a
private copy (copy-on-write), queued here as a (source, destination) block pair for the
executor's block copies. With the prefix cache on, full blocks are also shared across requests
(prefix_cache.py).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from paged_jax.kv import allocator
from paged_jax.kv.interface import MemoryUsage, final_length
from paged_jax.kv.prefix_cache import ROOT, PrefixCache, block_name
from paged_jax.sequence import Sequence, SequenceGroup


class BlockPool:
    """A pool of blocks (device cache or host swap space) and its allocator state."""

    def __init__(self, num_blocks: int):
        self.state = allocator.init_allocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.state.num_blocks

    @property
    def num_free(self) -> int:
        return self.state.num_free

    @property
    def refs(self) -> np.ndarray:
        """Reference count per block (int32[num_blocks], read-only)."""
        return self.state.ref_counts

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, or None (and nothing taken) when fewer are free."""
        self.state, blocks, ok = allocator.allocate(self.state, n)
        return blocks.tolist() if ok else None

    def free(self, blocks: list[int]) -> None:
        """Drop one reference per entry (a block may repeat)."""
        self.state = allocator.free(self.state, blocks)

    def fork(self, blocks: list[int]) -> None:
        """One more reference per entry."""
        self.state = allocator.fork(self.state, blocks)

    def copy_on_write(self, blocks: list[int]) -> list[int]:
        """For each block about to be written, the block to write instead (itself when
        private); the caller checked there is room."""
        self.state, targets, _, ok = allocator.copy_on_write(self.state, blocks)
        assert ok
        return targets.tolist()

    def copies_needed(self, blocks: list[int]) -> int:
        """New blocks copy_on_write(blocks) takes: a block with r references written by w
        writers is copied min(w, r - 1) times (the last holder keeps it)."""
        return sum(min(w, int(self.refs[b]) - 1) for b, w in Counter(blocks).items())


class BlockManager:
    """The paged KV cache manager (a KVCacheManager, interface.py): blocks handed out as
    sequences grow, shared by forks and the prefix cache, swapped to a host pool on preemption.
    Admission keeps a watermark of free blocks (a share of the cache) for running sequences."""

    def __init__(self, num_blocks: int, block_size: int, num_swap_blocks: int = 0, watermark: float = 0.01, *,
                 enable_prefix_caching: bool = False, enable_block_sharing: bool = True):
        if enable_prefix_caching and not enable_block_sharing:
            raise ValueError("enable_prefix_caching shares blocks across requests; it needs enable_block_sharing")
        self.block_size = block_size
        self.device_pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks else None
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self.sharing = enable_block_sharing
        self.pending_copies: list[tuple[int, int]] = []  # (source, destination) device blocks

    @property
    def num_blocks(self) -> int:
        return self.device_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting idle cached ones (they are evicted on demand)."""
        return self.device_pool.num_free + (len(self.prefix_cache.evictable) if self.prefix_cache is not None else 0)

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def footprint(self, prompt_len: int, max_tokens: int, n: int) -> tuple[int, int]:
        """(blocks a request of n sequences takes at its longest, the most one request can take)."""
        return n * -(-(prompt_len + max_tokens) // self.block_size), self.num_blocks - self.watermark_blocks

    def can_admit(self, num_blocks: int) -> bool:
        """Admission keeps a watermark free, so running sequences can grow a while."""
        return self.num_free_blocks - num_blocks >= self.watermark_blocks

    def admit(self, group: SequenceGroup, hits: list[list[int]], targets: list[int]) -> bool:
        """A waiting request's sequences start from their cached prefixes (hits) and get the
        blocks to hold targets[i] tokens, keeping the watermark free; or nothing changes and
        the answer is False."""
        need = sum(-(-tokens // self.block_size) - len(hit) for tokens, hit in zip(targets, hits))
        if not self.can_admit(need + self.cost_of_hits(hits)):
            return False
        for seq, hit in zip(group.active, hits):
            if hit:
                self.use_cached(seq, hit)
        assert self.grow(list(zip(group.active, targets)))
        return True

    def memory_usage(self, groups: list[SequenceGroup]) -> MemoryUsage:
        """The cache's slots by what they hold, for the running requests (Fig. 2). Blocks are
        counted as the tables name them: a shared block once per sequence."""
        stored = reserved = internal = 0
        for group in groups:
            for seq in group.active:
                slots = len(seq.block_table) * self.block_size
                used = min(final_length(group), slots)  # slots its tokens will ever fill
                stored += min(seq.num_computed_tokens, used)
                reserved += used - min(seq.num_computed_tokens, used)
                internal += slots - used
        return MemoryUsage(stored, reserved, internal, 0, self.num_blocks * self.block_size)

    def blocks_named_and_used(self, groups: list[SequenceGroup]) -> tuple[int, int]:
        """(blocks the running sequences' tables name, blocks in use): what sharing saves is
        the difference (Fig. 15)."""
        named = sum(len(s.block_table) for g in groups for s in g.active)
        return named, (self.num_blocks - self.num_free_blocks) if named else 0

    def unique_blocks(self, seqs: list[Sequence]) -> list[int]:
        return list(dict.fromkeys(b for seq in seqs for b in seq.block_table))

    # -- growing, with copy-on-write ---------------------------------------------------------

    def _shared_writes(self, seq: Sequence) -> list[int]:
        """Indices of seq's blocks to make private before its next write: the block the write
        starts in, when shared; without sharing every shared block (a fork is then a copy)."""
        refs, table = self.device_pool.refs, seq.block_table
        if not self.sharing:
            return [i for i, b in enumerate(table) if refs[b] > 1]
        start = seq.num_computed_tokens
        i = start // self.block_size
        return [i] if start % self.block_size and refs[table[i]] > 1 else []

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Give each sequence enough blocks for its token count and make the blocks it writes
        private, in one go, all or nothing. growth: (sequence, tokens it must hold)."""
        writes = [(seq, i) for seq, _ in growth for i in self._shared_writes(seq)]
        sources = [seq.block_table[i] for seq, i in writes]
        new = sum(self.blocks_to_grow(seq, tokens) for seq, tokens in growth)
        copies = self.device_pool.copies_needed(sources)
        if new + copies > self.num_free_blocks:
            return False
        if copies:
            self.make_room(copies)
            for (seq, i), source, target in zip(writes, sources, self.device_pool.copy_on_write(sources)):
                if target != source:
                    seq.block_table[i] = target
                    self.pending_copies.append((source, target))
        blocks = self._allocate(new)
        for seq, tokens in growth:
            n = self.blocks_to_grow(seq, tokens)
            seq.block_table.extend(blocks[:n])
            blocks = blocks[n:]
        return True

    def make_room(self, n: int) -> None:
        """Evict idle cached blocks until the allocator has n free."""
        short = n - self.device_pool.num_free
        if short > 0 and self.prefix_cache is not None:
            self.device_pool.free(self.prefix_cache.evict(short))

    def _allocate(self, n: int) -> list[int]:
        self.make_room(n)
        blocks = self.device_pool.allocate(n)
        assert blocks is not None, "caller checks room first"
        return blocks

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies queued since the last call, for the next step to run first."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # -- sharing -----------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child starts from parent's computed KV: it holds the same blocks (copied on its
        first write into a shared one) and has computed what parent has."""
        child.block_table = list(parent.block_table)
        child.block_names = list(parent.block_names)
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_computed_tokens = parent.num_computed_tokens
        self.device_pool.fork(child.block_table)

    def free(self, seqs: list[Sequence]) -> None:
        self._release([b for seq in seqs for b in seq.block_table])
        for seq in seqs:
            seq.block_table = []
            seq.num_cached_blocks = 0

    def _release(self, blocks: list[int]) -> None:
        """Drop the references; cached blocks no sequence uses become evictable, a sequence's
        tail before its head. Queued copies never involve a released block: the scheduler only
        preempts requests it has not grown yet this step."""
        self.device_pool.free(blocks)
        refs = self.device_pool.refs
        if self.prefix_cache is not None:
            for b in reversed(blocks):
                if refs[b] == 1 and b in self.prefix_cache.name_of:
                    self.prefix_cache.idle(b)
        assert all(refs[d] > 0 for _, d in self.pending_copies), "a queued copy targets a released block"

    # -- the prefix cache --------------------------------------------------------------------

    def _names(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Names of seq's first num_blocks full blocks, computed once per sequence."""
        names, bs = seq.block_names, self.block_size
        while len(names) < num_blocks:
            i = len(names)
            names.append(block_name(names[-1] if names else ROOT, seq.tokens(i * bs, (i + 1) * bs)))
        return names[:num_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding seq's longest cached prefix, leaving at least its last
        token to compute (its logits are needed). Changes nothing."""
        if self.prefix_cache is None:
            return []
        bs, hit, parent = self.block_size, [], ROOT
        for i, name in enumerate(self._names(seq, (seq.num_tokens - 1) // bs)):
            block = self.prefix_cache.lookup(name, parent, seq.tokens(i * bs, (i + 1) * bs))
            if block is None:
                break
            hit.append(block)
            parent = name
        return hit

    def cost_of_hits(self, hits: list[list[int]]) -> int:
        """Free blocks that taking these cached blocks uses up (the idle ones)."""
        return sum(1 for b in set(b for hit in hits for b in hit) if b in self.prefix_cache.evictable)

    def use_cached(self, seq: Sequence, hit: list[int]) -> None:
        """seq starts from its cached prefix: the blocks are its table, their tokens computed."""
        seq.block_table = list(hit)
        seq.num_cached_blocks = len(hit)
        seq.num_computed_tokens = len(hit) * self.block_size
        self.device_pool.fork(hit)
        for b in hit:
            self.prefix_cache.touch(b)

    def cache_full_blocks(self, seqs: list[Sequence]) -> None:
        """Name the blocks the sequences have filled since the last call, so later requests
        find them. A prefix computed twice at once is cached once."""
        if self.prefix_cache is None:
            return
        bs, newly_cached = self.block_size, []
        for seq in seqs:
            full = min(seq.num_computed_tokens, seq.num_tokens, len(seq.block_table) * bs) // bs
            names = self._names(seq, full)
            for i in range(seq.num_cached_blocks, full):
                parent = names[i - 1] if i else ROOT
                if self.prefix_cache.insert(names[i], parent, seq.tokens(i * bs, (i + 1) * bs), seq.block_table[i]):
                    newly_cached.append(seq.block_table[i])
            seq.num_cached_blocks = max(seq.num_cached_blocks, full)
        self.device_pool.fork(newly_cached)  # the cache's own reference

    # -- swapping ----------------------------------------------------------------------------

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self.swap_pool is not None and len(self.unique_blocks(seqs)) <= self.swap_pool.num_free

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to host memory, shared blocks once: (device block, host
        block) pairs to copy. Their tables now name host blocks."""
        return self._move(seqs, self.device_pool, self.swap_pool)

    def can_swap_in(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Their host blocks come back, plus what the next tokens need, keeping the watermark;
        each reference to a shared block counts, which is enough for any copy-on-write."""
        return self.can_admit(sum(len(seq.block_table) + self.blocks_to_grow(seq, tokens) for seq, tokens in growth))

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring swapped sequences back: (host block, device block) pairs to copy."""
        return self._move(seqs, self.swap_pool, self.device_pool)

    def free_swapped(self, seqs: list[Sequence]) -> None:
        self.swap_pool.free([b for seq in seqs for b in seq.block_table])
        for seq in seqs:
            seq.block_table = []

    def _move(self, seqs: list[Sequence], source: BlockPool, target: BlockPool) -> list[tuple[int, int]]:
        held = [b for seq in seqs for b in seq.block_table]
        unique = list(dict.fromkeys(held))
        new = self._allocate(len(unique)) if target is self.device_pool else target.allocate(len(unique))
        assert new is not None, "caller checks room first"
        mapping = dict(zip(unique, new))
        target.fork(_extra_references(held, mapping))
        if source is self.device_pool:
            self._release(held)
        else:
            source.free(held)
        for seq in seqs:
            seq.block_table = [mapping[b] for b in seq.block_table]
            seq.num_cached_blocks = 0
        return list(mapping.items())

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Every device block is free or held by exactly the live sequences' tables and the
        prefix cache."""
        held = np.zeros(self.num_blocks, np.int64)
        for seq in live:
            np.add.at(held, seq.block_table, 1)
        if self.prefix_cache is not None:
            np.add.at(held, list(self.prefix_cache.name_of), 1)
        refs = self.device_pool.refs
        assert np.array_equal(refs, held), "block reference counts disagree with the block tables"
        assert self.device_pool.num_free == int((refs == 0).sum())


def _extra_references(held: list[int], mapping: dict[int, int]) -> list[int]:
    """The moved blocks' references beyond the first: a block held k times is forked k - 1."""
    seen, extra = set(), []
    for b in held:
        if b in seen:
            extra.append(mapping[b])
        seen.add(b)
    return extra
