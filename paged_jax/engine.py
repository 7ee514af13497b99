"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time (vLLM's online
interface). `LLM` (llm.py) drives it for offline batches.

A step: the scheduler picks token chunks within the budgets, the runner computes them and
samples where a chunk reaches a sequence's end, and the engine appends the tokens, streams
their text, applies stop conditions and frees the blocks of finished requests.

Sharing happens here, between steps: when the prompt of a request with n > 1 is computed,
its n - 1 siblings fork from it (each sampled its first token from the prompt's logits); a
beam search step forks the beams kept more than once and frees those dropped. Full blocks
are offered to the prefix cache as they fill.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from paged_jax import parallel
from paged_jax.beam_search import BeamSearch, BeamSearchParams, Continuation, check_beam_width
from paged_jax.block_manager import BlockManager, make_block_manager
from paged_jax.cache import kv_cache_bytes_per_block
from paged_jax.compilation import configure_persistent_cache
from paged_jax.kv_snapshot import KVSnapshot, take_snapshot
from paged_jax.logger import configure as configure_logging
from paged_jax.loader import read_config
from paged_jax.models import Model, load_model
from paged_jax.outputs import Logprob, RequestMetrics, RequestOutput
from paged_jax.reservation import POLICIES, MemoryUsage
from paged_jax.runner import ModelRunner, Sampled
from paged_jax.sampling import SamplingParams, request_key
from paged_jax.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from paged_jax.sequence import Sequence, SequenceGroup
from paged_jax.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)
CPU_KV_CACHE_BYTES = 1 << 30  # the cache budget where there is no accelerator memory to measure
STEP_LOG_LENGTH = 100_000  # engine.step_log keeps the latest steps, between half this and this
PREEMPTION_MODES = ("recompute", "swap")
MEMORY_MANAGERS = ("paged",) + tuple(f"orca-{policy}" for policy in POLICIES)
BATCHING = ("continuous", "static")


@dataclass(frozen=True)
class EngineArgs:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4  # GiB of host memory for swapped-out blocks
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = False
    # False: a fork copies every block instead of sharing it (what sharing saves is measured
    # against this; outputs are the same).
    enable_block_sharing: bool = True
    preemption_mode: str = "recompute"
    # The paper's baselines run in this engine with only these two changed: "orca-max",
    # "orca-pow2", "orca-oracle" reserve each request's KV contiguously (reservation.py);
    # batching="static" admits a new batch only when the last is done.
    memory_manager: str = "paged"
    batching: str = "continuous"
    seed: int = 0
    attention_backend: str = "auto"
    # T devices run one model (tensor parallelism, parallel.py); D engines on disjoint groups
    # of T devices share the requests (data parallelism, data_parallel.py). vLLM's names.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Decode steps per device loop when only decodes run. 8 measured best of 1 / 4 / 8 on a
    # 2-core CPU (experiments/throughput.py --scheduler-steps 1 4 8): 1.35x the throughput of 1.
    num_scheduler_steps: int = 8
    # Compile the step shapes at start-up (else on first use). With background_compile only
    # the largest of each kind is compiled before serving, the rest on a background thread
    # (steps pad to a ready shape meanwhile); False waits for all of them (steady-state
    # benchmarks). compilation_cache: JAX's persistent cache (paged_jax/compilation.py).
    warm_up: bool = True
    background_compile: bool = True
    compilation_cache: bool = True

    def validate(self) -> None:
        def require(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

        require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
                "must be a power of two")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        require(self.swap_space >= 0, "swap_space", "must be >= 0 GiB")
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                "max_num_batched_tokens", "must be >= 1")
        require(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
                "num_gpu_blocks_override", "must be >= 1")
        require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", f"must be one of {PREEMPTION_MODES}")
        require(self.num_scheduler_steps >= 1, "num_scheduler_steps", "must be >= 1")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        require(self.data_parallel_size >= 1, "data_parallel_size", "must be >= 1")
        require(self.memory_manager in MEMORY_MANAGERS, "memory_manager", f"must be one of {MEMORY_MANAGERS}")
        require(self.batching in BATCHING, "batching", f"must be one of {BATCHING}")
        require(self.memory_manager == "paged" or not (self.enable_prefix_caching or self.preemption_mode == "swap"),
                "memory_manager", "reserves whole requests: no prefix caching, nothing to swap")


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


