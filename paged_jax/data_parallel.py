"""Data parallelism: D engines on disjoint groups of T devices behind one front.

Each engine is a whole LLMEngine (its own scheduler, allocator, KV cache, tensor-parallel
over its T devices); the front sends each new request to the least-loaded engine and steps
the busy engines together, one thread each, so their devices compute at the same time (a
step spends most of its time in XLA, which releases the GIL). The front has LLMEngine's
request interface (add_request / step / abort_request / has_unfinished_requests) and the
attributes the server reads, so `LLM` and the server drive it as they drive one engine.
"""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax

from paged_jax import parallel
from paged_jax.engine import EngineArgs, LLMEngine
from paged_jax.loader import read_config
from paged_jax.outputs import RequestOutput

# stats() entries that add up over engines; the others are per engine, under "engines".
_SUMMED = ("num_blocks", "num_free_blocks", "num_preemptions", "num_steps", "num_device_calls",
           "compiles_after_warmup", "num_swapped_out_blocks", "num_swapped_in_blocks", "num_copied_blocks")


class DataParallelEngine:
    def __init__(self, args: EngineArgs):
        args.validate()
        tp, dp = args.tensor_parallel_size, args.data_parallel_size
        parallel.check_sizes(read_config(args.model), tp, dp)
        if jax.process_count() > 1:
            parallel.check_multi_process(args)
        devices = jax.devices()
        single = dataclasses.replace(args, data_parallel_size=1)
        self.args = args
        self.engines = [LLMEngine(single, devices=devices[i * tp : (i + 1) * tp]) for i in range(dp)]
        first = self.engines[0]
        self.model, self.tokenizer, self.eos_token_ids = first.model, first.tokenizer, first.eos_token_ids
        self.max_model_len, self.max_num_batched_tokens = first.max_model_len, first.max_num_batched_tokens
        self._threads = ThreadPoolExecutor(dp, thread_name_prefix="paged-jax-dp")

    @property
    def groups(self) -> collections.ChainMap:
        """Unfinished requests of every engine, by request id."""
        return collections.ChainMap(*(e.groups for e in self.engines))

    @property
    def scheduler(self) -> SimpleNamespace:
        """The queues and counters of every engine's scheduler together (what the server's
        metrics read)."""
        s = [e.scheduler for e in self.engines]
        return SimpleNamespace(
            running=[g for x in s for g in x.running], waiting=[g for x in s for g in x.waiting],
            swapped=[g for x in s for g in x.swapped], num_preemptions=sum(x.num_preemptions for x in s),
            num_prompt_tokens=sum(x.num_prompt_tokens for x in s),
            num_cached_prompt_tokens=sum(x.num_cached_prompt_tokens for x in s))

    @property
    def block_manager(self) -> SimpleNamespace:
        """Blocks of every engine's cache together."""
        managers = [e.block_manager for e in self.engines]
        return SimpleNamespace(num_blocks=sum(m.num_blocks for m in managers),
                               num_free_blocks=sum(m.num_free_blocks for m in managers))

    def load(self, engine: LLMEngine) -> tuple[int, int]:
        """(unfinished requests, tokens of their unfinished sequences): the least is the
        least loaded."""
        tokens = sum(seq.num_tokens for group in engine.groups.values() for seq in group.seqs if not seq.finished)
        return len(engine.groups), tokens

    def add_request(self, request_id: str, prompt, params=None, arrival_time: float | None = None) -> None:
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        engine = min(self.engines, key=self.load)  # ties: the first
        engine.add_request(request_id, prompt, params, arrival_time)

    def abort_request(self, request_id: str) -> None:
        for engine in self.engines:  # only its own engine holds it; the others ignore the id
            engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.engines)

    def step(self) -> list[RequestOutput]:
        """One step of every engine with work, concurrently; their outputs together."""
        busy = [e for e in self.engines if e.has_unfinished_requests()]
        return [o for result in self._threads.map(LLMEngine.step, busy) for o in result]

    def stats(self) -> dict:
        per_engine = [e.stats() for e in self.engines]
        totals = {key: sum(s[key] for s in per_engine) for key in _SUMMED}
        return {**per_engine[0], **totals, "engines": per_engine}

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        return all(e.wait_for_compiles(timeout) for e in self.engines)


def make_engine(args: EngineArgs) -> LLMEngine | DataParallelEngine:
    """The engine the arguments ask for: one, or D behind the data-parallel front."""
    return LLMEngine(args) if args.data_parallel_size == 1 else DataParallelEngine(args)
