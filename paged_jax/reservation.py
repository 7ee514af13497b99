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

Waste has three kinds here (Fig. 2): slots reserved for tokens still to come, slots reserved
that the request never uses (internal fragmentation) and the rounding of a reservation to a
power-of-two chunk of blocks (external fragmentation: neighbours cannot use it).
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_jax.sequence import Sequence, SequenceGroup

POLICIES = ("max", "pow2", "oracle")


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


class ReservingBlockManager:
    """The block-manager interface the scheduler and engine use, over contiguous reservations.
    One sequence per request: there is nothing to share."""

    swap_pool = None  # nothing is ever swapped: a reservation holds the whole request
    watermark_blocks = 0

    def __init__(self, num_blocks: int, block_size: int, policy: str, max_model_len: int):
        if policy not in POLICIES:
            raise ValueError(f"reservation policy must be one of {POLICIES}, got {policy!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.policy = policy
        self.max_model_len = max_model_len
        self.buddy = BuddyAllocator(num_blocks)
        self.reservations: dict[Sequence, tuple[int, int]] = {}  # seq -> (start block, reserved tokens)
        self.pending_copies: list[tuple[int, int]] = []  # never any: nothing is shared

    @property
    def num_free_blocks(self) -> int:
        return self.buddy.num_free

    def reservation(self, prompt_len: int, max_tokens: int) -> int:
        """Tokens to reserve for a request under the policy."""
        return {"max": self.max_model_len, "pow2": min(prompt_len + _next_pow2(max_tokens), self.max_model_len),
                "oracle": prompt_len + max_tokens}[self.policy]

    def footprint(self, prompt_len: int, max_tokens: int, n: int) -> tuple[int, int]:
        """(blocks the request takes at its longest, the most one request can take)."""
        if n != 1:
            raise ValueError(f"the Orca ({self.policy}) baseline serves one sequence per request, got n={n}")
        chunk = _next_pow2(-(-self.reservation(prompt_len, max_tokens) // self.block_size))
        return chunk, max(size for _, size in self.buddy.arena_of.values())

    def admit(self, group: SequenceGroup, hits: list[list[int]], targets: list[int]) -> bool:
        """Reserve the request's chunk and give it the blocks for its first tokens, or change
        nothing and say False."""
        (seq,) = group.active
        tokens = self.reservation(len(group.prompt_token_ids), group.params.max_tokens)
        start = self.buddy.allocate(-(-tokens // self.block_size))
        if start is None:
            return False
        self.reservations[seq] = (start, tokens)
        return self.grow(list(zip(group.active, targets)))

    def grow(self, growth: list[tuple[Sequence, int]]) -> bool:
        """Tables extend inside their reservation; a reservation holds the whole request."""
        for seq, tokens in growth:
            start, reserved = self.reservations[seq]
            assert tokens <= reserved, "a request grew past its reservation"
            seq.block_table = list(range(start, start + max(len(seq.block_table), -(-tokens // self.block_size))))
        return True

    def free(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq in self.reservations:
                self.buddy.free(self.reservations.pop(seq)[0])
            seq.block_table = []

    def take_copies(self) -> list[tuple[int, int]]:
        return []

    def cached_prefix(self, seq: Sequence) -> list[int]:
        return []

    def cache_full_blocks(self, seqs: list[Sequence]) -> None:
        pass

    def fork(self, parent: Sequence, child: Sequence) -> None:
        raise ValueError("the reserving (Orca) memory manager serves one sequence per request")

    def check_no_leaks(self, live: list[Sequence]) -> None:
        """Exactly the live sequences hold reservations, and the buddy allocator's free count
        is the rest of the cache."""
        assert set(self.reservations) == set(live), "reservations disagree with the live sequences"
        held = sum(self.buddy.size_of[start] for start, _ in self.reservations.values())
        assert self.buddy.num_free == self.num_blocks - held

    def memory_usage(self, groups: list[SequenceGroup]) -> MemoryUsage:
        stored = reserved = internal = external = 0
        for group in groups:
            for seq in group.active:
                if seq not in self.reservations:
                    continue
                _, tokens = self.reservations[seq]
                final = final_length(group)
                stored += min(seq.num_computed_tokens, final)
                reserved += final - min(seq.num_computed_tokens, final)
                internal += tokens - final
                external += _next_pow2(-(-tokens // self.block_size)) * self.block_size - tokens
        return MemoryUsage(stored, reserved, internal, external, self.num_blocks * self.block_size)
