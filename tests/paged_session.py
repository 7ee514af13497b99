"""Drive a loaded model over a paged KV cache the way an engine would, for tests: every
sequence gets randomly chosen physical blocks (its own in each KV group; none is freed), steps
are padded to two fixed shapes (a prefill bucket and a decode bucket) so each model compiles
twice."""

from __future__ import annotations

import numpy as np

from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache, layout_of


class PagedSession:
    def __init__(self, model, rng, *, block_size=4, num_blocks=96, max_blocks_per_seq=40,
                 prefill_tokens=64, max_seqs=4):
        self.model, self.block_size = model, block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.prefill_tokens, self.max_seqs = prefill_tokens, max_seqs
        self.cache = init_kv_cache(model.config, num_blocks, block_size, model.page_dtype(), model.mesh)
        self.free = [int(b) for b in rng.permutation(num_blocks)]
        self.num_groups = len(layout_of(model.config).windows)
        self.tables: dict[int, list[list[int]]] = {}
        self.cached: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        """batch: (sequence id, its new tokens). Returns float32 logits [len(batch), vocab]
        for each sequence's last new token."""
        chunks = []
        for seq, new in batch:
            tables = self.tables.setdefault(seq, [[] for _ in range(self.num_groups)])
            cached = self.cached.get(seq, 0)
            while len(tables[0]) * self.block_size < cached + len(new):
                for table in tables:
                    table.append(self.free.pop())
            chunks.append(SequenceChunk(tables, cached, len(new)))
        decode = all(len(new) == 1 for _, new in batch)
        num_tokens = self.max_seqs if decode else self.prefill_tokens
        positions, meta = build_metadata(
            chunks, self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
            num_tokens=num_tokens, num_seqs=self.max_seqs, max_q_len=1 if decode else num_tokens,
        )
        tokens = np.zeros(num_tokens, np.int32)
        flat = np.concatenate([np.asarray(new, np.int32) for _, new in batch])
        tokens[: len(flat)] = flat
        logits, self.cache = self.model.forward(self.model.params, tokens, positions, self.cache, meta)
        for seq, new in batch:
            self.cached[seq] = self.cached.get(seq, 0) + len(new)
        return np.asarray(logits[: len(batch)])
