"""One line of the engine's step log: the serving figures and the cost model are made from
these."""

from __future__ import annotations

from dataclasses import dataclass

from paged_jax.kv.interface import MemoryUsage


@dataclass(frozen=True)
class StepRecord:
    """What one step computed, how long it took and what it left in the cache: the serving
    figures and the simulator's cost model are made from these."""

    num_requests: int
    num_tokens: int  # tokens computed in each device step
    num_context_tokens: int  # K/V tokens attention reads in each device step
    num_steps: int  # device steps (decode loops run several)
    seconds: float
    memory: MemoryUsage  # the cache after the step
    waiting: bool  # requests were left waiting
