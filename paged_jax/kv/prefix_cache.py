"""The prefix cache: full KV blocks found again by the tokens that filled them.

A full block is named by a chained hash (128-bit BLAKE2b): its tokens and the name of the
block before it, so one name stands for the whole prefix up to the block's end. A request's
longest cached prefix is found by walking its blocks from the first while names match; the
stored tokens and parent name are compared too, so a colliding name alone cannot hand out the
wrong KV.

The cache holds one reference on each block it names (the allocator's reference counts do the
books). A cached block that no sequence uses is *evictable*: it still counts as free for
scheduling, and it is given back to the allocator, least recently used first, only when an
allocation needs room. A sequence releases its blocks last block first, so its prefix's tail
is evicted before its head, which more requests share.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

ROOT = b""  # the parent name of a sequence's first block


def block_name(parent: bytes, tokens: list[int]) -> bytes:
    """The chained name of a full block holding `tokens` after the prefix named `parent`."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class CachedBlock:
    block: int
    parent: bytes
    tokens: tuple[int, ...]


class PrefixCache:
    def __init__(self):
        self.by_name: dict[bytes, CachedBlock] = {}
        self.name_of: dict[int, bytes] = {}  # block -> its name, for the blocks cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # idle cached blocks, oldest first

    def lookup(self, name: bytes, parent: bytes, tokens: list[int]) -> int | None:
        """The block cached under name for exactly this parent and these tokens, if any."""
        entry = self.by_name.get(name)
        if entry is None or entry.parent != parent or entry.tokens != tuple(tokens):
            return None
        return entry.block

    def insert(self, name: bytes, parent: bytes, tokens: list[int], block: int) -> bool:
        """Name a block that a sequence just filled; False when the name is taken (the same
        prefix was computed twice at once: the second copy stays private)."""
        if name in self.by_name or block in self.name_of:
            return False
        self.by_name[name] = CachedBlock(block, parent, tuple(tokens))
        self.name_of[block] = name
        return True

    def idle(self, block: int) -> None:
        """No sequence uses the cached block any more: it may be evicted, after older ones."""
        self.evictable[block] = None

    def touch(self, block: int) -> None:
        """A sequence uses the cached block again: it is no longer evictable."""
        self.evictable.pop(block, None)

    def evict(self, n: int) -> list[int]:
        """Forget the n least recently idle blocks; the caller drops the cache's references."""
        blocks = []
        for _ in range(min(n, len(self.evictable))):
            block, _ = self.evictable.popitem(last=False)
            del self.by_name[self.name_of.pop(block)]
            blocks.append(block)
        return blocks
