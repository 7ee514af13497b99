"""Serving at the paper's scale without its GPU: our engine with the cost-model executor
(paged_jax/worker/cost_model.py), which computes nothing and says how long each step would
take. Everything the systems decide — admission, preemption, what each step computes, what the
cache holds, forks and beams, the multi-step decode loop — is the engine's own decision, by the
engine's own code; only the tokens and the time a step takes are made up. Results from here are
labelled simulations.

A beam search runs on made-up scores: each beam offers candidates whose log-probabilities are
a softmax of normal logits with spread BEAM_SPREAD. The spread decides how often beams share
ancestors, hence how much sharing saves; it is set so that the saving matches what the paper
measured on Alpaca (Fig. 15), and the simulator reports its own saving next to the paper's.

The cost model's coefficients come from measured step times (CostModel.fit over an engine's
step log: real runs on the machine at hand), or for OPT-13B on an A100 from the roofline of
its published bandwidth and peak (`A100_OPT13B`), as no A100 was measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.serving import EngineServer, ServingRun, serve, system_args
from experiments.workloads import Request
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.worker.cost_model import CostModel, CostModelExecutor

BEAM_SPREAD = 1.0  # std of the made-up logits of a beam's candidates (see the docstring)
VOCAB_SIZE = 32_000  # the made-up prompts' token ids are drawn below it; nothing depends on them

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
    num_scheduler_steps: int = EngineArgs.num_scheduler_steps  # the engine's decode loop, as it serves


def simulated_engine(system: str, scale: Scale = Scale(), cost: CostModel = A100_OPT13B, seed: int = 0) -> LLMEngine:
    """A system of serving.SYSTEMS (or UNSHARED) at `scale`, stepping on `cost`'s clock."""
    num_blocks = scale.kv_slots // scale.block_size
    args = EngineArgs(model="(simulated)", block_size=scale.block_size, num_gpu_blocks_override=num_blocks,
                      max_model_len=scale.max_model_len, max_num_seqs=scale.max_num_seqs,
                      max_num_batched_tokens=scale.max_num_batched_tokens,
                      num_scheduler_steps=scale.num_scheduler_steps, seed=seed, **system_args(system))
    return LLMEngine(args, executor=CostModelExecutor(args, cost, VOCAB_SIZE, BEAM_SPREAD))


def simulated_server(system: str, requests: list[Request], scale: Scale = Scale(), cost: CostModel = A100_OPT13B,
                     seed: int = 0) -> EngineServer:
    return EngineServer(simulated_engine(system, scale, cost, seed), requests, seed)


def simulate(system: str, requests: list[Request], scale: Scale = Scale(), cost: CostModel = A100_OPT13B) -> ServingRun:
    return serve(simulated_server(system, requests, scale, cost), requests)
