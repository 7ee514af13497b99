"""The proposer protocol, the one that runs for an engine's speculative_config, and the
counters of what speculation proposed and what was kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax

from paged_jax.core.scheduler import SchedulerOutput
from paged_jax.engine_args import EngineArgs, SpeculativeConfig
from paged_jax.worker.executor import Executor


class Proposer(Protocol):
    # True when the proposer must see every step the target takes (a draft model's cache
    # follows the target's chunks): then the engine runs no multi-step decode loops.
    follows_every_step: bool

    def propose(self, out: SchedulerOutput) -> None:
        """Fill each chunk's lookahead slots with draft tokens (ScheduledChunk.propose), before
        the step runs; the draft model also computes the step's chunks into its own cache."""

    def warm_up(self, background: bool) -> None:
        """Make the proposer's device steps ready before serving (nothing for an n-gram)."""


def make_proposer(config: SpeculativeConfig, args: EngineArgs, devices: Sequence[jax.Device] | None,
                  target: Executor, max_num_batched_tokens: int) -> Proposer:
    if config.method == "ngram":
        from paged_jax.spec_decode.ngram import NgramProposer
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    from paged_jax.spec_decode.draft_model import DraftModelProposer
    return DraftModelProposer.load(config, args, devices, target, max_num_batched_tokens)


@dataclass
class SpecDecodeStats:
    """vLLM's spec_decode counters: drafts (sequences that speculated in a step), draft tokens,
    accepted tokens, and acceptances by draft position (the j-th draft of a sequence kept)."""

    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.accepted_per_pos = self.accepted_per_pos or [0] * self.num_speculative_tokens

    @classmethod
    def total(cls, stats: list[dict]) -> SpecDecodeStats:
        """The counters of several engines' stats() (data parallelism), summed."""
        per_pos = [sum(v) for v in zip(*(s["spec_decode_num_accepted_tokens_per_pos"] for s in stats))]
        return cls(len(per_pos), *(sum(s[f"spec_decode_num_{name}"] for s in stats)
                                   for name in ("drafts", "draft_tokens", "accepted_tokens")), per_pos)

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if not num_drafted:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1

    def as_dict(self) -> dict:
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": list(self.accepted_per_pos),
            # Tokens a speculating sequence got per step: its accepted drafts and the model's own.
            "spec_decode_mean_acceptance_length": 1 + self.num_accepted_tokens / self.num_drafts
            if self.num_drafts else 0.0,
            "spec_decode_acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens
            if self.num_draft_tokens else 0.0,
        }
