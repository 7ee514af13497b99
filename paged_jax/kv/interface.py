"""What the scheduler and the engine ask of a KV cache manager, whichever runs: the paged
BlockManager (block_manager.py) or the paper's Orca baseline, ReservingBlockManager
(reservation.py). Both implement `KVCacheManager` structurally; the scheduler depends on this
module only, so a comparison of memory managers changes nothing else. Also here: what both
report, the cache's slots by use (Fig. 2's `MemoryUsage`), and the helpers over it.

Blocks are named by integer ids. A sequence's `block_tables` list, per KV group (a set of
layers whose K/V live equally long: model/cache.py), the blocks holding its K/V in order:
device blocks while it runs, host blocks of the swap space while it is swapped out, none while
it waits. A sliding-window group's entries before the window are NULL_BLOCK: freed. Every
method that changes memory is all or nothing: it answers False (or is not to be called, where a
`can_` method says no) and changes nothing when memory is short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from paged_jax.sequence import Sequence, SequenceGroup

NULL_BLOCK = -1  # a table entry whose block left its group's sliding window and was freed
Tables = list[list[int]]  # per KV group, a block table


def held_blocks(tables: Tables) -> list[int]:
    """The blocks the tables hold, in order, NULL entries left out."""
    return [b for table in tables for b in table if b != NULL_BLOCK]


def first_held(table: list[int]) -> int:
    """The index of a table's first held block: a window frees a table from its front, so the
    NULL entries are a prefix, and counting what a table holds never walks the blocks it holds
    (the engine counts them every step)."""
    i = 0
    while i < len(table) and table[i] == NULL_BLOCK:
        i += 1
    return i


def num_held(tables: Tables) -> int:
    """How many blocks the tables hold."""
    return sum(len(table) - first_held(table) for table in tables)


@dataclass(frozen=True)
class MemoryUsage:
    """KV cache slots by what they hold at one moment (Fig. 2's categories)."""

    token_states: int  # K/V of tokens computed so far
    reserved: int  # held for the request's tokens still to come
    internal: int  # held but never to be used by the request
    external: int  # rounding to allocation units neighbours cannot use
    total: int  # slots in the cache

    @property
    def free(self) -> int:
        return self.total - self.token_states - self.reserved - self.internal - self.external


def kv_utilization(usages: list[MemoryUsage]) -> float:
    """Slots holding computed tokens / slots given to requests, summed over the samples."""
    given = sum(u.total - u.free for u in usages)
    return sum(u.token_states for u in usages) / given if given else 0.0


def final_length(group: SequenceGroup) -> int:
    """Tokens the request holds when it is done, if it runs to max_tokens."""
    return len(group.prompt_token_ids) + group.params.max_tokens


class KVCacheManager(Protocol):
    """The block tables of the running and swapped sequences, over a cache of num_blocks blocks
    of block_size token slots."""

    # Block copies (source, destination device blocks) queued for the next step to run before
    # it computes: copy-on-write, or a fork's copy where nothing is shared.
    pending_copies: list[tuple[int, int]]

    @property
    def block_size(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request could be given now (what is only held for reuse counts as free)."""
        ...

    @property
    def max_tokens_per_step(self) -> int | None:
        """The most tokens one sequence may compute in a step (a sliding window bounds it so
        that its blocks stay few), or None."""
        ...

    def footprint(self, prompt_len: int, max_tokens: int, n: int) -> tuple[int, int]:
        """(blocks a request of n sequences takes at its longest, the most blocks any one request
        can take): a request whose first is over the second can never run."""
        ...

    # -- admission and growth ------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence, max_blocks: int | None = None) -> Tables:
        """Per group, the cached blocks holding a waiting sequence's longest cached prefix of
        at most max_blocks blocks (none without a prefix cache), leaving at least its last token
        to compute. Changes nothing."""
        ...

    def admit(self, group: SequenceGroup, hits: list[Tables], targets: list[int]) -> bool:
        """A waiting request's active sequences start from their cached prefixes (hits, from
        cached_prefix) and get the blocks to hold targets[i] tokens; or nothing changes and the
        answer is False."""
        ...

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Give each running sequence the blocks to hold the given number of tokens and make the
        blocks it writes next private to it (queuing the copies), all or nothing."""
        ...

    def trim(self, seqs: list[Sequence]) -> None:
        """The sequences' speculated tokens past num_computed_tokens were rejected: give back
        the blocks that held those tokens alone."""
        ...

    def cache_full_blocks(self, seqs: list[Sequence]) -> None:
        """The sequences have computed more tokens: name their newly full blocks for later
        requests to find (nothing without a prefix cache)."""
        ...

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies queued since the last call (pending_copies), for the next step."""
        ...

    # -- sharing and release -------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child starts from parent's computed K/V (a sibling after the prompt, or a beam kept
        twice). Called only with memory for it: the request reserved it, or blocks are shared."""
        ...

    def free(self, seqs: list[Sequence]) -> None:
        """The sequences give their device blocks back (one that holds none is let be); their
        tables become empty."""
        ...

    # -- swapping (preemption by swap) ---------------------------------------------------------

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        """Whether the host swap space can take these running sequences' blocks now."""
        ...

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move the sequences' blocks to the swap space (after can_swap_out said yes): the
        (device block, host block) pairs to copy. Their tables now name host blocks."""
        ...

    def can_swap_in(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Whether swapped-out sequences can come back and grow to hold the given number of
        tokens, keeping the room that admission keeps for running sequences."""
        ...

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring swapped-out sequences back (after can_swap_in said yes): the (host block,
        device block) pairs to copy. Their tables name device blocks again."""
        ...

    def free_swapped(self, seqs: list[Sequence]) -> None:
        """Swapped-out sequences that end (aborted) give their host blocks back."""
        ...

    # -- what the figures and the checks read --------------------------------------------------

    def memory_usage(self, groups: list[SequenceGroup]) -> MemoryUsage:
        """The cache's slots by what they hold, for these running requests (Fig. 2)."""
        ...

    def blocks_named_and_used(self, groups: list[SequenceGroup]) -> tuple[int, int]:
        """(blocks the running sequences' tables name, blocks in use): what sharing saves is
        the difference (Fig. 15)."""
        ...

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Assert that exactly the live sequences (and any cache of the manager's own) hold the
        blocks that are not free."""
        ...