class LLMEngine:
    def __init__(self, args: EngineArgs, devices=None):
        """devices: the tensor_parallel_size devices this engine runs on (the data-parallel
        front gives each engine its own); by default the first ones."""
        args.validate()
        configure_logging()
        start = time.perf_counter()
        if jax.process_count() > 1:  # every process schedules alike (parallel.py): no timing-dependent shapes
            args = dataclasses.replace(args, background_compile=False)
        self.args = args
        cache_dir = configure_persistent_cache(args.compilation_cache)
        self.mesh = parallel.engine_mesh(args, devices)
        dtype = _compute_dtype(args.dtype, args.model)
        self.model: Model = load_model(args.model, dtype=dtype, attention_backend=args.attention_backend) \
            if self.mesh is None else parallel.load_model(args.model, self.mesh, dtype=dtype,
                                                           attention_backend=args.attention_backend)
        config = self.model.config
        tokenizer_dir = Path(args.tokenizer or args.model)
        self.tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
        self.eos_token_ids = (self.tokenizer.eos_token_ids if self.tokenizer else ()) or config.eos_token_ids
        self.max_model_len = args.max_model_len or config.max_model_len
        if self.max_model_len > config.max_model_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds what the model serves exactly "
                             f"({config.max_model_len}: position table or sliding window)")
        on_gpu = jax.default_backend() == "gpu"
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_gpu else 2048)
        bytes_per_block = kv_cache_bytes_per_block(config, args.block_size, self.model.dtype)
        # Each device holds its share of every block's KV heads: T devices hold ~T times the blocks.
        num_blocks = args.num_gpu_blocks_override or self._num_blocks(bytes_per_block // args.tensor_parallel_size)
        num_swap_blocks = int(args.swap_space * (1 << 30)) // bytes_per_block if args.preemption_mode == "swap" else 0
        self.block_manager = make_block_manager(
            args.memory_manager, num_blocks, args.block_size, self.max_model_len, num_swap_blocks=num_swap_blocks,
            enable_prefix_caching=args.enable_prefix_caching, enable_block_sharing=args.enable_block_sharing)
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, self.max_num_batched_tokens,
                                                   args.preemption_mode, args.batching), self.block_manager)
        self.runner = ModelRunner(
            self.model, num_blocks=num_blocks, block_size=args.block_size, num_swap_blocks=num_swap_blocks,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids)
        logger.info("%s: %s %s, %s attention, max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d",
                    args.model, config.architecture, jnp.dtype(self.model.dtype).name,
                    self.model.module.backend.name, self.max_model_len, args.max_num_seqs, self.max_num_batched_tokens)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), %s memory manager", num_blocks,
                    args.block_size, num_blocks * args.block_size, num_blocks * bytes_per_block / 2**20,
                    args.memory_manager)
        if args.warm_up:
            self.runner.warm_up(args.num_scheduler_steps, background=args.background_compile)
            if isinstance(self.block_manager, BlockManager):
                self.block_manager.device_pool.warm_up(self.runner.max_blocks_per_seq)
        self.start_up_seconds = time.perf_counter() - start
        compiled = self.runner.executables.stats
        logger.info("ready in %.1f s: %d step shapes built (%d from the compilation cache%s), %d more compiling "
                    "in the background", self.start_up_seconds, compiled.compiled, compiled.from_cache,
                    f" {cache_dir}" if cache_dir else ", which is off", self.runner.executables.pending)
        self.groups: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        # The latest steps, for the figures; stats() keeps running sums (a server runs for days).
        self.step_log: list[StepRecord] = []
        self._slots = [0, 0]  # slots holding computed tokens, slots given to requests: summed over steps
        self._sharing = [0, 0]  # blocks the sequences' tables name, physical blocks they use: summed
        self._step_seconds = 0.0

    def _num_blocks(self, bytes_per_block: int) -> int:
        """From free accelerator memory x gpu_memory_utilization, less room for activations;
        on a CPU from a fixed budget. Never more than max_num_seqs full contexts need.
        bytes_per_block and the budget are per device."""
        device = jax.devices()[0] if self.mesh is None else self.mesh.devices.flat[0]
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            c = self.model.config
            activations = 8 * self.max_num_batched_tokens * (4 * c.hidden_size + 2 * c.intermediate_size) * 4
            activations += 3 * self.args.max_num_seqs * c.vocab_size * 4
            budget = stats["bytes_limit"] * self.args.gpu_memory_utilization - stats["bytes_in_use"] - activations
        else:
            budget = CPU_KV_CACHE_BYTES
        useful = self.args.max_num_seqs * -(-self.max_model_len // self.args.block_size) + 1
        return int(max(1, min(budget // bytes_per_block, useful)))

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | dict | list[int],
                    params: SamplingParams | BeamSearchParams | None = None, arrival_time: float | None = None) -> None:
        """Queue a request (sampling, or beam search); a request that can never run raises
        ValueError and changes nothing."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._prompt(prompt)
        beam = None
        if isinstance(params, BeamSearchParams):
            check_beam_width(params, self.eos_token_ids)
            beam, params = beam_request(params, self.eos_token_ids)
        if params.n > min(self.args.max_num_seqs, self.max_num_batched_tokens):
            raise ValueError(f"request {request_id!r}: n={params.n} sequences can never be scheduled together "
                             f"(max_num_seqs {self.args.max_num_seqs}, max_num_batched_tokens "
                             f"{self.max_num_batched_tokens})")
        max_tokens = params.max_tokens or max(1, self.max_model_len - len(token_ids))
        if len(token_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds max_model_len {self.max_model_len}")
        try:
            blocks, capacity = self.block_manager.footprint(len(token_ids), max_tokens, params.n)
        except ValueError as e:
            raise ValueError(f"request {request_id!r}: {e}") from None
        if blocks > capacity:
            raise ValueError(f"request {request_id!r} needs {blocks} KV blocks at its longest, more than the "
                             f"whole cache holds ({capacity}); lower max_tokens or n, or raise the cache size")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        # n > 1: the siblings are born when the prompt is computed, forking from the first.
        # A beam search starts from one beam.
        seqs = [self._new_sequence(token_ids, params, i, born=i == 0) for i in range(1 if beam else params.n)]
        group = SequenceGroup(request_id, text, token_ids, params, seqs,
                              RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time), beam=beam)
        self.groups[request_id] = group
        self.scheduler.add(group)

    def _new_sequence(self, token_ids: list[int], params: SamplingParams, index: int, born: bool) -> Sequence:
        seq_id = next(self._seq_ids)
        seed = _mix(params.seed, index) if params.seed is not None else _mix(self.args.seed, seq_id + 1)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) \
            if self.tokenizer else None
        return Sequence(seq_id=seq_id, index=index, prompt_token_ids=token_ids, key=request_key(seed),
                        detokenizer=detokenizer, born=born)

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError("a prompt dict needs 'prompt_token_ids'")
            text, ids = prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; none was found (pass prompt_token_ids)")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            raise ValueError(f"a prompt is a str or a {{'prompt_token_ids': [...]}} dict, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return text, ids

    def abort_request(self, request_id: str) -> None:
        group = self.scheduler.abort(request_id)
        if group is not None:
            for seq in group.seqs:
                seq.finish_reason = seq.finish_reason or "abort"
            self.groups.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; outputs of the requests that made progress (finished ones last seen)."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        num_steps, limits = self._decode_steps(out)
        self._record_sharing()
        rows = out.sampler_rows()
        scheduled = time.time()
        results = self.runner.execute(out, rows, num_steps, limits)
        num_steps = len(results[0]) if results else 1  # a decode loop not compiled yet runs one step
        now = time.time()
        touched: dict[str, SequenceGroup] = {}
        for i, chunk in enumerate(out.chunks):
            # A decode loop writes K/V up to each row's limit (tokens past it are dropped).
            chunk.seq.num_computed_tokens = min(limits[i], chunk.num_cached + num_steps) if limits \
                else chunk.num_cached + chunk.num_new
            chunk.group.metrics.first_scheduled_time = chunk.group.metrics.first_scheduled_time or scheduled
        fork_siblings(rows, self.block_manager)
        beams: dict[str, list] = {}
        for (_, chunk, seq), sampled in zip(rows, results):
            group = chunk.group
            touched[group.request_id] = group
            if group.beam:
                beams.setdefault(group.request_id, []).append((seq, sampled[0]))
                continue
            for result in sampled:
                if seq.finished:  # a multi-step loop ran past this sequence's stop: drop the rest
                    break
                self._append(seq, group, result, now)
        for request_id, choices in beams.items():
            group = self.groups[request_id]
            assert len(choices) == len(group.active), "the beams of a group sample together"
            self._beam_step(group, choices, now)
        self.block_manager.cache_full_blocks([c.seq for c in out.chunks])
        memory = self.block_manager.memory_usage(self.scheduler.running)
        self._slots[0] += memory.token_states
        self._slots[1] += memory.total - memory.free
        outputs = []
        for group in touched.values():
            if group.finished:
                group.metrics.finished_time = now
                self.scheduler.finish(group)
                self.groups.pop(group.request_id, None)
            else:
                self.scheduler.free_finished_seqs(group)
            outputs.append(group.output())
        seconds = time.perf_counter() - start
        self._step_seconds += seconds
        self.step_log.append(StepRecord(
            num_requests=len({id(c.group) for c in out.chunks}), num_tokens=out.num_tokens,
            num_context_tokens=sum(c.num_cached + c.num_new for c in out.chunks), num_steps=num_steps,
            seconds=seconds, memory=memory, waiting=bool(self.scheduler.waiting)))
        if len(self.step_log) > STEP_LOG_LENGTH:
            del self.step_log[: STEP_LOG_LENGTH // 2]
        return outputs

    def _beam_step(self, group: SequenceGroup, choices: list[tuple[Sequence, Sampled]], now: float) -> None:
        """One step of a beam search: keep the best continuations; a beam kept k times forks
        k - 1 children, a beam not kept is freed."""
        beams = [seq for seq, _ in choices]
        keep = group.beam.step([(s.output_token_ids, s.cumulative_logprob, r.top) for s, r in choices])
        group.metrics.first_token_time = group.metrics.first_token_time or now
        group.metrics.last_token_time = now
        if group.beam.done:
            for h in group.beam.hypotheses:
                shown = h.token_ids if group.beam.params.include_stop_str_in_output or h.finish_reason == "length" \
                    else h.token_ids[:-1]
                h.text = self.tokenizer.decode(shown) if self.tokenizer else ""
            for seq in beams:
                seq.finish_reason = "length"
            return
        def fork_of(parent: Sequence) -> Sequence:
            return self._new_sequence(parent.prompt_token_ids, group.params, parent.index, born=True)

        continue_beams(group, beams, keep, self.block_manager, fork_of)

    def _decode_steps(self, out) -> tuple[int, list[int] | None]:
        """How many decode steps the device may run in one loop, and how many tokens each
        sequence's blocks must hold for it: num_scheduler_steps when only decodes run, none
        needs penalties or min_tokens (their inputs change every token) and the blocks for
        the extra tokens (never past max_tokens) can be had; else one step."""
        steps = self.args.num_scheduler_steps
        if steps == 1 or not out.chunks or not out.decode_only or out.swap_in or out.swap_out:
            return 1, None
        for chunk in out.chunks:
            params, seq = chunk.group.params, chunk.seq
            if (len(chunk.samplers) != 1 or chunk.group.beam or params.penalised or len(seq.output_token_ids) < params.min_tokens
                    or seq.num_tokens - 1 + steps > self.max_model_len):
                return 1, None
        limits = [c.seq.num_computed_tokens + min(steps, c.group.params.max_tokens - len(c.seq.output_token_ids))
                  for c in out.chunks]
        if not self.block_manager.grow([(c.seq, limit) for c, limit in zip(out.chunks, limits)]):
            return 1, None
        assert not self.block_manager.pending_copies, "the scheduler made the written blocks private"
        return steps, limits

    def _append(self, seq: Sequence, group: SequenceGroup, sampled: Sampled, now: float) -> None:
        params = group.params
        token = sampled.token
        seq.output_token_ids.append(token)
        group.metrics.first_token_time = group.metrics.first_token_time or now
        group.metrics.last_token_time = now
        if params.logprobs is not None:
            seq.cumulative_logprob += sampled.logprob
            entry = {token: Logprob(sampled.logprob, sampled.rank, self._decode(token))}
            for rank, (top_token, logprob) in enumerate(sampled.top, start=1):
                entry.setdefault(top_token, Logprob(logprob, rank, self._decode(top_token)))
            seq.logprobs.append(entry)
        delta = seq.detokenizer.add([token]) if seq.detokenizer else ""
        seq.text += delta
        self._check_stop(seq, params, token, delta)

    def _decode(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else None

    def _check_stop(self, seq: Sequence, params: SamplingParams, token: int, delta: str) -> None:
        num_output = len(seq.output_token_ids)
        if num_output >= params.min_tokens:
            stop_token = token in params.stop_token_ids
            if stop_token or (token in self.eos_token_ids and not params.ignore_eos):
                if not params.include_stop_str_in_output:  # a stop token's text is not emitted
                    seq.text = seq.text[: len(seq.text) - len(delta)]
                seq.finish_reason, seq.stop_reason = "stop", token if stop_token else None
                return
            for stop in params.stop_strings:
                start = max(0, len(seq.text) - len(delta) - len(stop) + 1)
                found = seq.text.find(stop, start)
                if found >= 0:
                    seq.text = seq.text[: found + (len(stop) if params.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if num_output >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    # -- figures -----------------------------------------------------------------------------

    def _record_sharing(self) -> None:
        """Once a step is scheduled: the blocks the tables name against the blocks in use
        (what sharing saves)."""
        named, used = self.block_manager.blocks_named_and_used(self.scheduler.running)
        self._sharing[0] += named
        self._sharing[1] += used

    def stats(self) -> dict:
        return {
            "num_blocks": self.block_manager.num_blocks,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "block_size": self.args.block_size,
            "num_preemptions": self.scheduler.num_preemptions,
            # Slots holding computed tokens / slots given to requests, over all steps (Fig. 2).
            "kv_utilization": self._slots[0] / self._slots[1] if self._slots[1] else 0.0,
            "num_steps": self.runner.num_steps,
            "num_device_calls": self.runner.num_calls,
            "compiles_after_warmup": self.runner.compiles_after_warmup,
            "num_swapped_out_blocks": self.runner.num_swapped_out,
            "num_swapped_in_blocks": self.runner.num_swapped_in,
            "num_copied_blocks": self.runner.num_copied,
            # 1 - blocks in use / blocks the tables name, over all steps: what sharing saved.
            "block_sharing_saving": 1 - self._sharing[1] / self._sharing[0] if self._sharing[0] else 0.0,
            "prefix_cache_hit_rate": self.scheduler.num_cached_prompt_tokens / self.scheduler.num_prompt_tokens
            if self.scheduler.num_prompt_tokens else 0.0,
            # Share of step time the host spent not waiting for the device (scheduling,
            # metadata, dispatch, detokenisation): what a faster device could not remove.
            "host_overhead": 1 - self.runner.device_wait / self._step_seconds if self._step_seconds else 0.0,
            # Start-up: seconds until the engine could serve, step shapes built (and loaded
            # from the persistent compilation cache), shapes still compiling in the background.
            "start_up_seconds": self.start_up_seconds,
            "executables_built": self.runner.executables.stats.compiled,
            "executables_from_cache": self.runner.executables.stats.from_cache,
            "executables_pending": self.runner.executables.pending,
        }

    def kv_snapshot(self) -> KVSnapshot:
        """The paged KV cache as it stands between steps: each block's references and owners,
        each live sequence's block table (kv_snapshot.py). Reads; changes nothing."""
        return take_snapshot(self.runner.num_steps, self.scheduler, self.block_manager)

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        """Block until the background compile thread is done (every step shape ready): what
        a benchmark of steady-state speed waits for. False on timeout."""
        return self.runner.executables.wait(timeout)


def _compute_dtype(dtype: str, model: str) -> str:
    """`auto` is the checkpoint's dtype, except half precision on a CPU, where it is float32:
    XLA's CPU matmuls emulate bfloat16 (the embedded bfloat16 model decodes 3x slower in it than
    in float32 on 2 cores), and float32 holds half-precision weights exactly."""
    if dtype != "auto" or jax.default_backend() != "cpu":
        return dtype
    stored = read_config(model).dtype
    if stored in ("bfloat16", "float16"):
        logger.info("computing in float32 on the CPU (the checkpoint stores %s; pass dtype=%r to keep it)",
                    stored, stored)
        return "float32"
    return dtype


def _mix(a: int, b: int) -> int:
    """A 64-bit hash of two integers (splitmix64 finaliser): distinct streams per sequence."""
    x = (a * 0x9E3779B97F4A7C15 + b) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return x ^ (x >> 31)


def beam_request(params: BeamSearchParams, eos_token_ids: tuple[int, ...]) -> tuple[BeamSearch, SamplingParams]:
    """A beam search's state, and the sampling its beams run: greedy rows whose top logprobs
    offer the candidates, n = beam_width sequences at most."""
    beam = BeamSearch(params, eos_token_ids)
    return beam, SamplingParams(n=params.beam_width, temperature=0.0, max_tokens=params.max_tokens,
                                ignore_eos=params.ignore_eos, logprobs=beam.num_candidates)


def fork_siblings(rows: list[tuple[int, ScheduledChunk, Sequence]], blocks) -> None:
    """A request's siblings fork from its first sequence once the prompt is computed (the
    sampler rows whose sequence is not the chunk's own)."""
    for _, chunk, seq in rows:
        if seq is not chunk.seq:
            blocks.fork(chunk.seq, seq)
            seq.born = True


def continue_beams(group: SequenceGroup, beams: list[Sequence], keep: list[Continuation], blocks,
                   new_sequence: Callable[[Sequence], Sequence]) -> None:
    """Make the kept continuations the group's beams. Beams not kept are freed first, so a
    fork never needs more memory than the step held (a dropped beam's blocks, or its Orca
    reservation, make room for the copy that replaces it); then a beam kept k times forks
    k - 1 children from its state before this step's token, and each appends its token."""
    parents = {c.parent for c in keep}
    blocks.free([beam for i, beam in enumerate(beams) if i not in parents])
    kept, seen = [], set()
    for c in keep:
        seq = beams[c.parent]
        if c.parent in seen:
            child = new_sequence(seq)
            child.output_token_ids = list(seq.output_token_ids)
            blocks.fork(seq, child)
            seq = child
        seen.add(c.parent)
        kept.append(seq)
    group.seqs = kept
    for seq, c in zip(kept, keep):
        seq.output_token_ids.append(c.token)
        seq.cumulative_logprob = c.cum_logprob
