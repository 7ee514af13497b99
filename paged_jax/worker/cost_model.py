"""An executor that computes nothing: the engine served at a scale no machine here can run.

The `CostModelExecutor` stands where the model runner stands (executor.py). Every decision
(admission, preemption, what each step computes, what the cache holds, forks and beams) is
the engine's own; only the tokens and the time are made up:
- a row samples token 0, unless it asks for logprobs (a beam search's rows do): then its
  candidates are tokens 0..k-1 with the log-softmax of normal logits of spread `logit_spread`
  as log-probabilities, and it samples the most likely. The spread decides how often beams
  share ancestors, hence how much block sharing saves. A prompt token whose logprob is asked
  for (prompt logprobs) is certain: logprob 0, rank 1.
- a step takes fixed + per_token x tokens computed + per_context_token x K/V tokens read
  (`CostModel`): reading the weights once per step, the matmuls per token, attention per cached
  token. A decode loop of k steps costs k steps; a block copied (a fork without sharing)
  reads and writes its tokens, 2 x per_context_token each. Swaps are not charged.
The coefficients come from measured step times (`CostModel.fit` over an engine's step log) or
from a roofline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paged_jax.core.scheduler import SamplerRow, SchedulerOutput
from paged_jax.core.step_record import StepRecord
from paged_jax.engine_args import EngineArgs
from paged_jax.worker.executor import (
    CompileStats,
    ExecutorSpec,
    Sampled,
    StepCounters,
    StepListener,
    StepResult,
    prompt_positions,
)


@dataclass(frozen=True)
class CostModel:
    fixed: float  # seconds per device step
    per_token: float  # seconds per token computed
    per_context_token: float  # seconds per cached K/V token attention reads
    source: str

    def seconds(self, num_tokens: int, num_context_tokens: int) -> float:
        return self.fixed + self.per_token * num_tokens + self.per_context_token * num_context_tokens

    @classmethod
    def fit(cls, log: list[StepRecord], source: str) -> CostModel:
        """Least squares over measured steps (a decode loop of k steps counts k times its
        per-step tokens); coefficients clipped at zero."""
        x = np.array([[r.num_steps, r.num_steps * r.num_tokens, r.num_steps * r.num_context_tokens] for r in log],
                     float)
        y = np.array([r.seconds for r in log])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(*np.maximum(coef, 0.0).tolist(), source=source)

    def step_seconds(self, record: StepRecord) -> float:
        """A logged step's time on this model (a decode loop of k steps costs k steps)."""
        return record.num_steps * self.seconds(record.num_tokens, record.num_context_tokens)

    def relative_error(self, log: list[StepRecord]) -> float:
        """Mean |predicted - measured| / measured over the steps: how well the form fits."""
        predicted = np.array([self.step_seconds(r) for r in log])
        measured = np.array([r.seconds for r in log])
        return float(np.mean(np.abs(predicted - measured) / measured))


class CostModelExecutor:
    """Made-up tokens and scores, and each step's time on `cost` (see the module docstring).
    The cache is the one the engine's arguments ask for: num_gpu_blocks_override blocks (no
    device memory to size it from), max_model_len tokens per sequence, no swap space."""

    def __init__(self, args: EngineArgs, cost: CostModel, vocab_size: int, logit_spread: float = 1.0):
        if args.num_gpu_blocks_override is None or args.max_model_len is None:
            raise ValueError("a cost-model engine has no model or device to size from: set num_gpu_blocks_override "
                             "and max_model_len")
        if args.preemption_mode == "swap":
            raise ValueError("the cost model has no swap space: preemption_mode must be 'recompute'")
        self.spec = ExecutorSpec(num_blocks=args.num_gpu_blocks_override, num_swap_blocks=0,
                                 max_model_len=args.max_model_len, vocab_size=vocab_size)
        self.cost, self.block_size, self.logit_spread = cost, args.block_size, logit_spread
        self.rng = np.random.default_rng(args.seed)
        self.counters = StepCounters()

    def execute(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int = 1,
                limits: list[int] | None = None, on_step: StepListener | None = None) -> StepResult:
        self.counters.count_moves(out)
        if not (out.chunks or out.copies):
            return StepResult(seconds=0.0)
        self.counters.num_calls += 1
        sampled = [self._sample(chunk.group.params.logprobs, num_steps) for _, chunk, _ in rows]
        steps = num_steps
        for i in range(num_steps if on_step is not None and rows else 0):
            if not on_step(i, [[s[i]] for s in sampled]) and i + 1 < num_steps:  # as the runner: the step in flight
                on_step(i + 1, [[s[i + 1]] for s in sampled])
                steps = i + 2
                break
        self.counters.num_steps += steps
        context = sum(c.num_cached + c.num_new for c in out.chunks)
        seconds = steps * self.cost.seconds(out.num_tokens, context)
        seconds += 2 * self.cost.per_context_token * self.block_size * len(out.copies)
        return StepResult([s[:steps] for s in sampled], seconds, self._score_prompts(out))

    @staticmethod
    def _score_prompts(out: SchedulerOutput) -> dict[int, list[Sampled]]:
        """The step's scored prompt tokens (executor.prompt_positions), each certain."""
        prompt = {}
        for i, chunk in enumerate(out.chunks):
            tokens, top = chunk.group.prompt_token_ids, chunk.group.params.prompt_logprobs
            if positions := prompt_positions(chunk):
                prompt[i] = [Sampled(tokens[p + 1], 0.0, 1, [(tokens[p + 1], 0.0)][:top]) for p in positions]
        return prompt

    def _sample(self, logprobs: int | None, num_steps: int) -> list[Sampled]:
        if not logprobs:
            return [Sampled(0, 0.0, 0, [])] * num_steps
        tokens = []
        for _ in range(num_steps):
            logits = self.rng.normal(0.0, self.logit_spread, logprobs)
            scores = logits - np.log(np.exp(logits).sum())
            top = sorted(enumerate(scores.tolist()), key=lambda t: -t[1])
            tokens.append(Sampled(top[0][0], top[0][1], 1, top))
        return tokens

    def decode_loop_steps(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int) -> int:
        return num_steps

    def warm_up(self, num_scheduler_steps: int, background: bool) -> None:
        """Nothing to compile."""

    def compile_stats(self) -> CompileStats:
        return CompileStats()

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        return True
