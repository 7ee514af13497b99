"""Online serving of a request trace, the measurement behind the paper's serving figures
(Fig. 2, 12, 13, 18b).

Requests arrive on a clock at their trace times; the engine steps whenever it has work. The
clock advances by each step's measured wall time, and jumps to the next arrival when the
engine is idle: a real execution whose idle gaps are skipped, so a one-minute trace at a low
rate does not take a minute. A request's latency is its finish time minus its arrival time
(under static batching, the finish time of its whole batch: that is when `generate`
returns). Normalized latency is the mean over requests of latency / output length, the
paper's y-axis.

The systems differ only in memory manager and scheduler (EngineArgs.memory_manager and
.batching); they run the same model code. Scale: the model's context is max_model_len
tokens; trace lengths and the KV cache are scaled from the paper's OPT-13B on an A100 (2048
tokens, 15.7K KV slots) by max_model_len / 2048, so requests compete for memory as they did
there.
"""

from __future__ import annotations

import functools
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from experiments.common import random_llama_checkpoint
from experiments.workloads import Request, prompt_token_ids
from paged_jax.core.step_record import StepRecord
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.kv.interface import kv_utilization

DEFAULT_MODEL = Path(__file__).parent.parent / "models" / "stdlib-llama"
PAPER_KV_SLOTS = 15_700  # OPT-13B on one A100-40GB (§6.1, Table 1)
PAPER_CONTEXT = 2048

# name -> the EngineArgs that make the system (FasterTransformer: static batches reserving the
# maximum length for each request, as its preallocated cache does)
SYSTEMS = {
    "paged-jax": {},
    "orca-oracle": dict(memory_manager="orca-oracle"),
    "orca-pow2": dict(memory_manager="orca-pow2"),
    "orca-max": dict(memory_manager="orca-max"),
    "static": dict(memory_manager="orca-max", batching="static"),
}

# Our engine with block sharing off, the ablation of Fig. 14: a forked sequence copies its
# parent's blocks instead of sharing them.
UNSHARED = {"paged-jax-unshared": dict(enable_block_sharing=False)}


def system_args(system: str) -> dict:
    """The EngineArgs that make a system of SYSTEMS or UNSHARED."""
    return {**SYSTEMS, **UNSHARED}[system]


@dataclass(frozen=True)
class Setup:
    """What every serving run shares: the model, its context, the cache and the budgets."""

    model: str = str(DEFAULT_MODEL)
    max_model_len: int = 256
    block_size: int = 2  # 16 at the paper's scale
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512

    @property
    def scale(self) -> float:
        return self.max_model_len / PAPER_CONTEXT

    @property
    def num_blocks(self) -> int:
        return int(PAPER_KV_SLOTS * self.scale) // self.block_size


@functools.cache
def default_setup() -> Setup:
    """The embedded model on a CPU. On a GPU, a ~1B-parameter random Llama (the throughput
    benchmark's GPU shape) at the paper's own context, block size and KV slots."""
    if jax.default_backend() != "gpu":
        return Setup()
    from experiments.throughput import GPU

    directory = Path(tempfile.mkdtemp(prefix="paged-jax-serving-"))
    random_llama_checkpoint(GPU["model"], directory, GPU["dtype"])
    return Setup(model=str(directory), max_model_len=PAPER_CONTEXT, block_size=16, max_num_seqs=256,
                 max_num_batched_tokens=4096)


def make_engine(system: str, setup: Setup, **overrides) -> LLMEngine:
    """The system's engine, every step shape compiled before it serves a timed trace (they
    come from the persistent compilation cache after the first engine)."""
    args = dict(model=setup.model, max_model_len=setup.max_model_len, block_size=setup.block_size,
                num_gpu_blocks_override=setup.num_blocks, max_num_seqs=setup.max_num_seqs,
                max_num_batched_tokens=setup.max_num_batched_tokens, seed=0, background_compile=False)
    return LLMEngine(EngineArgs(**{**args, **system_args(system), **overrides}))


@dataclass
class ServingRun:
    normalized_latency: float  # mean of latency / output tokens, s/token
    mean_latency: float
    mean_batch_size: float  # running requests per step
    throughput: float  # requests / s of clock time
    steady_throughput: float  # requests / s between the 10th and the 90th percentile finish
    duration: float  # clock seconds from the first arrival to the last finish
    memory: dict[str, float]  # share of the cache by use, averaged over the steps requests waited
    kv_utilization: float  # slots holding tokens / slots given to requests, over all steps
    num_preemptions: int


