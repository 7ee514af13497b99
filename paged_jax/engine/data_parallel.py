"""Data parallelism: D engines on disjoint groups of T devices behind one front.

Each engine is a whole LLMEngine (its own scheduler, allocator, KV cache, tensor-parallel
over its T devices); the front sends each new request to the least-loaded engine and steps
the busy engines together, one thread each, so their devices compute at the same time (a
step spends most of its time in XLA, which releases the GIL). The front is an `EngineClient`
(client.py), so `LLM` and the server drive it as they drive one engine.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from concurrent.futures import ThreadPoolExecutor

import jax

from paged_jax.beam_search import BeamSearchParams
from paged_jax.core.kv_snapshot import KVSnapshot
from paged_jax.engine.client import EngineClient, EngineLoad, PromptType, TokenListener
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.model import hub, sharding
from paged_jax.outputs import RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.spec_decode.proposer import SpecDecodeStats

# stats() entries that add up over engines; the others are per engine, under "engines".
_SUMMED = ("num_blocks", "num_free_blocks", "num_preemptions", "num_steps", "num_device_calls",
           "compiles_after_warmup", "num_swapped_out_blocks", "num_swapped_in_blocks", "num_copied_blocks")


class DataParallelEngine:
    def __init__(self, args: EngineArgs):
        args.validate()
        tp, dp = args.tensor_parallel_size, args.data_parallel_size
        sharding.check_devices(tp, dp)  # each engine checks that its model fits its devices
        if jax.process_count() > 1:
            sharding.check_multi_process(args)
        devices = jax.devices()
        single = dataclasses.replace(args, data_parallel_size=1)
        self.args = args
        self.engines = [LLMEngine(single, devices=devices[i * tp : (i + 1) * tp]) for i in range(dp)]
        first = self.engines[0]
        self.tokenizer, self.vocab_size = first.tokenizer, first.vocab_size
        self.max_model_len, self.max_num_batched_tokens = first.max_model_len, first.max_num_batched_tokens
        self._threads = ThreadPoolExecutor(dp, thread_name_prefix="paged-jax-dp")

    def load(self) -> EngineLoad:
        """Every engine's queues and blocks, summed."""
        return functools.reduce(operator.add, (e.load() for e in self.engines))

    @staticmethod
    def _busyness(engine: LLMEngine) -> tuple[int, int]:
        """(unfinished requests, tokens of their unfinished sequences): the least is the
        least loaded. Counted here, when a request is routed, not in every step's load()."""
        tokens = sum(seq.num_tokens for group in engine.groups.values() for seq in group.seqs if not seq.finished)
        return len(engine.groups), tokens

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None) -> None:
        if any(request_id in e.groups for e in self.engines):
            raise ValueError(f"request_id {request_id!r} is already in use")
        engine = min(self.engines, key=self._busyness)  # ties: the first
        engine.add_request(request_id, prompt, params, arrival_time)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        outputs = [e.abort_request(request_id) for e in self.engines]  # only its own engine holds it
        return next((o for o in outputs if o is not None), None)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines)

    def step(self, on_tokens: TokenListener | None = None) -> list[RequestOutput]:
        """One step of every engine with work, concurrently; their outputs together."""
        busy = [e for e in self.engines if e.has_unfinished_requests()]
        return [o for result in self._threads.map(lambda e: e.step(on_tokens), busy) for o in result]

    def stats(self) -> dict:
        per_engine = [e.stats() for e in self.engines]
        totals = {key: sum(s[key] for s in per_engine) for key in _SUMMED}
        return {**per_engine[0], **totals, **SpecDecodeStats.total(per_engine).as_dict(), "engines": per_engine}

    def kv_snapshot(self) -> KVSnapshot:
        raise ValueError("data_parallel_size > 1: one cache per engine, llm.engine.engines[i].kv_snapshot()")

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        return all(e.wait_for_compiles(timeout) for e in self.engines)


def make_engine(args: EngineArgs) -> EngineClient:
    """The engine the arguments ask for: one, or D behind the data-parallel front. A hub id
    becomes a local directory here, after the settings are checked (a bad one costs no download)."""
    args.validate()
    args = hub.resolve(args)
    return LLMEngine(args) if args.data_parallel_size == 1 else DataParallelEngine(args)
