"""What an engine is, to whatever drives one: `LLM`, `AsyncLLMEngine` and the server.

Three classes play the engine's part: `LLMEngine` itself, the data-parallel front that spreads
requests over D engines (data_parallel.py), and the multi-host leader that tells its followers
about each step (multihost.py). They implement `EngineClient`, so their drivers depend on this
declaration only and never reach into a scheduler or a block manager: what a driver wants to
know of the queues and the cache comes as an `EngineLoad`, the sum over engines where there
are several.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from paged_jax.beam_search import BeamSearchParams
from paged_jax.outputs import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from paged_jax.core.kv_snapshot import KVSnapshot
    from paged_jax.engine_args import EngineArgs

PromptType = str | dict  # text, or {"prompt_token_ids": [...], "prompt": optional text}
# Called within a step (a decode loop) with the running requests' outputs after each of its
# steps but the last; False ends the loop after the step in flight (see LLMEngine.step).
TokenListener = Callable[[list[RequestOutput]], bool]


@dataclass(frozen=True)
class EngineLoad:
    """The queues and the cache between two steps: what /metrics, /health and the data-parallel
    router read, taken by the thread that steps the engine and read by others as it is."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0  # prompt tokens of first admissions (prefix-cache queries)
    num_cached_prompt_tokens: int = 0  # of which found in the prefix cache
    # Speculative decoding (spec_decode/proposer.py: SpecDecodeStats): drafts, their tokens, those kept
    # (also by draft position).
    num_spec_drafts: int = 0
    num_spec_draft_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use, 0..1 (vLLM's kv_cache_usage_perc is this fraction)."""
        return 1 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    def __add__(self, other: EngineLoad) -> EngineLoad:
        return EngineLoad(*(tuple(map(sum, itertools.zip_longest(a, b, fillvalue=0))) if isinstance(a, tuple)
                            else a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


class EngineClient(Protocol):
    """Requests in, outputs out, one step at a time (vLLM's LLMEngine interface)."""

    args: EngineArgs
    tokenizer: Tokenizer | None
    max_model_len: int
    max_num_batched_tokens: int
    vocab_size: int

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request; ValueError (and nothing changed) for one that can never run."""

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; its last output (finish_reason "abort"), or
        None for an id the engine does not hold."""

    def step(self, on_tokens: TokenListener | None = None) -> list[RequestOutput]:
        """One step: the outputs of the requests that made progress; on_tokens sees a decode
        loop's tokens step by step (may be called from several threads at once)."""

    def has_unfinished_requests(self) -> bool: ...

    def load(self) -> EngineLoad: ...

    def stats(self) -> dict:
        """Counters since start: the cache, preemptions, steps, start-up (see LLMEngine.stats)."""

    def kv_snapshot(self) -> KVSnapshot:
        """The paged KV cache between steps (core/kv_snapshot.py); ValueError where there is no
        single paged cache to show (data-parallel engines, Orca's reservations)."""

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        """Block until every step shape is compiled; False on timeout."""
