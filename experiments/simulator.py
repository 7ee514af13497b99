"""Serving at the paper's scale without its GPU: our scheduler and memory managers (the paged
BlockManager, Orca's reservations, static batching) replayed on a clock whose step times
come from a cost model, with no model computed. Everything the systems decide — admission,
preemption, what each step computes, what the cache holds — is the real code's decision;
only the time a step takes is modelled. One thing the engine does is left out: its multi-step
decode loop (num_scheduler_steps), which grows blocks a few tokens ahead; here every step is
one token. Results from here are labelled simulations.

Parallel samples fork from the prompt as in the engine. A beam search runs the engine's
search rule (BeamSearch) and block operations (continue_beams) on made-up scores: each beam
offers candidates whose log-probabilities are a softmax of normal logits with spread
BEAM_SPREAD. The spread decides how often beams share ancestors, hence how much sharing
saves; it is set so that the saving matches what the paper measured on Alpaca (Fig. 15), and
the simulator reports its own saving next to the paper's.

A step's time is fixed + per_token x tokens computed + per_context_token x K/V tokens read:
reading the weights once per step, the matmuls per token, attention per cached token; a
block copied (a fork without sharing) reads and writes its tokens, 2 x per_context_token each. The
coefficients come from measured step times (CostModel.fit over an engine's step log: real
runs on the machine at hand), or for OPT-13B on an A100 from the roofline of its published
bandwidth and peak (`A100_OPT13B`), as no A100 was measured here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from experiments.serving import ServingRun, serve, system_args
from experiments.workloads import Request
from paged_jax.beam_search import BeamSearchParams
from paged_jax.block_manager import make_block_manager
from paged_jax.engine import StepRecord, beam_request, continue_beams, fork_siblings
from paged_jax.outputs import RequestMetrics
from paged_jax.scheduler import Scheduler, SchedulerConfig
from paged_jax.sequence import Sequence, SequenceGroup

BEAM_SPREAD = 1.0  # std of the made-up logits of a beam's candidates (see the docstring)


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

    def step_seconds(self, record: StepRecord) -> float:
        """A logged step's time on this model (a decode loop of k steps costs k steps)."""
        return record.num_steps * self.seconds(record.num_tokens, record.num_context_tokens)

    def relative_error(self, log: list[StepRecord]) -> float:
        """Mean |predicted - measured| / measured over the steps: how well the form fits."""
        predicted = np.array([self.step_seconds(r) for r in log])
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

    def __init__(self, system: str, requests: list[Request], scale: Scale, cost: CostModel, seed: int = 0):
        config = system_args(system)
        num_blocks = scale.kv_slots // scale.block_size
        manager = config.get("memory_manager", "paged")
        self.blocks = make_block_manager(manager, num_blocks, scale.block_size, scale.max_model_len,
                                         enable_block_sharing=config.get("enable_block_sharing", True))
        self.static = config.get("batching") == "static"
        self.scheduler = Scheduler(SchedulerConfig(scale.max_num_seqs, scale.max_num_batched_tokens,
                                                   batching="static" if self.static else "continuous"), self.blocks)
        self.requests, self.cost, self.records, self.clock = requests, cost, [], 0.0
        self.max_model_len, self.block_size = scale.max_model_len, scale.block_size
        self.rng, self.seq_ids = np.random.default_rng(seed), itertools.count()
        self.blocks_named = self.blocks_used = 0

    def add(self, i: int) -> None:
        request = self.requests[i]
        if request.prompt_len + request.output_len > self.max_model_len:
            raise ValueError(f"request {i} is longer than max_model_len {self.max_model_len}")
        params, beam = request.decoding.params(request.output_len, seed=i), None
        if isinstance(params, BeamSearchParams):
            beam, params = beam_request(params, eos_token_ids=())
        blocks, capacity = self.blocks.footprint(request.prompt_len, request.output_len, params.n)
        if blocks > capacity:
            raise ValueError(f"request {i} needs {blocks} KV blocks, more than the cache holds ({capacity})")
        prompt = [0] * request.prompt_len
        seqs = [self._sequence(prompt, j, born=j == 0) for j in range(1 if beam else params.n)]
        self.scheduler.add(SequenceGroup(str(i), None, prompt, params, seqs,
                                         RequestMetrics(arrival_time=request.arrival_time), beam=beam))

    def _sequence(self, prompt: list[int], index: int, born: bool = True) -> Sequence:
        return Sequence(seq_id=next(self.seq_ids), index=index, prompt_token_ids=prompt,
                        key=np.zeros(2, np.uint32), detokenizer=None, born=born)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> tuple[float, list[tuple[int, float]]]:
        out = self.scheduler.schedule()
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens = chunk.num_cached + chunk.num_new
            chunk.group.metrics.first_scheduled_time = chunk.group.metrics.first_scheduled_time or self.clock + 1e-9
        named, used = self.blocks.blocks_named_and_used(self.scheduler.running)
        self.blocks_named, self.blocks_used = self.blocks_named + named, self.blocks_used + used
        rows = out.sampler_rows()
        beams: dict[int, tuple[SequenceGroup, list[Sequence]]] = {}
        fork_siblings(rows, self.blocks)
        for _, chunk, seq in rows:
            if chunk.group.beam:
                beams.setdefault(id(chunk.group), (chunk.group, []))[1].append(seq)
                continue
            seq.output_token_ids.append(0)
            if len(seq.output_token_ids) >= chunk.group.params.max_tokens:
                seq.finish_reason = "length"
        for group, seqs in beams.values():
            self._beam_step(group, seqs)
        context = sum(c.num_cached + c.num_new for c in out.chunks)
        seconds = 0.0
        if out.chunks or out.copies:
            seconds = (self.cost.seconds(out.num_tokens, context)
                       + 2 * self.cost.per_context_token * self.block_size * len(out.copies))
        self.clock += seconds
        groups = list({id(c.group): c.group for c in out.chunks}.values())
        memory = self.blocks.memory_usage(self.scheduler.running)  # before finished requests free it, as the engine
        finished = [g for g in groups if g.finished]
        for group in groups:
            if group.finished:
                self.scheduler.finish(group)
            else:
                self.scheduler.free_finished_seqs(group)
        self.records.append(StepRecord(len(groups), out.num_tokens, context, 1, seconds, memory,
                                       bool(self.scheduler.waiting)))
        return seconds, [(int(g.request_id), g.metrics.first_scheduled_time) for g in finished]

    def _beam_step(self, group: SequenceGroup, beams: list[Sequence]) -> None:
        """The engine's beam step (engine.LLMEngine._beam_step) on made-up candidate scores."""
        count = group.beam.num_candidates
        logits = self.rng.normal(0.0, BEAM_SPREAD, (len(beams), count))
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        offers = [sorted(enumerate(row.tolist()), key=lambda t: -t[1]) for row in logprobs]
        keep = group.beam.step([(s.output_token_ids, s.cumulative_logprob, top) for s, top in zip(beams, offers)])
        if group.beam.done:
            for seq in beams:
                seq.finish_reason = "length"
            return
        continue_beams(group, beams, keep, self.blocks, lambda parent: self._sequence(parent.prompt_token_ids,
                                                                                       parent.index))

    def log(self) -> list[StepRecord]:
        return self.records

    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def check_no_leaks(self) -> None:
        assert not self.scheduler.has_unfinished()
        self.blocks.check_no_leaks([])

    def sharing_saving(self) -> float:
        """Blocks saved by sharing / blocks the tables name, over the run (Fig. 15), as the
        engine's stats()["block_sharing_saving"]."""
        return 1 - self.blocks_used / self.blocks_named if self.blocks_named else 0.0


def simulate(system: str, requests: list[Request], scale: Scale = Scale(), cost: CostModel = A100_OPT13B) -> ServingRun:
    return serve(SimulatedServer(system, requests, scale, cost), requests)
