"""The KV cache manager: block tables of sequences over the pure-functional allocator.

One allocator state for the device cache and one for the host swap space. The allocator runs
on the host in numpy (allocator.py says why), so the free count and reference counts the
scheduler plans with are read straight from its state.

Sharing (§4.4 of the paper) is reference counting. A fork gives a second sequence the same
blocks; before a sequence writes into a block that another holds, the write is moved to a
private copy (copy-on-write), queued here as a (source, destination) block pair for the
executor's block copies. With the prefix cache on, full blocks are also shared across requests
(prefix_cache.py).

Sliding windows (vLLM v1's hybrid KV cache manager): a model's layers form KV groups
(model/cache.py), each with its own block table per sequence, all drawing on one pool. A
group whose layers attend over a window of W tokens frees each block once every token it holds
is out of reach of the tokens still to come; its table entry becomes NULL_BLOCK. A group of
global layers keeps every block. A chunk never computes more than the smallest window
(`max_tokens_per_step`), so what a sliding group holds stays under
ceil((2W - 1) / block_size) + 1 blocks, however long the sequence.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from paged_jax.kv import allocator
from paged_jax.kv.interface import NULL_BLOCK, MemoryUsage, Tables, final_length, first_held, held_blocks, num_held
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
    sequences grow, shared by forks and the prefix cache, swapped to a host pool on preemption,
    freed as they leave a sliding window. Admission keeps a watermark of free blocks (a share of
    the cache) for running sequences.

    windows: per KV group, the sliding window of its layers in tokens (None: global layers)."""

    def __init__(self, num_blocks: int, block_size: int, num_swap_blocks: int = 0, watermark: float = 0.01, *,
                 enable_prefix_caching: bool = False, enable_block_sharing: bool = True,
                 windows: tuple[int | None, ...] = (None,)):
        if enable_prefix_caching and not enable_block_sharing:
            raise ValueError("enable_prefix_caching shares blocks across requests; it needs enable_block_sharing")
        self.block_size = block_size
        self.windows = windows
        self.device_pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks else None
        self.watermark_blocks = int(watermark * num_blocks)
        # One prefix cache per group: a group's blocks hold its own layers' K/V of the same tokens.
        self.prefix_caches = [PrefixCache() for _ in windows] if enable_prefix_caching else None
        self.sharing = enable_block_sharing
        self.pending_copies: list[tuple[int, int]] = []  # (source, destination) device blocks

    @property
    def num_blocks(self) -> int:
        return self.device_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting idle cached ones (they are evicted on demand)."""
        idle = sum(len(c.evictable) for c in self.prefix_caches) if self.prefix_caches else 0
        return self.device_pool.num_free + idle

    @property
    def max_tokens_per_step(self) -> int | None:
        """The most tokens one sequence computes in a step: its smallest sliding window, so a
        sliding group's blocks stay bounded (None: no window, no bound)."""
        return min((w for w in self.windows if w), default=None)

    def tables(self, seq: Sequence) -> Tables:
        """seq's block table per group (empty ones for a sequence that holds nothing)."""
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.windows]
        return seq.block_tables

    def first_needed(self, window: int | None, next_position: int) -> int:
        """The first logical block the tokens from next_position on still read (0 without a
        window)."""
        return max(0, next_position - window + 1) // self.block_size if window else 0

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold num_tokens tokens, over its groups."""
        length = len(self.tables(seq)[0])
        return self.new_blocks(length, seq.num_computed_tokens, num_tokens)

    def new_blocks(self, table_len: int, computed: int, num_tokens: int) -> int:
        """Blocks that tables of table_len entries, computed up to `computed`, add to hold
        num_tokens: past the end, and not before the window."""
        end = -(-num_tokens // self.block_size)
        return sum(max(0, end - max(table_len, self.first_needed(w, computed))) for w in self.windows)

    def footprint(self, prompt_len: int, max_tokens: int, n: int) -> tuple[int, int]:
        """(blocks a request of n sequences takes at its longest, the most one request can take)."""
        full = -(-(prompt_len + max_tokens) // self.block_size)
        per_seq = sum(min(full, -(-(2 * w - 1) // self.block_size) + 1) if w else full for w in self.windows)
        return n * per_seq, self.num_blocks - self.watermark_blocks

    def can_admit(self, num_blocks: int) -> bool:
        """Admission keeps a watermark free, so running sequences can grow a while."""
        return self.num_free_blocks - num_blocks >= self.watermark_blocks

    def admit(self, group: SequenceGroup, hits: list[Tables], targets: list[int]) -> bool:
        """A waiting request's sequences start from their cached prefixes (hits) and get the
        blocks to hold targets[i] tokens, keeping the watermark free; or nothing changes and
        the answer is False."""
        lengths = [len(hit[0]) if hit else 0 for hit in hits]
        need = sum(self.new_blocks(n, n * self.block_size, tokens) for n, tokens in zip(lengths, targets))
        if not self.can_admit(need + self.cost_of_hits(hits)):
            return False
        for seq, hit in zip(group.active, hits):
            if hit and hit[0]:
                self.use_cached(seq, hit)
        assert self.grow(list(zip(group.active, targets)))
        return True

    def memory_usage(self, groups: list[SequenceGroup]) -> MemoryUsage:
        """The cache's slots by what they hold, for the running requests (Fig. 2). Blocks are
        counted as the tables name them: a shared block once per sequence; a sliding group
        from the first block it still holds."""
        stored = reserved = internal = 0
        bs = self.block_size
        for group in groups:
            for seq in group.active:
                for table in self.tables(seq):
                    first = first_held(table) * bs
                    end = len(table) * bs
                    used = max(0, min(final_length(group), end) - first)  # slots its tokens will ever fill
                    computed = min(max(0, seq.num_computed_tokens - first), used)
                    stored += computed
                    reserved += used - computed
                    internal += end - first - used
        return MemoryUsage(stored, reserved, internal, 0, self.num_blocks * bs)

    def blocks_named_and_used(self, groups: list[SequenceGroup]) -> tuple[int, int]:
        """(blocks the running sequences' tables name, blocks in use): what sharing saves is
        the difference (Fig. 15)."""
        named = sum(num_held(self.tables(s)) for g in groups for s in g.active)
        return named, (self.num_blocks - self.num_free_blocks) if named else 0

    def unique_blocks(self, seqs: list[Sequence]) -> list[int]:
        return list(dict.fromkeys(b for seq in seqs for b in held_blocks(self.tables(seq))))

    # -- growing, with copy-on-write ---------------------------------------------------------

    def _shared_writes(self, seq: Sequence) -> list[tuple[int, int]]:
        """(group, index) of seq's blocks to make private before its next write: the block the
        write starts in, when shared; without sharing every shared block (a fork is then a copy)."""
        refs = self.device_pool.refs
        start = seq.num_computed_tokens
        writes = []
        for g, table in enumerate(self.tables(seq)):
            if not self.sharing:
                writes += [(g, i) for i, b in enumerate(table) if b != NULL_BLOCK and refs[b] > 1]
                continue
            i = start // self.block_size
            if start % self.block_size and refs[table[i]] > 1:
                writes.append((g, i))
        return writes

    def leave_windows(self, seq: Sequence) -> None:
        """Free the blocks of seq's sliding groups that no token still to come reads."""
        for window, table in zip(self.windows, self.tables(seq)):
            gone = range(first_held(table), min(self.first_needed(window, seq.num_computed_tokens), len(table)))
            if gone:  # (most steps free nothing, and the allocator's state is copied on each call)
                self._release([table[i] for i in gone])
                table[gone.start : gone.stop] = [NULL_BLOCK] * len(gone)

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Give each sequence enough blocks for its token count and make the blocks it writes
        private, in one go, all or nothing (what has left a window is freed first, whatever
        the answer). growth: (sequence, tokens it must hold)."""
        for seq, _ in growth:
            self.leave_windows(seq)
        writes = [(seq, g, i) for seq, _ in growth for g, i in self._shared_writes(seq)]
        sources = [seq.block_tables[g][i] for seq, g, i in writes]
        new = sum(self.blocks_to_grow(seq, tokens) for seq, tokens in growth)
        copies = self.device_pool.copies_needed(sources)
        if new + copies > self.num_free_blocks:
            return False
        if copies:
            self.make_room(copies)
            for (seq, g, i), source, target in zip(writes, sources, self.device_pool.copy_on_write(sources)):
                if target != source:
                    seq.block_tables[g][i] = target
                    self.pending_copies.append((source, target))
        blocks = self._allocate(new)
        for seq, tokens in growth:
            end = -(-tokens // self.block_size)
            for window, table in zip(self.windows, self.tables(seq)):
                start = max(len(table), self.first_needed(window, seq.num_computed_tokens))
                table.extend([NULL_BLOCK] * (start - len(table)))
                n = max(0, end - start)
                table.extend(blocks[:n])
                blocks = blocks[n:]
        return True

    def trim(self, seqs: list[Sequence]) -> None:
        """Give back each sequence's blocks past its computed tokens (speculated tokens the
        model rejected): they were grown for this step's lookahead, so they are its own, and
        never named by the prefix cache, which names only blocks of computed tokens."""
        for seq in seqs:
            keep = -(-seq.num_computed_tokens // self.block_size)
            for table in seq.block_tables:
                if len(table) > keep:
                    self._release([b for b in table[keep:] if b != NULL_BLOCK])
                    del table[keep:]

    def make_room(self, n: int) -> None:
        """Evict idle cached blocks until the allocator has n free, oldest first in each group."""
        for cache in self.prefix_caches or []:
            short = n - self.device_pool.num_free
            if short > 0:
                self.device_pool.free(cache.evict(short))

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
        child.block_tables = [list(table) for table in self.tables(parent)]
        child.block_names = list(parent.block_names)
        child.num_cached_blocks = parent.num_cached_blocks
        child.num_computed_tokens = parent.num_computed_tokens
        self.device_pool.fork(held_blocks(child.block_tables))

    def free(self, seqs: list[Sequence]) -> None:
        self._release([b for seq in seqs for b in held_blocks(seq.block_tables)])
        for seq in seqs:
            seq.block_tables = []
            seq.num_cached_blocks = 0

    def _release(self, blocks: list[int]) -> None:
        """Drop the references; cached blocks no sequence uses become evictable, a sequence's
        tail before its head. Queued copies never involve a released block: the scheduler only
        preempts requests it has not grown yet this step."""
        self.device_pool.free(blocks)
        refs = self.device_pool.refs
        for cache in self.prefix_caches or []:
            for b in reversed(blocks):
                if refs[b] == 1 and b in cache.name_of:
                    cache.idle(b)
        assert all(refs[d] > 0 for _, d in self.pending_copies), "a queued copy targets a released block"

    # -- the prefix cache --------------------------------------------------------------------

    def _names(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Names of seq's first num_blocks full blocks, computed once per sequence."""
        names, bs = seq.block_names, self.block_size
        while len(names) < num_blocks:
            i = len(names)
            names.append(block_name(names[-1] if names else ROOT, seq.tokens(i * bs, (i + 1) * bs)))
        return names[:num_blocks]

    def cached_prefix(self, seq: Sequence, max_blocks: int | None = None) -> Tables:
        """Per group, the cached blocks holding seq's longest cached prefix of at most
        max_blocks blocks, leaving at least its last token to compute (its logits are needed);
        a sliding group needs only the blocks its window still reads after the prefix (NULL_BLOCK
        before them). Changes nothing."""
        if self.prefix_caches is None:
            return [[] for _ in self.windows]
        bs = self.block_size
        limit = (seq.num_tokens - 1) // bs if max_blocks is None else min(max_blocks, (seq.num_tokens - 1) // bs)
        names = self._names(seq, limit)
        found = [[cache.lookup(name, names[i - 1] if i else ROOT, seq.tokens(i * bs, (i + 1) * bs))
                  for i, name in enumerate(names)] for cache in self.prefix_caches]
        for w, f in zip(self.windows, found):  # a global group's prefix ends at its first miss
            if w is None and None in f:
                limit = f.index(None)
        for length in range(limit, 0, -1):  # a sliding group's window may miss at one length, not another
            tables = [[b if i >= self.first_needed(w, length * bs) else NULL_BLOCK for i, b in enumerate(f[:length])]
                      for w, f in zip(self.windows, found)]
            if all(b is not None for table in tables for b in table):
                return tables
        return [[] for _ in self.windows]

    def cost_of_hits(self, hits: list[Tables]) -> int:
        """Free blocks that taking these cached blocks uses up (the idle ones)."""
        if self.prefix_caches is None:
            return 0
        taken = set(b for hit in hits for table in hit for b in table if b != NULL_BLOCK)
        return sum(1 for b in taken if any(b in cache.evictable for cache in self.prefix_caches))

    def use_cached(self, seq: Sequence, hit: Tables) -> None:
        """seq starts from its cached prefix: the blocks are its tables, their tokens computed."""
        seq.block_tables = [list(table) for table in hit]
        seq.num_cached_blocks = len(hit[0])
        seq.num_computed_tokens = len(hit[0]) * self.block_size
        self.device_pool.fork(held_blocks(hit))
        for cache, table in zip(self.prefix_caches, hit):
            for b in table:
                if b != NULL_BLOCK:
                    cache.touch(b)

    def cache_full_blocks(self, seqs: list[Sequence]) -> None:
        """Name the blocks the sequences have filled since the last call, so later requests
        find them. A prefix computed twice at once is cached once."""
        if self.prefix_caches is None:
            return
        bs, newly_cached = self.block_size, []
        for seq in seqs:
            tables = self.tables(seq)
            full = min(seq.num_computed_tokens, seq.num_tokens, len(tables[0]) * bs) // bs
            names = self._names(seq, full)
            for cache, table in zip(self.prefix_caches, tables):
                for i in range(seq.num_cached_blocks, full):
                    parent = names[i - 1] if i else ROOT
                    if table[i] != NULL_BLOCK and cache.insert(names[i], parent, seq.tokens(i * bs, (i + 1) * bs),
                                                               table[i]):
                        newly_cached.append(table[i])
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
        return self.can_admit(sum(num_held(seq.block_tables) + self.blocks_to_grow(seq, tokens)
                                  for seq, tokens in growth))

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring swapped sequences back: (host block, device block) pairs to copy."""
        return self._move(seqs, self.swap_pool, self.device_pool)

    def free_swapped(self, seqs: list[Sequence]) -> None:
        self.swap_pool.free([b for seq in seqs for b in held_blocks(seq.block_tables)])
        for seq in seqs:
            seq.block_tables = []

    def _move(self, seqs: list[Sequence], source: BlockPool, target: BlockPool) -> list[tuple[int, int]]:
        held = [b for seq in seqs for b in held_blocks(seq.block_tables)]
        unique = list(dict.fromkeys(held))
        new = self._allocate(len(unique)) if target is self.device_pool else target.allocate(len(unique))
        assert new is not None, "caller checks room first"
        mapping = dict(zip(unique, new))
        target.fork(_extra_references(held, mapping))
        if source is self.device_pool:
            self._release(held)
        else:
            source.free(held)
        mapping[NULL_BLOCK] = NULL_BLOCK
        for seq in seqs:
            seq.block_tables = [[mapping[b] for b in table] for table in seq.block_tables]
            seq.num_cached_blocks = 0
        del mapping[NULL_BLOCK]
        return list(mapping.items())

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Every device block is free or held by exactly the live sequences' tables and the
        prefix caches."""
        held = np.zeros(self.num_blocks, np.int64)
        for seq in live:
            np.add.at(held, held_blocks(seq.block_tables), 1)
        for cache in self.prefix_caches or []:
            np.add.at(held, list(cache.name_of), 1)
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
