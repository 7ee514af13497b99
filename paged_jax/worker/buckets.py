"""Step shapes: every jitted step is padded to a bucket of a small, fixed set (model_runner.py
says which are compiled when), and returns the logits of the rows a bucket says.

Decode-only steps pad to a number of sequences from 1, 2, 3, 4, 6, 8, 12, ... (one token
each); other steps to a power-of-two number of tokens and 4, 16, 64, ... sequences (up to
min(tokens, max_num_seqs)), so that a lone prompt does not pay for the attention tiles and
logits rows of many sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from paged_jax.core.scheduler import ScheduledChunk

MIN_TOKEN_BUCKET = 16


def bucket_sizes(low: int, high: int, *, halves: bool = False) -> list[int]:
    """Powers of two from low up to high (high included); with halves also 1.5x each
    (3, 6, 12, 24, 48, ...), which halves the padding of decode batches."""
    sizes, size = set(), low
    while size < high:
        sizes.add(size)
        if halves and size >= 2:
            sizes.add(size * 3 // 2)
        size *= 2
    return sorted(s for s in sizes if s < high) + [high]


def seq_sizes(high: int, single: bool = False) -> list[int]:
    """Sequence counts of the mixed buckets with up to `high` sequences: 4, 16, 64, ... below
    it, and high; with single, 1 too (a lone sequence verifying its drafts)."""
    return [s for s in ([1] if single else []) + [4 ** i for i in range(1, high.bit_length())] if s < high] + [high]


@dataclass(frozen=True)
class Bucket:
    num_tokens: int
    num_seqs: int
    decode: bool  # one token per sequence: tiles of one query token
    # Rows of logits the step returns, chosen by the runner: 0 for each sequence's last token;
    # num_tokens for every token (prompt logprobs); with speculation, k + 1 per sequence.
    num_logits: int = 0

    @property
    def max_q_len(self) -> int:
        return 1 if self.decode else self.num_tokens

    @property
    def every_token(self) -> bool:
        return self.num_logits == self.num_tokens


def mixed_buckets(max_num_seqs: int, max_num_batched_tokens: int, num_speculative_tokens: int = 0) -> list[Bucket]:
    """The buckets of steps that are not decode-only. With speculation (k drafts) each returns
    k + 1 chosen logits rows per sequence, and the smallest fit one sequence verifying its
    drafts (k + 1 tokens, rounded up to a power of two; one sequence): at batch 1 every step
    is one, and the speed-up rests on its cost against a decode step's (experiments/
    spec_decode.py measures both: "ms / model step")."""
    low = min(MIN_TOKEN_BUCKET, max_num_batched_tokens)
    if num_speculative_tokens:
        low = min(low, 1 << num_speculative_tokens.bit_length())
    rows = num_speculative_tokens + 1 if num_speculative_tokens else 0
    return [Bucket(t, s, False, min(t, s * rows)) for t in bucket_sizes(low, max_num_batched_tokens)
            for s in seq_sizes(min(t, max_num_seqs), single=bool(num_speculative_tokens))]


def bucket_of(key) -> Bucket:
    """The bucket of an executable's key: a Bucket, or (Bucket, sampler flags) for a decode loop's step."""
    return key if isinstance(key, Bucket) else key[0]


def every_token(bucket: Bucket) -> Bucket:
    """The bucket's variant that returns every token's logits (prompt logprobs)."""
    return replace(bucket, num_logits=bucket.num_tokens)


def compile_logit_rows(bucket: Bucket) -> tuple[np.ndarray, ...]:
    """The forward pass's logit_rows argument for compiling a bucket: rows it returns, if chosen."""
    return (np.zeros(bucket.num_logits, np.int32),) if bucket.num_logits else ()


def logit_rows_of(chunks: list[ScheduledChunk], bucket: Bucket) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(the forward's logit_rows argument for a step, for each chunk the index of its logits
    after its last verified token among those returned). Every token's for an every-token
    bucket; with speculation, each sampling chunk's last d + 1 tokens (d drafts); else none is
    passed and the model returns each sequence's last."""
    ends = np.cumsum([c.num_new for c in chunks]) - 1
    verified_ends = ends - np.array([c.num_lookahead for c in chunks])
    if not bucket.num_logits:
        return (), np.arange(len(chunks))
    if bucket.every_token:
        return (np.arange(bucket.num_tokens, dtype=np.int32),), verified_ends
    chosen, first, n = np.zeros(bucket.num_logits, np.int32), np.zeros(len(chunks), np.int64), 0
    for i, c in enumerate(chunks):
        if c.samples:
            span = c.num_lookahead + 1
            chosen[n : n + span] = np.arange(verified_ends[i], ends[i] + 1)
            first[i], n = n, n + span
    return (chosen,), first
