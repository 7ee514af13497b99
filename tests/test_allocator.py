"""The block allocator keeps exact books under any sequence of allocate / fork / free /
copy-on-write: no block is owned twice, none leaks, every reference count equals the number
of block tables holding the block, and a failed request changes nothing."""

from __future__ import annotations

import dataclasses
from collections import Counter

import hypothesis.strategies as st
import numpy as np
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from paged_jax.kv import allocator as alloc

NUM_BLOCKS = 24


def snapshot(state):
    return [np.array(field) for field in dataclasses.astuple(state)]


class AllocatorMachine(RuleBasedStateMachine):
    """A model of block tables (name -> list of blocks) driven against the allocator."""

    @initialize()
    def start(self):
        self.state = alloc.init_allocator(NUM_BLOCKS)
        self.tables: dict[int, list[int]] = {}
        self.next_name = 0

    def _new_table(self, blocks):
        self.tables[self.next_name] = list(blocks)
        self.next_name += 1

    @rule(n=st.integers(1, 12))
    def allocate(self, n):
        before = snapshot(self.state)
        free_before = int(self.state.num_free)
        self.state, blocks, ok = alloc.allocate(self.state, n)
        blocks = blocks.tolist()
        assert bool(ok) == (n <= free_before)
        if ok:
            assert len(blocks) == n
            self._new_table(blocks)
        else:
            assert blocks == []
            assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(self.state)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data):
        name = data.draw(st.sampled_from(sorted(self.tables)))
        self.state = alloc.free(self.state, self.tables.pop(name))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def fork(self, data):
        name = data.draw(st.sampled_from(sorted(self.tables)))
        self.state = alloc.fork(self.state, self.tables[name])
        self._new_table(self.tables[name])

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def copy_on_write(self, data):
        name = data.draw(st.sampled_from(sorted(self.tables)))
        table = self.tables[name]
        index = data.draw(st.integers(0, len(table) - 1))
        shared = int(self.state.ref_counts[table[index]]) > 1
        free_before = int(self.state.num_free)
        self.state, targets, copied, ok = alloc.copy_on_write(self.state, [table[index]])
        assert bool(ok) == (not shared or free_before > 0)
        assert bool(copied[0]) == (shared and bool(ok))
        if copied[0]:
            assert int(targets[0]) != table[index]
            table[index] = int(targets[0])
        else:
            assert int(targets[0]) == table[index]

    @invariant()
    def books_balance(self):
        refs = np.asarray(self.state.ref_counts)
        held = Counter(b for table in self.tables.values() for b in table)
        assert all(refs[b] == held.get(b, 0) for b in range(NUM_BLOCKS)), "refcount != tables holding"
        num_free = int(self.state.num_free)
        free_blocks = np.asarray(self.state.free_stack)[:num_free]
        assert len(set(free_blocks.tolist())) == num_free, "a block is on the free stack twice"
        assert set(free_blocks.tolist()) == {b for b in range(NUM_BLOCKS) if refs[b] == 0}, "leak or double owner"


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_a_block_shared_by_two_writers_is_copied_once():
    state = alloc.init_allocator(4)
    state, blocks, _ = alloc.allocate(state, 1)
    state = alloc.fork(state, blocks)  # two tables hold blocks[0]
    state, targets, copied, ok = alloc.copy_on_write(state, np.concatenate([blocks, blocks]))
    assert bool(ok) and copied.tolist() == [True, False]
    assert int(targets[1]) == int(blocks[0]) and int(targets[0]) != int(blocks[0])
    assert np.asarray(state.ref_counts)[[int(blocks[0]), int(targets[0])]].tolist() == [1, 1]


def test_freeing_the_same_block_twice_in_one_call_releases_it_once():
    state = alloc.init_allocator(4)
    state, blocks, _ = alloc.allocate(state, 2)
    state = alloc.fork(state, blocks)
    state = alloc.free(state, np.concatenate([blocks, blocks]))
    assert int(state.num_free) == 4
    assert sorted(np.asarray(state.free_stack).tolist()) == [0, 1, 2, 3]
