"""What the engine's step calls to compute a scheduled step: an `Executor`.

Two executors play the part. The `ModelRunner` (model_runner.py) runs the model and the
sampler on the device. The `CostModelExecutor` (cost_model.py) computes nothing: it returns
made-up tokens and scores and the time a cost model says the step would take, which is how
the paper's figures are simulated at a scale no machine here can run. The engine and its
scheduler cannot tell them apart, so a simulated figure takes exactly the decisions the real
engine takes, multi-step decode loop included (the runner's one difference: while a rare
decode-loop variant compiles in the background, `decode_loop_steps` runs single steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from paged_jax.core.scheduler import SamplerRow, ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class ExecutorSpec:
    """What the engine plans with: the cache's blocks, the longest sequence it may hold, the
    vocabulary prompts are checked against, the model's own end-of-sequence ids, the sliding
    window of each KV group (model/cache.py; None: global attention) and what a block costs."""

    num_blocks: int
    num_swap_blocks: int
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...] = ()
    kv_windows: tuple[int | None, ...] = (None,)
    kv_bytes_per_block: int = 0  # device memory one block takes, pages and scales, on all devices


@dataclass
class Sampled:
    """A token and its scores: one the sampler drew, or a prompt's own (prompt logprobs)."""

    token: int
    logprob: float
    rank: int  # in the whole vocabulary; 0 when logprobs were not requested
    top: list[tuple[int, float]]  # (token, logprob), most likely first; empty unless asked


# on_step(i, sampled): step i's tokens per sampler row, as soon as the host has them (in a
# decode loop, while step i + 1 computes): one per row, or for a row that speculated its
# accepted drafts and the token after them. False ends a decode loop early.
StepListener = Callable[[int, list[list[Sampled]]], bool]


@dataclass(frozen=True)
class StepResult:
    """For each sampler row, the tokens it sampled (one per step of a decode loop; with
    speculation, the drafts kept and the token after them); the step's
    modelled seconds (None: the step's time is the wall clock's); and for each chunk that
    scores prompt tokens (by its index in the step), their scores in prompt order (see
    prompt_positions)."""

    sampled: list[list[Sampled]] = field(default_factory=list)
    seconds: float | None = None
    prompt_logprobs: dict[int, list[Sampled]] = field(default_factory=dict)


def prompt_positions(chunk: ScheduledChunk) -> range:
    """The positions of chunk whose logits score the prompt token after them, for a request
    that asked for its prompt's logprobs: those before the prompt's last token (whose logits
    are the sampler's) that no earlier chunk scored, so a prompt recomputed after preemption
    is not scored twice."""
    group = chunk.group
    if group.params.prompt_logprobs is None:
        return range(0)
    scored = len(group.prompt_logprobs) - 1  # positions 0 .. scored - 1 are done
    return range(max(chunk.num_cached, scored), min(chunk.num_cached + chunk.num_new, len(group.prompt_token_ids) - 1))


@dataclass
class StepCounters:
    """What the executor did since start, for the engine's stats()."""

    num_steps: int = 0  # model steps (each step of a decode loop counts)
    num_calls: int = 0  # scheduled steps the host prepared (a decode loop counts once)
    num_swapped_out: int = 0  # blocks copied device -> host
    num_swapped_in: int = 0
    num_copied: int = 0  # blocks copied on write
    device_wait: float = 0.0  # seconds the host spent waiting for step results

    def count_moves(self, out: SchedulerOutput) -> None:
        self.num_swapped_out += len(out.swap_out)
        self.num_swapped_in += len(out.swap_in)
        self.num_copied += len(out.copies)


@dataclass(frozen=True)
class CompileStats:
    built: int = 0  # step shapes compiled or loaded before and while serving
    from_cache: int = 0  # of which loaded from the persistent compilation cache
    pending: int = 0  # still compiling in the background
    after_warm_up: int = 0  # compiled on the serving path unexpectedly: a bug, always 0 (model_runner.py)
    seconds: float = 0.0  # spent building them, on whichever thread


class Executor(Protocol):
    spec: ExecutorSpec
    counters: StepCounters

    def execute(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int = 1,
                limits: list[int] | None = None, on_step: StepListener | None = None) -> StepResult:
        """Run the step: block moves first (swap out, swap in, copy-on-write copies), then the
        model. rows are out.sampler_rows(). num_steps > 1 (decode-only steps, as many as
        decode_loop_steps granted) asks for up to that many tokens per row in one decode
        loop; limits[i] is the number of tokens chunk i's blocks hold, past which its row
        writes nothing. on_step sees each step's tokens as they come; when it returns False
        the loop ends after the step in flight (the result holds the steps run). Chunks with
        prompt_positions (never in a decode loop) get those prompt tokens scored."""

    def decode_loop_steps(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int) -> int:
        """num_steps if this decode-only step can run as one loop of that many steps now, else
        1: asked before the engine grows blocks for the loop."""

    def warm_up(self, num_scheduler_steps: int, background: bool) -> None:
        """Make every step shape ready before it is needed."""

    def compile_stats(self) -> CompileStats: ...

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        """Block until every step shape is ready; False on timeout."""