class EngineServer:
    """Real execution: our engine serving the trace, each step timed on the wall clock, or
    with clock (a StepRecord -> seconds function, e.g. a cost model fitted to this machine) on
    a modelled one: the engine still decides and computes every step, but what a step costs no
    longer depends on what else the machine was running: with the same model, a run repeats
    exactly."""

    def __init__(self, engine: LLMEngine, requests: list[Request], seed: int = 0,
                 clock: Callable[[StepRecord], float] | None = None):
        self.engine, self.requests, self.clock = engine, requests, clock
        self.prompts = prompt_token_ids(requests, engine.vocab_size, seed)
        self.first_log, self.first_preemptions = len(engine.step_log), engine.load().num_preemptions
        self.static = engine.args.batching == "static"

    def add(self, i: int) -> None:
        request = self.requests[i]
        params = request.decoding.params(request.output_len, seed=i)
        self.engine.add_request(str(i), {"prompt_token_ids": self.prompts[i]}, params,
                                arrival_time=request.arrival_time)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> tuple[float, list[tuple[int, float]]]:
        """Seconds the step took (as the engine timed it, or on the modelled clock); (request,
        when its batch started) for each that finished."""
        outputs = self.engine.step()
        record = self.engine.step_log[-1]
        return (self.clock(record) if self.clock else record.seconds), [
            (int(o.request_id), o.metrics.first_scheduled_time) for o in outputs if o.finished]

    def log(self) -> list[StepRecord]:
        return self.engine.step_log[self.first_log:]

    def num_preemptions(self) -> int:
        return self.engine.load().num_preemptions - self.first_preemptions

    def check_no_leaks(self) -> None:
        assert not self.engine.has_unfinished_requests()
        self.engine.block_manager.check_no_leaks([])

    def sharing_saving(self) -> float:
        """Blocks saved by sharing / blocks the tables name, over the engine's life (Fig. 15)."""
        return self.engine.stats()["block_sharing_saving"]


def serve(server, requests: list[Request]) -> ServingRun:
    """Serve the trace to completion on the clock described above. server: an EngineServer
    (the simulator's is one too, experiments/simulator.py)."""
    pending = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival_time))
    finish, batch_of = {}, {}
    clock = requests[pending[0]].arrival_time
    while pending or server.has_unfinished():
        while pending and requests[pending[0]].arrival_time <= clock:
            server.add(pending.popleft())
        if not server.has_unfinished():
            clock = requests[pending[0]].arrival_time
            continue
        seconds, finished = server.step()
        clock += seconds
        for i, batch in finished:
            finish[i], batch_of[i] = clock, batch
    server.check_no_leaks()
    if server.static:  # a request returns with its batch
        batch_end = {}
        for i, batch in batch_of.items():
            batch_end[batch] = max(finish[i], batch_end.get(batch, 0.0))
        finish = {i: batch_end[batch_of[i]] for i in finish}
    latency = np.array([finish[i] - r.arrival_time for i, r in enumerate(requests)])
    output_len = np.array([r.output_len for r in requests])
    duration = max(finish.values()) - min(r.arrival_time for r in requests)
    log = server.log()
    return ServingRun(
        normalized_latency=float(np.mean(latency / output_len)),
        mean_latency=float(latency.mean()),
        mean_batch_size=sum(r.num_requests * r.num_steps for r in log) / sum(r.num_steps for r in log),
        throughput=len(requests) / duration,
        steady_throughput=steady_throughput(sorted(finish.values())),
        duration=duration,
        memory=memory_shares(log),
        kv_utilization=kv_utilization([r.memory for r in log]),
        num_preemptions=server.num_preemptions(),
    )


def steady_throughput(finish_times: list[float]) -> float:
    """Requests finished per second between the 10th and the 90th percentile finish: with
    every request queued from the start, a system's capacity (the rate its latency blows up
    at), without the ramp-up and the drain of a finite trace."""
    first, last = int(0.1 * len(finish_times)), int(0.9 * len(finish_times))
    span = finish_times[last] - finish_times[first]
    return (last - first) / span if span > 0 else float("inf")


def memory_shares(log: list[StepRecord]) -> dict[str, float]:
    """Fig. 2's breakdown as shares of the whole cache, averaged over the steps after which a
    request was waiting: then memory is the constraint and free space is waste too (counted
    with external fragmentation, as the paper's "external frag. & other")."""
    busy = [r.memory for r in log if r.waiting] or [r.memory for r in log]
    if not busy:
        return {}
    total = sum(u.total for u in busy)
    return {
        "token_states": sum(u.token_states for u in busy) / total,
        "reserved": sum(u.reserved for u in busy) / total,
        "internal": sum(u.internal for u in busy) / total,
        "external_and_free": sum(u.external + u.free for u in busy) / total,
    }
