"""A step's sampling inputs, built on the host from its rows' requests: the per-row arrays the
jitted sampler (sampler.py) takes, and the flags that pick which of its compiled variants a step
needs. Rows that ask for nothing special add nothing: penalties' histories, banned tokens, a
grammar's bitmask and logit_bias pairs exist only in the variants whose flag is on."""

from __future__ import annotations

import numpy as np

from paged_jax.core.scheduler import ScheduledChunk
from paged_jax.sequence import Sequence
from paged_jax.worker.executor import ExecutorSpec
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, empty_batch


def sampler_flags(rows: list[tuple[int, ScheduledChunk, Sequence]]) -> SamplerFlags:
    """The sampler features a step's rows need (see SamplerFlags)."""
    params = [(c.group.params, seq) for _, c, seq in rows]
    return SamplerFlags(
        sample=any(not p.greedy for p, _ in params),
        filter=any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p, _ in params),
        adjust=any(p.penalised or len(seq.output_token_ids) < p.min_tokens for p, seq in params),
        logprobs=any(p.logprobs is not None for p, _ in params),
        mask=any(seq.matcher is not None for _, seq in params),
        bias=any(p.logit_bias for p, _ in params),
    )


def ragged(rows: dict[int, list], num_rows: int, fill, dtype) -> np.ndarray:
    """Some rows' lists as one array [num_rows, width], padded with fill: the width a power of
    two of at least 4, so that few shapes (and sampler compilations) cover every step."""
    width = max(4, max((len(v) for v in rows.values()), default=0))
    padded = np.full((num_rows, 1 << (width - 1).bit_length()), fill, dtype)
    for i, values in rows.items():
        padded[i, : len(values)] = values
    return padded


def sampling_batch(placed: list[tuple[int, tuple[ScheduledChunk, Sequence]]], num_rows: int, flags: SamplerFlags,
                   spec: ExecutorSpec) -> SamplingBatch:
    """Sampling inputs with (row, (chunk, sequence)) placed at each row. A row with a
    grammar has its matcher fill its row of the bitmask: the tokens the grammar allows
    after what the sequence has output."""
    b = empty_batch(num_rows)
    banned_rows, history_rows, bias_rows = {}, {}, {}
    if flags.mask:
        b["bitmask"] = np.full((num_rows, -(-spec.vocab_size // 32)), -1, np.int32)
    for i, (chunk, seq) in placed:
        p = chunk.group.params
        b["temperature"][i], b["top_k"][i], b["top_p"][i], b["min_p"][i] = p.temperature, p.top_k, p.top_p, p.min_p
        b["presence"][i], b["frequency"][i], b["repetition"][i] = (
            p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
        b["keys"][i] = seq.key
        b["counters"][i] = len(seq.output_token_ids)
        if p.penalised:
            history_rows[i] = seq
        if len(seq.output_token_ids) < p.min_tokens:
            banned_rows[i] = p.stop_token_ids + ([] if p.ignore_eos else list(spec.eos_token_ids))
        if seq.matcher is not None:
            seq.matcher.fill_next_token_bitmask(b["bitmask"], i)
        if p.logit_bias:
            bias_rows[i] = p.logit_bias
    if flags.bias:
        b["bias_tokens"] = ragged({i: list(bias) for i, bias in bias_rows.items()}, num_rows, -1, np.int32)
        b["bias_values"] = ragged({i: list(bias.values()) for i, bias in bias_rows.items()}, num_rows, 0,
                                   np.float32)
    if flags.adjust:
        b["history"] = np.full((num_rows, spec.max_model_len), -1, np.int32)
        for i, seq in history_rows.items():
            ids = seq.prompt_token_ids + seq.output_token_ids
            b["history"][i, : len(ids)] = ids
            b["output_start"][i] = len(seq.prompt_token_ids)
        b["banned"] = ragged(banned_rows, num_rows, -1, np.int32)
    return SamplingBatch(**b)


def verification_batch(rows: list[tuple[int, ScheduledChunk, Sequence]], first: np.ndarray, min_rows: int,
                       flags: SamplerFlags, spec: ExecutorSpec
                       ) -> tuple[np.ndarray, np.ndarray, SamplingBatch, list[int]]:
    """The rejection sampler's inputs for a step's rows (worker/rejection_sampler.py): a row
    whose chunk has d drafts spans d + 1 verifier rows, on the logits from first[its chunk]
    on, each with its draft (the last with none) and the index in the output of the token it
    decides as its counter; flags are the step's (sampler_flags). Padded to min_rows rows (the
    bucket's, for which the verifier is compiled), or a power of two past that. Returns
    (logits index, drafts, batch, spans)."""
    spans = [len(c.draft_token_ids) + 1 for _, c, _ in rows]
    total = sum(spans)
    num_rows = min_rows if total <= min_rows else 1 << (total - 1).bit_length()
    index, drafts = np.zeros(num_rows, np.int32), np.full(num_rows, -1, np.int32)
    offsets, placed, n = np.zeros(num_rows, np.int32), [], 0
    for (i, c, seq), span in zip(rows, spans):
        index[n : n + span] = first[i] + np.arange(span)
        drafts[n : n + span - 1] = c.draft_token_ids
        offsets[n : n + span] = np.arange(span)
        placed += [(n + j, (c, seq)) for j in range(span)]
        n += span
    batch = sampling_batch(placed, num_rows, flags, spec)
    return index, drafts, batch.replace(counters=batch.counters + offsets), spans
