"""Serving at the paper's scale without its GPU: our scheduler and memory managers (the paged
BlockManager, Orca's reservations, static batching) replayed on a clock whose step times
come from a cost model, with no model computed. Everything the systems decide — admission,
preemption, what each step computes, what the cache holds — is the real code's decision;
only the time a step takes is modelled. One thing the engine does is left out: its multi-step
decode loop (num_scheduler_steps), which grows blocks a few tokens ahead; here every step is
one token. Results from here are labelled simulations.

A step's time is fixed + per_token x tokens computed + per_context_token x K/V tokens read:
reading the weights once per step, the matmuls per token, attention per cached token. The
coefficients come from measured step times (CostModel.fit over an engine's step log: real
runs on the machine at hand), or for OPT-13B on an A100 from the roofline of its published
bandwidth and peak (`A100_OPT13B`), as no A100 was measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.serving import SYSTEMS, ServingRun, serve
from experiments.workloads import Request
from paged_jax.block_manager import make_block_manager
from paged_jax.engine import StepRecord
from paged_jax.outputs import RequestMetrics
from paged_jax.sampling import SamplingParams
from paged_jax.scheduler import Scheduler, SchedulerConfig
from paged_jax.sequence import Sequence, SequenceGroup


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
        x = np.array([[r.num_steps, r.num_steps * r.num_tokens, r.num_steps * r.num_context_tokens] for r in log], float)
        y = np.array([r.seconds for r in log])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        return cls(*np.maximum(coef, 0.0).tolist(), source=source)

    def relative_error(self, log: list[StepRecord]) -> float:
        """Mean |predicted - measured| / measured over the steps: how well the form fits."""
        predicted = np.array([r.num_steps * self.seconds(r.num_tokens, r.num_context_tokens) for r in log])
        measured = np.array([r.seconds for r in log])
        return float(np.mean(np.abs(predicted - measured) / measured))


# OPT-13B in fp16 on one A100-40GB: 26 GB of weights read per step at 1.555 TB/s; 2 x 13e9
# FLOP per token at half of the 312 TFLOPS peak; 800 KB of K/V per cached token (§6.1).
A100_OPT13B = CostModel(fixed=26e9 / 1.555e12, per_token=2 * 13e9 / (0.5 * 312e12), per_context_token=800e3 / 1.555e12,
                        source="roofline of OPT-13B fp16 on A100-40GB (1.555 TB/s, 50% of 312 TFLOPS)")


@dataclass(frozen=True)
class Scale:
    """The paper's serving setup (§6.1): OPT-13B on one A100-40GB."""

    max_model_len: int = 2048
    kv_slots: int = 15_700
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2560


class SimulatedServer:
    """The scheduler and a memory manager, stepped with made-up tokens and modelled time
    (the interface of serving.EngineServer)."""

    def __init__(self, system: str, requests: list[Request], scale: Scale, cost: CostModel):
        config = SYSTEMS[system]
        num_blocks = scale.kv_slots // scale.block_size
        manager = config.get("memory_manager", "paged")
        self.blocks = make_block_manager(manager, num_blocks, scale.block_size, scale.max_model_len)
        self.static = config.get("batching") == "static"
        self.scheduler = Scheduler(SchedulerConfig(scale.max_num_seqs, scale.max_num_batched_tokens,
                                                   batching="static" if self.static else "continuous"), self.blocks)
        self.requests, self.cost, self.records, self.clock = requests, cost, [], 0.0
        self.max_model_len = scale.max_model_len

    def add(self, i: int) -> None:
        request = self.requests[i]
        if request.prompt_len + request.output_len > self.max_model_len:
            raise ValueError(f"request {i} is longer than max_model_len {self.max_model_len}")
        blocks, capacity = self.blocks.footprint(request.prompt_len, request.output_len, 1)
        if blocks > capacity:
            raise ValueError(f"request {i} needs {blocks} KV blocks, more than the cache holds ({capacity})")
        seq = Sequence(seq_id=i, index=0, prompt_token_ids=[0] * request.prompt_len,
                       key=np.zeros(2, np.uint32), detokenizer=None)
        params = SamplingParams(max_tokens=request.output_len, ignore_eos=True)
        self.scheduler.add(SequenceGroup(str(i), None, seq.prompt_token_ids, params, [seq],
                                         RequestMetrics(arrival_time=request.arrival_time)))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[float, list[tuple[int, float]]]:
        out = self.scheduler.schedule()
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens = chunk.num_cached + chunk.num_new
            chunk.group.metrics.first_scheduled_time = chunk.group.metrics.first_scheduled_time or self.clock + 1e-9
        for _, chunk, seq in out.sampler_rows():
            seq.output_token_ids.append(0)
            if len(seq.output_token_ids) >= chunk.group.params.max_tokens:
                seq.finish_reason = "length"
        context = sum(c.num_cached + c.num_new for c in out.chunks)
        seconds = self.cost.seconds(out.num_tokens, context) if out.chunks else 0.0
        self.clock += seconds
        groups = list({id(c.group): c.group for c in out.chunks}.values())
        memory = self.blocks.memory_usage(self.scheduler.running)  # before finished requests free it, as the engine
        finished = [g for g in groups if g.finished]
        for group in finished:
            self.scheduler.finish(group)
        self.records.append(StepRecord(len(groups), out.num_tokens, context, 1, seconds, memory,
                                       bool(self.scheduler.waiting)))
        return seconds, [(int(g.request_id), g.metrics.first_scheduled_time) for g in finished]

    def log(self) -> list[StepRecord]:
        return self.records

    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def check_no_leaks(self) -> None:
        assert not self.scheduler.has_unfinished()
        self.blocks.check_no_leaks([])


def simulate(system: str, requests: list[Request], scale: Scale = Scale(), cost: CostModel = A100_OPT13B) -> ServingRun:
    return serve(SimulatedServer(system, requests, scale, cost), requests)
