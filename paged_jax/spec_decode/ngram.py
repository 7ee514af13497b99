"""Prompt lookup (n-gram) proposals: the sequence's latest n tokens, found earlier in its own
prompt or output, propose the tokens that followed them there. Code, quotes and edits repeat
what is in the context, so the drafts are often right and cost no model call (Saxena 2023;
vLLM's "ngram" method)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from paged_jax.core.scheduler import SchedulerOutput


class NgramProposer:
    follows_every_step = False  # it reads the sequence's tokens, whatever computed them

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, out: SchedulerOutput) -> None:
        for chunk in out.chunks:
            if chunk.num_lookahead:
                seq = chunk.seq
                chunk.propose(self.lookup(np.asarray(seq.prompt_token_ids + seq.output_token_ids, np.int32),
                                          chunk.num_lookahead))

    def lookup(self, tokens: np.ndarray, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix
        of tokens (max_n down to min_n long) that occurs earlier; none if no suffix does."""
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(tokens[:-1], n)  # every n-gram that ends before the last token
            found = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(found):
                start = found[-1] + n
                return tokens[start : start + k].tolist()
        return []

    def warm_up(self, background: bool) -> None:
        """Nothing runs on a device."""
