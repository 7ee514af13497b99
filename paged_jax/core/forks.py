"""Forks: where one sequence becomes several, on any KV cache manager.

A request with n > 1 runs one sequence through its prompt; its siblings fork from it when the
prompt is computed. A beam search keeps the best continuations each step: a beam kept k times
forks k - 1 children, a beam not kept is freed. The engine calls these after each step with
what its executor sampled (real tokens, or the cost model's made-up scores), on whichever KV
cache manager it runs.
"""

from __future__ import annotations

from collections.abc import Callable

from paged_jax.beam_search import BeamSearch, BeamSearchParams, Continuation
from paged_jax.core.scheduler import ScheduledChunk
from paged_jax.kv.interface import KVCacheManager
from paged_jax.sampling_params import SamplingParams
from paged_jax.sequence import Sequence, SequenceGroup


def beam_request(params: BeamSearchParams, eos_token_ids: tuple[int, ...]) -> tuple[BeamSearch, SamplingParams]:
    """A beam search's state, and the sampling its beams run: greedy rows whose top logprobs
    offer the candidates, n = beam_width sequences at most."""
    beam = BeamSearch(params, eos_token_ids)
    return beam, SamplingParams(n=params.beam_width, temperature=0.0, max_tokens=params.max_tokens,
                                ignore_eos=params.ignore_eos, logprobs=beam.num_candidates)


def fork_siblings(rows: list[tuple[int, ScheduledChunk, Sequence]], blocks: KVCacheManager) -> None:
    """A request's siblings fork from its first sequence once the prompt is computed (the
    sampler rows whose sequence is not the chunk's own)."""
    for _, chunk, seq in rows:
        if seq is not chunk.seq:
            blocks.fork(chunk.seq, seq)
            seq.born = True


def continue_beams(group: SequenceGroup, beams: list[Sequence], keep: list[Continuation], blocks: KVCacheManager,
                   new_sequence: Callable[[Sequence], Sequence]) -> None:
    """Make the kept continuations the group's beams. Beams not kept are freed first, so a
    fork never needs more memory than the step held (a dropped beam's blocks, or its Orca
    reservation, make room for the copy that replaces it); then a beam kept k times forks
    k - 1 children from its state before this step's token, and each appends its token."""
    parents = {c.parent for c in keep}
    blocks.free([beam for i, beam in enumerate(beams) if i not in parents])
    kept, seen = [], set()
    for c in keep:
        seq = beams[c.parent]
        if c.parent in seen:
            child = new_sequence(seq)
            child.output_token_ids = list(seq.output_token_ids)
            blocks.fork(seq, child)
            seq = child
        seen.add(c.parent)
        kept.append(seq)
    group.seqs = kept
    for seq, c in zip(kept, keep):
        seq.output_token_ids.append(c.token)
        seq.cumulative_logprob = c.cum_logprob
