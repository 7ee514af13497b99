"""Orca's KV memory manager, the paper's baseline (§3.1, §6.1): every request reserves one
contiguous chunk of cache at admission, sized for the longest it may grow, from a buddy
allocator. It runs in our engine in place of the paged BlockManager, so a comparison differs
only in memory management (and, for static batching, in the scheduler).

The chunk is a run of consecutive blocks, so the sequence's block table is a range and the
same attention kernels read it. Three reservation policies:
- "max": max_model_len tokens (what a system that knows nothing must reserve);
- "pow2": the prompt and the next power of two of its output length (max_tokens: 25 -> 32);
- "oracle": exactly the final length (an oracle that knows when the request stops).
With ignore_eos, as in the benchmarks, max_tokens is the true output length. A reservation
always holds the whole request, so nothing is ever preempted.

A request of n sequences (parallel sampling, or a beam search of width n) reserves n chunks
at admission, as a system without block sharing must: nothing is shared, so a sibling born
from the prompt, or a beam forked from another, gets a spare chunk and a copy of its parent's
K/V. A chunk a sequence gives back while its request runs (a dropped beam) is the request's
spare until the request ends.

Waste has three kinds here (Fig. 2): slots reserved for tokens still to come, slots reserved
that the request never uses (internal fragmentation) and the rounding of a reservation to a
power-of-two chunk of blocks (external fragmentation: neighbours cannot use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from paged_jax.kv.interface import MemoryUsage, Tables, final_length
from paged_jax.sequence import Sequence, SequenceGroup

POLICIES = ("max", "pow2", "oracle")
NEVER_SWAPPED = "a reservation holds the whole request: nothing is preempted, so nothing is swapped"


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class BuddyAllocator:
    """Power-of-two chunks of blocks, split in halves on demand and merged with their buddy
    when both are free. A pool whose size is not a power of two is a few arenas, one per bit
    of its size."""

    def __init__(self, num_blocks: int):
        self.free_chunks: dict[int, set[int]] = {}  # chunk size -> start blocks
        self.size_of: dict[int, int] = {}  # allocated start -> chunk size
        self.arena_of: dict[int, tuple[int, int]] = {}  # start of each arena -> (start, size)
        start = 0
        for bit in reversed(range(num_blocks.bit_length())):
            if num_blocks >> bit & 1:
                self.free_chunks.setdefault(1 << bit, set()).add(start)
                self.arena_of[start] = (start, 1 << bit)
                start += 1 << bit
        self.num_free = num_blocks

    def allocate(self, num_blocks: int) -> int | None:
        """The start of a free chunk of next_pow2(num_blocks) blocks, or None."""
        size = _next_pow2(num_blocks)
        larger = sorted(s for s, starts in self.free_chunks.items() if s >= size and starts)
        if not larger:
            return None
        chunk = larger[0]
        start = min(self.free_chunks[chunk])  # lowest address: keeps the pool compact
        self.free_chunks[chunk].remove(start)
        while chunk > size:  # split, keeping the lower half
            chunk //= 2
            self.free_chunks.setdefault(chunk, set()).add(start + chunk)
        self.size_of[start] = size
        self.num_free -= size
        return start

    def free(self, start: int) -> None:
        size = self.size_of.pop(start)
        self.num_free += size
        arena_start, arena_size = self._arena(start)
        while size < arena_size:
            buddy = arena_start + ((start - arena_start) ^ size)
            if buddy not in self.free_chunks.get(size, ()):
                break
            self.free_chunks[size].remove(buddy)
            start, size = min(start, buddy), size * 2
        self.free_chunks.setdefault(size, set()).add(start)

    def _arena(self, block: int) -> tuple[int, int]:
        return next((s, n) for s, n in self.arena_of.values() if s <= block < s + n)


class Chunk(NamedTuple):
    """A reserved run of blocks."""

    start: int  # its first block
    tokens: int  # tokens reserved


@dataclass(eq=False)
class RequestChunks:
    """The chunks one request reserved: how many its sequences hold, and the spare ones."""

    holders: int
    spare: list[Chunk]


class ReservingBlockManager:
    """A KVCacheManager (interface.py) over contiguous reservations: a chunk per sequence,
    nothing shared, nothing swapped."""

    def __init__(self, num_blocks: int, block_size: int, policy: str, max_model_len: int):
        if policy not in POLICIES:
            raise ValueError(f"reservation policy must be one of {POLICIES}, got {policy!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.policy = policy
        self.max_model_len = max_model_len
        self.buddy = BuddyAllocator(num_blocks)
        self.chunks: dict[Sequence, tuple[Chunk, RequestChunks]] = {}  # seq -> its chunk, its request's
        self.pending_copies: list[tuple[int, int]] = []  # (source, destination): a fork's K/V

    @property
    def num_free_blocks(self) -> int:
        return self.buddy.num_free

    def reservation(self, prompt_len: int, max_tokens: int) -> int:
        """Tokens to reserve for a request under the policy."""
        return {"max": self.max_model_len, "pow2": min(prompt_len + _next_pow2(max_tokens), self.max_model_len),
                "oracle": prompt_len + max_tokens}[self.policy]

    def footprint(self, prompt_len: int, max_tokens: int, n: int) -> tuple[int, int]:
        """(blocks a request of n sequences takes, the most such a request can take): n chunks,
        and the blocks of the arenas big enough for one."""
        chunk = _next_pow2(-(-self.reservation(prompt_len, max_tokens) // self.block_size))
        return n * chunk, sum(size // chunk * chunk for _, size in self.buddy.arena_of.values())

    def admit(self, group: SequenceGroup, hits: list[Tables], targets: list[int]) -> bool:
        """Reserve a chunk for each of the request's n sequences and give the computing ones
        the blocks for their first tokens, or change nothing and say False."""
        tokens = self.reservation(len(group.prompt_token_ids), group.params.max_tokens)
        starts = []
        for _ in range(group.params.n):
            start = self.buddy.allocate(-(-tokens // self.block_size))
            if start is None:
                for taken in starts:
                    self.buddy.free(taken)
                return False
            starts.append(start)
        chunks = [Chunk(start, tokens) for start in starts]
        request = RequestChunks(holders=len(group.active), spare=chunks[len(group.active):])
        for seq, chunk in zip(group.active, chunks):
            self.chunks[seq] = chunk, request
        return self.grow(list(zip(group.active, targets)))

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Tables extend inside their reservation; a reservation holds the whole request."""
        for seq, tokens in growth:
            chunk, _ = self.chunks[seq]
            assert tokens <= chunk.tokens, "a request grew past its reservation"
            held = len(seq.block_tables[0]) if seq.block_tables else 0
            num_blocks = max(held, -(-tokens // self.block_size))
            seq.block_tables = [list(range(chunk.start, chunk.start + num_blocks))]
        return True

    def free(self, seqs: list[Sequence]) -> None:
        """A sequence's chunk becomes its request's spare; the last one out frees them all."""
        for seq in seqs:
            seq.block_tables = []
            if seq not in self.chunks:
                continue
            chunk, request = self.chunks.pop(seq)
            request.spare.append(chunk)
            request.holders -= 1
            if request.holders == 0:
                for spare in request.spare:
                    self.buddy.free(spare.start)

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    @property
    def max_tokens_per_step(self) -> int | None:
        return None

    def cached_prefix(self, seq: Sequence, max_blocks: int | None = None) -> Tables:
        return [[]]

    def blocks_named_and_used(self, groups: list[SequenceGroup]) -> tuple[int, int]:
        """Nothing is shared (a reservation's rounding is not sharing)."""
        return 0, 0

    def cache_full_blocks(self, seqs: list[Sequence]) -> None:
        pass

    def trim(self, seqs: list[Sequence]) -> None:
        """Nothing goes back: a sequence's chunk is reserved for its longest."""

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child takes a spare chunk of its request and a copy of parent's computed K/V
        (queued for the next step, before it computes)."""
        _, request = self.chunks[parent]
        chunk = request.spare.pop()
        request.holders += 1
        self.chunks[child] = chunk, request
        (table,) = parent.block_tables
        child.block_tables = [list(range(chunk.start, chunk.start + len(table)))]
        child.num_computed_tokens = parent.num_computed_tokens
        computed = -(-parent.num_computed_tokens // self.block_size)
        self.pending_copies += list(zip(table[:computed], child.block_tables[0]))

    # -- swapping: never, as nothing is preempted (grow always succeeds) -------------------------

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return False

    def can_swap_in(self, growth: list[tuple[Sequence, int]]) -> bool:
        return False

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        raise RuntimeError(NEVER_SWAPPED)

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        raise RuntimeError(NEVER_SWAPPED)

    def free_swapped(self, seqs: list[Sequence]) -> None:
        raise RuntimeError(NEVER_SWAPPED)

    # -- what the figures and the checks read --------------------------------------------------

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Exactly the live sequences hold reservations, and the buddy allocator's free count
        is the rest of the cache (their chunks and their requests' spares)."""
        assert set(self.chunks) == set(live), "reservations disagree with the live sequences"
        requests = {request for _, request in self.chunks.values()}
        chunks = [chunk for chunk, _ in self.chunks.values()] + [c for r in requests for c in r.spare]
        assert self.buddy.num_free == self.num_blocks - sum(self.buddy.size_of[c.start] for c in chunks)

    def memory_usage(self, groups: list[SequenceGroup]) -> MemoryUsage:
        """Slots by use; a request's spare chunks are reserved for the sequences to come."""
        stored = reserved = internal = external = 0
        for group in groups:
            final = final_length(group)
            held = {seq: self.chunks[seq] for seq in group.active if seq in self.chunks}
            chunks = [(chunk.tokens, seq.num_computed_tokens) for seq, (chunk, _) in held.items()]
            chunks += [(c.tokens, 0) for request in {r for _, r in held.values()} for c in request.spare]
            for tokens, computed in chunks:
                stored += min(computed, final)
                reserved += final - min(computed, final)
                internal += tokens - final
                external += _next_pow2(-(-tokens // self.block_size)) * self.block_size - tokens
        return MemoryUsage(stored, reserved, internal, external, self.num_blocks * self.block_size)
