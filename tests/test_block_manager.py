"""The block manager keeps every sequence's KV exact under any storm of admissions (with
prefix-cache hits), appends (with copy-on-write), forks, frees, evictions and swaps.

A model of the cache's contents runs beside it: each device and host block holds the tokens
written into its slots, block copies and swaps move them, and after every operation each live
sequence must read back its own tokens through each of its block tables: all of them in a
global group, those its next token still sees in a sliding-window group (which frees the
rest). The books must balance too: reference counts equal the tables' and the prefix caches'
holdings, nothing leaks.
"""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from paged_jax.kv.block_manager import BlockManager
from paged_jax.kv.interface import NULL_BLOCK, held_blocks
from paged_jax.sequence import Sequence

BLOCK_SIZE = 4
NUM_BLOCKS = 40
NUM_SWAP_BLOCKS = 24
# Prompts drawn from a few shared prefixes, so that the prefix cache gets hits.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9, 5, 5], [7] * 14]


def sequence(tokens: list[int]) -> Sequence:
    return Sequence(seq_id=0, index=0, prompt_token_ids=tokens, key=np.zeros(2, np.uint32), detokenizer=None)


class BlockManagerMachine(RuleBasedStateMachine):
    WINDOWS = (None,)  # one global group

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, NUM_SWAP_BLOCKS, watermark=0, enable_prefix_caching=True,
                               windows=self.WINDOWS)
        self.device = {b: [None] * BLOCK_SIZE for b in range(NUM_BLOCKS)}  # what each slot holds
        self.host = {b: [None] * BLOCK_SIZE for b in range(NUM_SWAP_BLOCKS)}
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []

    # -- what the runner would do --------------------------------------------------------

    def _copy(self):
        for src, dst in self.bm.take_copies():
            self.device[dst] = list(self.device[src])

    def _compute(self, seq: Sequence):
        """Write seq's uncomputed tokens into its blocks, as a model step does."""
        self._copy()
        for table in seq.block_tables:
            for p in range(seq.num_computed_tokens, seq.num_tokens):
                self.device[table[p // BLOCK_SIZE]][p % BLOCK_SIZE] = seq.tokens(p, p + 1)[0]
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks([seq])

    # -- rules ---------------------------------------------------------------------------

    @rule(prefix=st.sampled_from(PREFIXES), cut=st.integers(1, 14), tail=st.lists(st.integers(20, 23), max_size=6))
    def admit(self, prefix, cut, tail):
        seq = sequence(prefix[:cut] + tail)
        hit = self.bm.cached_prefix(seq)
        cached = len(hit[0])
        new = self.bm.new_blocks(cached, cached * BLOCK_SIZE, seq.num_tokens)
        if not self.bm.can_admit(new + self.bm.cost_of_hits([hit])):
            return
        if cached:
            self.bm.use_cached(seq, hit)
        assert self.bm.grow([(seq, seq.num_tokens)])
        self._compute(seq)
        self.running.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(20, 23))
    def append(self, data, token):
        seq = data.draw(st.sampled_from(self.running))
        seq.output_token_ids.append(token)
        if self.bm.grow([(seq, seq.num_tokens)]):
            self._compute(seq)
        else:
            seq.output_token_ids.pop()

    @precondition(lambda self: self.running)
    @rule(data=st.data(), drafts=st.lists(st.integers(20, 23), min_size=1, max_size=6), accepted=st.integers(0, 6))
    def speculate(self, data, drafts, accepted):
        """Draft tokens get lookahead slots and are written there (as a verifying step writes
        them); those rejected are rolled back: the sequence computed only the kept ones, and
        the blocks only rejected drafts used go back."""
        seq = data.draw(st.sampled_from(self.running))
        start = seq.num_tokens
        if not self.bm.grow([(seq, start + len(drafts))]):
            return
        self._copy()
        for table in seq.block_tables:
            for p, token in enumerate(drafts, start):
                self.device[table[p // BLOCK_SIZE]][p % BLOCK_SIZE] = token
        seq.output_token_ids += drafts[:accepted]
        seq.num_computed_tokens = seq.num_tokens
        self.bm.trim([seq])
        assert all(len(table) == -(-seq.num_tokens // BLOCK_SIZE) for table in seq.block_tables)
        self.bm.cache_full_blocks([seq])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.running))
        child = sequence(parent.prompt_token_ids)
        child.output_token_ids = list(parent.output_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        self.bm.fork(parent, child)
        self.running.append(child)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self.running))
        self.running.remove(seq)
        self.bm.free([seq])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def swap_out(self, data):
        seq = data.draw(st.sampled_from(self.running))
        family = [s for s in self.running  # shares blocks: goes too
                  if set(held_blocks(s.block_tables)) & set(held_blocks(seq.block_tables))]
        if not self.bm.can_swap_out(family):
            return
        snapshot = {b: list(v) for b, v in self.device.items()}  # the swap reads before anything is written
        for device_block, host_block in self.bm.swap_out(family):
            self.host[host_block] = snapshot[device_block]
        self.running = [s for s in self.running if s not in family]
        self.swapped.append(family)

    @precondition(lambda self: self.swapped)
    @rule()
    def swap_in(self):
        family = self.swapped[0]
        if not self.bm.can_admit(sum(len(held_blocks(s.block_tables)) for s in family)):
            return
        self.swapped.pop(0)
        for host_block, device_block in self.bm.swap_in(family):
            self.device[device_block] = list(self.host[host_block])
        self.running += family

    @rule(n=st.integers(1, 8))
    def evict(self, n):
        self.bm.make_room(min(self.bm.device_pool.num_free + n, self.bm.num_free_blocks))

    # -- invariants ----------------------------------------------------------------------

    def _reads_back(self, seq: Sequence, slots: dict[int, list]):
        for window, table in zip(self.WINDOWS, seq.block_tables):
            seen = range(max(0, seq.num_computed_tokens - window + 1) if window else 0, seq.num_computed_tokens)
            read = [slots[table[p // BLOCK_SIZE]][p % BLOCK_SIZE] for p in seen]
            assert read == [seq.tokens(p, p + 1)[0] for p in seen]
            if window is None:
                assert NULL_BLOCK not in table

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        self._copy()
        for seq in self.running:
            self._reads_back(seq, self.device)
        for family in self.swapped:
            for seq in family:
                self._reads_back(seq, self.host)

    @invariant()
    def the_books_balance(self):
        self.bm.check_no_leaks(self.running)
        swap = self.bm.swap_pool
        held = np.zeros(NUM_SWAP_BLOCKS, np.int64)
        for family in self.swapped:
            for seq in family:
                np.add.at(held, held_blocks(seq.block_tables), 1)
        assert np.array_equal(swap.refs, held) and swap.num_free == int((held == 0).sum())


BlockManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


class SlidingAndGlobalMachine(BlockManagerMachine):
    """A hybrid model: a group whose layers see 6 tokens (1.5 blocks) beside a global group."""

    WINDOWS = (6, None)


SlidingAndGlobalMachine.TestCase.settings = BlockManagerMachine.TestCase.settings
TestSlidingAndGlobalGroups = SlidingAndGlobalMachine.TestCase


def test_a_prefix_is_found_up_to_its_first_evicted_block():
    bm = BlockManager(16, BLOCK_SIZE, enable_prefix_caching=True, watermark=0)
    first = sequence(list(range(1, 15)))  # 3 full blocks + 2 tokens
    assert bm.grow([(first, first.num_tokens)])
    first.num_computed_tokens = first.num_tokens
    bm.cache_full_blocks([first])
    blocks = first.block_tables[0][:3]
    bm.free([first])
    assert bm.num_free_blocks == 16  # idle cached blocks count as free
    assert bm.cached_prefix(sequence(list(range(1, 15)) + [99])) == [blocks]
    bm.prefix_caches[0].evictable.move_to_end(blocks[1], last=False)  # the middle block is now the oldest
    bm.make_room(bm.device_pool.num_free + 1)
    assert bm.cached_prefix(sequence(list(range(1, 15)))) == [blocks[:1]]
    assert bm.cached_prefix(sequence([1, 2, 3, 4, 5, 6, 7, 0, 9])) == [blocks[:1]]  # tokens differ in block 1
    bm.check_no_leaks([])


def test_a_hash_collision_never_hands_out_the_wrong_block(monkeypatch):
    import paged_jax.kv.block_manager as block_manager

    monkeypatch.setattr(block_manager, "block_name", lambda parent, tokens: b"same")  # every block collides
    bm = BlockManager(8, BLOCK_SIZE, enable_prefix_caching=True, watermark=0)
    seq = sequence([1, 2, 3, 4, 5])
    assert bm.grow([(seq, 5)])
    seq.num_computed_tokens = 5
    bm.cache_full_blocks([seq])
    assert bm.cached_prefix(sequence([1, 2, 3, 4, 0])) == [seq.block_tables[0][:1]]
    assert bm.cached_prefix(sequence([4, 3, 2, 1, 0])) == [[]]


def test_a_sliding_window_group_holds_only_the_blocks_its_window_reads():
    bm = BlockManager(64, 8, watermark=0, windows=(16,))
    seq = sequence(list(range(30)))
    most = 0
    while seq.num_tokens < 230:
        step = min(bm.max_tokens_per_step, seq.num_tokens - seq.num_computed_tokens) or 1
        if step == 1 and seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(7)
        assert bm.grow([(seq, seq.num_computed_tokens + step)])
        seq.num_computed_tokens += step
        most = max(most, len(held_blocks(seq.block_tables)))
        table = seq.block_tables[0]
        first = next(i for i, b in enumerate(table) if b != NULL_BLOCK)
        assert first * 8 <= max(0, seq.num_computed_tokens - 16), "a block the next token reads was freed"
    assert bm.max_tokens_per_step == 16
    assert most <= bm.footprint(30, 200, 1)[0] == 5  # ceil((2 * 16 - 1) / 8) + 1, not 29
    bm.free([seq])
    bm.check_no_leaks([])
    assert bm.num_free_blocks == 64


def test_a_sliding_group_finds_a_cached_prefix_by_the_blocks_its_window_reads():
    bm = BlockManager(32, 4, watermark=0, enable_prefix_caching=True, windows=(6, None))
    first = sequence(list(range(1, 21)))  # 5 full blocks
    assert bm.grow([(first, 20)])
    first.num_computed_tokens = 20
    bm.cache_full_blocks([first])
    first.output_token_ids.append(99)
    assert bm.grow([(first, 21)])  # the sliding group frees the blocks before position 15
    assert first.block_tables[0][:3] == [NULL_BLOCK] * 3 and NULL_BLOCK not in first.block_tables[1]
    sliding, global_ = (list(t) for t in first.block_tables)
    bm.free([first])
    bm.prefix_caches[0].evictable.move_to_end(sliding[3])  # its oldest idle sliding blocks go first
    bm.prefix_caches[0].evictable.move_to_end(sliding[4])
    bm.make_room(bm.device_pool.num_free + 3)
    hit = bm.cached_prefix(sequence(list(range(1, 21)) + [5]))
    # 5 blocks hit: the global group reads them all, the window after position 20 only blocks 3-4.
    assert hit == [[NULL_BLOCK] * 3 + sliding[3:5], global_[:5]]
    bm.check_no_leaks([])
