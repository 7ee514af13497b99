"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time (vLLM's online
interface, declared in client.py). `LLM` (llm.py) drives it for offline batches.

A step: the scheduler picks token chunks within the budgets, the executor computes them and
samples where a chunk reaches a sequence's end, and the engine appends the tokens, streams
their text, applies stop conditions and frees the blocks of finished requests. The executor
is the model runner, or for the paper-scale simulator a cost model that computes nothing
(worker/executor.py): the engine decides the same either way once the runner has every
decode-loop variant compiled (as with background_compile=False).

Sharing happens here, between steps: when the prompt of a request with n > 1 is computed,
its n - 1 siblings fork from it (each sampled its first token from the prompt's logits); a
beam search step forks the beams kept more than once and frees those dropped. Full blocks
are offered to the prefix cache as they fill. A request that asked for its prompt's logprobs
gathers them as the chunks of its prompt compute (the executor scores each prompt token once,
even when preemption has the prompt recomputed); its n sequences share them.

Structured outputs (structured_output.py): a request's grammar is compiled when it is added
(once per grammar: the compiler caches), each of its sequences gets a matcher, which masks
its next token in every step it samples and is advanced here with each token appended; the
sequence finishes ("stop") when its grammar terminates. A token the matcher refuses (only
possible when nothing it allows could be sampled: a vocabulary that cannot go on, or
min_tokens banning the stop token of a finished grammar) is not appended and ends the
sequence with "error", as vLLM ends it.

Speculative decoding (speculative_config; spec_decode/): after scheduling, the proposer fills
the lookahead slots with drafts; the step verifies them and returns, per sequence, the drafts
kept and the model's next token, appended here one by one (a stop among them drops the rest).
Then what was rejected is rolled back: the sequence has computed its verified tokens only, and
the blocks that only rejected tokens used go back, before full blocks are offered to the
prefix cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING

import jax

from paged_jax.beam_search import BeamSearchParams, check_beam_width
from paged_jax.core.forks import beam_request, continue_beams, fork_siblings
from paged_jax.core.kv_snapshot import KVSnapshot, take_snapshot
from paged_jax.core.scheduler import SamplerRow, Scheduler, SchedulerConfig, SchedulerOutput
from paged_jax.core.step_record import StepRecord
from paged_jax.engine.client import EngineLoad, PromptType, TokenListener
from paged_jax.engine.output_processor import OutputProcessor
from paged_jax.engine_args import EngineArgs
from paged_jax.kv import make_block_manager
from paged_jax.logger import configure as configure_logging
from paged_jax.outputs import RequestMetrics, RequestOutput
from paged_jax.sampling_params import SamplingParams, request_key
from paged_jax.sequence import Sequence, SequenceGroup
from paged_jax.spec_decode.proposer import SpecDecodeStats, make_proposer
from paged_jax.structured_output import GrammarCompiler, new_matcher
from paged_jax.tokenizer import IncrementalDetokenizer, Tokenizer
from paged_jax.worker.executor import Executor, Sampled
from paged_jax.worker.loading import load_runner

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)
STEP_LOG_LENGTH = 100_000  # engine.step_log keeps the latest steps, between half this and this


class LLMEngine:
    def __init__(self, args: EngineArgs, devices: Seq[jax.Device] | None = None,
                 executor: Executor | None = None):
        """devices: the tensor_parallel_size devices this engine runs on (the data-parallel
        front gives each engine its own); by default the first ones. executor: what computes
        the steps; by default a ModelRunner of args.model (the paper-scale simulator passes a
        CostModelExecutor, and then no model is loaded)."""
        args.validate()
        configure_logging()
        start = time.perf_counter()
        if jax.process_count() > 1:  # every process schedules alike (model/sharding.py): no timing-dependent shapes
            args = dataclasses.replace(args, background_compile=False)
        self.args = args
        on_gpu = jax.default_backend() == "gpu"
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_gpu else 2048)
        tokenizer_dir = Path(args.tokenizer or args.model)
        has_tokenizer = (tokenizer_dir / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if has_tokenizer else None
        self.executor: Executor = executor or load_runner(
            args, devices, self.max_num_batched_tokens, self.tokenizer.eos_token_ids if self.tokenizer else ())
        spec = self.executor.spec
        self.eos_token_ids, self.max_model_len = spec.eos_token_ids, spec.max_model_len
        self.vocab_size = spec.vocab_size
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids) if self.tokenizer else None
        self.block_manager = make_block_manager(
            args.memory_manager, spec.num_blocks, args.block_size, self.max_model_len,
            num_swap_blocks=spec.num_swap_blocks, enable_prefix_caching=args.enable_prefix_caching,
            enable_block_sharing=args.enable_block_sharing, windows=spec.kv_windows)
        speculative = args.speculative()
        k = speculative.num_speculative_tokens if speculative else 0
        self.scheduler = Scheduler(SchedulerConfig(args.max_num_seqs, self.max_num_batched_tokens,
                                                   args.preemption_mode, args.batching, k), self.block_manager)
        self.proposer = speculative and make_proposer(speculative, args, devices, self.executor,
                                                      self.max_num_batched_tokens)
        self.spec_stats = SpecDecodeStats(k)
        if args.warm_up:
            self.executor.warm_up(args.num_scheduler_steps, background=args.background_compile)
            if self.proposer:
                self.proposer.warm_up(background=args.background_compile)
        self.start_up_seconds = time.perf_counter() - start
        compiled = self.executor.compile_stats()
        logger.info("ready in %.1f s: %d step shapes built (%d from the compilation cache), %d more compiling "
                    "in the background", self.start_up_seconds, compiled.built, compiled.from_cache, compiled.pending)
        self.groups: dict[str, SequenceGroup] = {}
        self._seq_ids = itertools.count()
        # The latest steps, for the figures; stats() keeps running sums (a server runs for days).
        self.step_log: list[StepRecord] = []
        self._slots = [0, 0]  # slots holding computed tokens, slots given to requests: summed over steps
        self._sharing = [0, 0]  # blocks the sequences' tables name, physical blocks they use: summed
        self._step_seconds = 0.0

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType,
                    params: SamplingParams | BeamSearchParams | None = None, arrival_time: float | None = None) -> None:
        """Queue a request (sampling, or beam search); a request that can never run raises
        ValueError and changes nothing."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self._prompt(prompt)
        beam = None
        if isinstance(params, BeamSearchParams):
            if self.proposer:
                raise ValueError("beam search does not run with speculative decoding (speculative_config): "
                                 "use an engine without it")
            check_beam_width(params, self.eos_token_ids)
            beam, params = beam_request(params, self.eos_token_ids)
        self._check_logit_bias(params)
        grammar = self._compile_grammar(params)
        if params.n > min(self.args.max_num_seqs, self.max_num_batched_tokens):
            raise ValueError(f"request {request_id!r}: n={params.n} sequences can never be scheduled together "
                             f"(max_num_seqs {self.args.max_num_seqs}, max_num_batched_tokens "
                             f"{self.max_num_batched_tokens})")
        max_tokens = params.max_tokens or max(1, self.max_model_len - len(token_ids))
        if len(token_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds max_model_len {self.max_model_len}")
        blocks, capacity = self.block_manager.footprint(len(token_ids), max_tokens, params.n)
        if blocks > capacity:
            raise ValueError(f"request {request_id!r} needs {blocks} KV blocks at its longest, more than the "
                             f"whole cache holds ({capacity}); lower max_tokens or n, or raise the cache size")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=max_tokens)
        # n > 1: the siblings are born when the prompt is computed, forking from the first.
        # A beam search starts from one beam.
        seqs = [self._new_sequence(token_ids, params, i, born=i == 0, grammar=grammar)
                for i in range(1 if beam else params.n)]
        metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time)
        group = SequenceGroup(request_id, text, token_ids, params, seqs, metrics, beam=beam)
        self.groups[request_id] = group
        self.scheduler.add(group)

    def _new_sequence(self, token_ids: list[int], params: SamplingParams, index: int, born: bool,
                      grammar: xgrammar.CompiledGrammar | None = None) -> Sequence:
        seq_id = next(self._seq_ids)
        seed = _mix(params.seed, index) if params.seed is not None else _mix(self.args.seed, seq_id + 1)
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) \
            if self.tokenizer else None
        return Sequence(seq_id=seq_id, index=index, prompt_token_ids=token_ids, key=request_key(seed),
                        detokenizer=detokenizer, matcher=new_matcher(grammar) if grammar else None, born=born)

    def _check_logit_bias(self, params: SamplingParams) -> None:
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is not in [0, {self.vocab_size})")

    def _compile_grammar(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        """The request's grammar, compiled (ValueError naming the field of a bad spec)."""
        if params.structured_outputs is None:
            return None
        if self.grammars is None:
            raise ValueError("structured_outputs need the model's tokenizer, and none was found")
        return self.grammars.compile(params.structured_outputs)

    def _prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
        return text, ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.scheduler.abort(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            seq.finish_reason = seq.finish_reason or "abort"
        self.groups.pop(request_id, None)
        return group.output()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def load(self) -> EngineLoad:
        s, spec = self.scheduler, self.spec_stats
        return EngineLoad(
            num_running=len(s.running), num_waiting=len(s.waiting), num_swapped=len(s.swapped),
            num_blocks=self.block_manager.num_blocks, num_free_blocks=self.block_manager.num_free_blocks,
            num_preemptions=s.num_preemptions, num_prompt_tokens=s.num_prompt_tokens,
            num_cached_prompt_tokens=s.num_cached_prompt_tokens,
            num_spec_drafts=spec.num_drafts, num_spec_draft_tokens=spec.num_draft_tokens,
            num_spec_accepted_tokens=spec.num_accepted_tokens, spec_accepted_per_pos=tuple(spec.accepted_per_pos))

    # -- stepping ----------------------------------------------------------------------------

    def step(self, on_tokens: TokenListener | None = None) -> list[RequestOutput]:
        """Run one step; outputs of the requests that made progress (finished ones last seen).
        In a decode loop, on_tokens(outputs) is called after each of its steps but the last,
        with the outputs of the requests still running: tokens as they are made, for
        streaming. Returning False ends the loop after the step in flight (say, because new
        requests wait to be scheduled)."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        if self.proposer:
            self.proposer.propose(out)
        rows = out.sampler_rows()
        num_steps, limits = self._decode_steps(out, rows)
        self._record_sharing()
        scheduled = time.time()
        for chunk in out.chunks:
            chunk.group.metrics.first_scheduled_time = chunk.group.metrics.first_scheduled_time or scheduled
        touched: dict[str, SequenceGroup] = {}
        beams: dict[str, list] = {}

        def computed(steps: int) -> None:
            # A decode loop writes K/V up to each row's limit (tokens past it are dropped).
            for i, chunk in enumerate(out.chunks):
                chunk.seq.num_computed_tokens = min(limits[i], chunk.num_cached + steps) if limits \
                    else chunk.num_cached + chunk.num_new

        def on_step(i: int, sampled: list[list[Sampled]]) -> bool:
            """Step i's tokens (per row: one, or with speculation the drafts kept and the
            model's next), while step i + 1 (of a decode loop) computes."""
            now = time.time()
            if i == 0:  # siblings fork from the computed prompt; mid-loop, nothing reads the counts
                computed(1)
                fork_siblings(rows, self.block_manager)
            for (_, chunk, seq), results in zip(rows, sampled):
                group = chunk.group
                touched[group.request_id] = group
                if group.beam:
                    beams.setdefault(group.request_id, []).append((seq, results[0]))
                    continue
                for result in results:
                    if not seq.finished:  # a loop (or a draft) ran past this sequence's stop: drop the rest
                        self.outputs.append(seq, group, result, now)
            running = [g for g in touched.values() if not g.finished]
            if not running:  # every sequence of the loop has stopped: no step is worth running
                return False
            return on_tokens([g.output() for g in running]) if on_tokens and i + 1 < num_steps else True

        executed = self.executor.execute(out, rows, num_steps, limits, on_step)
        for i, scores in executed.prompt_logprobs.items():  # in prompt order, after those scored before
            out.chunks[i].group.prompt_logprobs.extend(map(self.outputs.logprobs_entry, scores))
        num_steps = max(map(len, executed.sampled), default=1) if limits else 1  # the steps it ran
        computed(num_steps)
        self._roll_back(out, rows, executed.sampled)
        now = time.time()
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
            seconds=seconds if executed.seconds is None else executed.seconds, memory=memory,
            waiting=bool(self.scheduler.waiting)))
        if len(self.step_log) > STEP_LOG_LENGTH:
            del self.step_log[: STEP_LOG_LENGTH // 2]
        return outputs

    def _roll_back(self, out: SchedulerOutput, rows: list[SamplerRow], sampled: list[list[Sampled]]) -> None:
        """A sequence that speculated has computed its verified tokens only (the token after
        them is its next input, as after any step); the blocks that only rejected drafts used go
        back, as do those of slots the proposer left empty. Counted for spec_decode stats."""
        if not self.proposer:
            return
        for (_, chunk, seq), tokens in zip(rows, sampled):
            if chunk.draft_token_ids:
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
                self.spec_stats.record(len(chunk.draft_token_ids), len(tokens) - 1)
        self.block_manager.trim([c.seq for c in out.chunks])  # slots of drafts rejected, or never proposed

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

    def _decode_steps(self, out: SchedulerOutput, rows: list[SamplerRow]) -> tuple[int, list[int] | None]:
        """How many decode steps the device may run in one loop, and how many tokens each
        sequence's blocks must hold for it: up to num_scheduler_steps (no more than the
        longest max_tokens left) when only decodes run, none needs penalties or min_tokens
        (their inputs change every token), a logit_bias (its width is not among the loop's
        compiled shapes) or a grammar, the executor has the loop ready and the blocks for the
        extra tokens (never past max_tokens) can be had; else one step.
        A grammar's mask for the next token is known only once the host has advanced its
        matcher with the token before, which a loop samples on the device: so a step with a
        constrained row is a single step, for every row in it. That costs the free rows
        sharing the batch their loop (README: Structured outputs). A draft model follows the
        target step by step (spec_decode/draft_model.py): with one, there are no loops."""
        steps = self.args.num_scheduler_steps
        if self.proposer and self.proposer.follows_every_step:
            steps = 1
        if steps == 1 or not out.chunks or not out.decode_only or out.swap_in or out.swap_out:
            return 1, None
        for chunk in out.chunks:
            params, seq = chunk.group.params, chunk.seq
            if (len(chunk.samplers) != 1 or chunk.group.beam or params.penalised or params.logit_bias
                    or params.structured_outputs or len(seq.output_token_ids) < params.min_tokens
                    or seq.num_tokens - 1 + steps > self.max_model_len):
                return 1, None
        if self.executor.decode_loop_steps(out, rows, steps) == 1:
            return 1, None
        limits = [c.seq.num_computed_tokens + min(steps, c.group.params.max_tokens - len(c.seq.output_token_ids))
                  for c in out.chunks]
        steps = max(limit - c.seq.num_computed_tokens for c, limit in zip(out.chunks, limits))  # none runs past
        if steps == 1 or not self.block_manager.grow([(c.seq, limit) for c, limit in zip(out.chunks, limits)]):
            return 1, None
        assert not self.block_manager.pending_copies, "the scheduler made the written blocks private"
        return steps, limits

    # -- figures -----------------------------------------------------------------------------

    def _record_sharing(self) -> None:
        """Once a step is scheduled: the blocks the tables name against the blocks in use
        (what sharing saves)."""
        named, used = self.block_manager.blocks_named_and_used(self.scheduler.running)
        self._sharing[0] += named
        self._sharing[1] += used

    def stats(self) -> dict:
        counters, compiled = self.executor.counters, self.executor.compile_stats()
        return {
            "num_blocks": self.block_manager.num_blocks,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "block_size": self.args.block_size,
            # What a block's K/V take on the devices in these pages (8-bit ones: about half of bfloat16).
            "kv_cache_dtype": self.args.kv_cache_dtype,
            "kv_cache_bytes_per_block": self.executor.spec.kv_bytes_per_block,
            "num_preemptions": self.scheduler.num_preemptions,
            # Slots holding computed tokens / slots given to requests, over all steps (Fig. 2).
            "kv_utilization": self._slots[0] / self._slots[1] if self._slots[1] else 0.0,
            "num_steps": counters.num_steps,
            "num_device_calls": counters.num_calls,
            "compiles_after_warmup": compiled.after_warm_up,
            "num_swapped_out_blocks": counters.num_swapped_out,
            "num_swapped_in_blocks": counters.num_swapped_in,
            "num_copied_blocks": counters.num_copied,
            # 1 - blocks in use / blocks the tables name, over all steps: what sharing saved.
            "block_sharing_saving": 1 - self._sharing[1] / self._sharing[0] if self._sharing[0] else 0.0,
            "prefix_cache_hit_rate": self.scheduler.num_cached_prompt_tokens / self.scheduler.num_prompt_tokens
            if self.scheduler.num_prompt_tokens else 0.0,
            # Share of step time the host spent not waiting for the device (scheduling,
            # metadata, dispatch, detokenisation): what a faster device could not remove.
            "host_overhead": 1 - counters.device_wait / self._step_seconds if self._step_seconds else 0.0,
            # Start-up: seconds until the engine could serve, step shapes built (and loaded
            # from the persistent compilation cache), shapes still compiling in the background.
            "start_up_seconds": self.start_up_seconds,
            "executables_built": compiled.built,
            "executables_from_cache": compiled.from_cache,
            "executables_pending": compiled.pending,
            "executables_seconds": compiled.seconds,
            **self.spec_stats.as_dict(),
        }

    def kv_snapshot(self) -> KVSnapshot:
        """The paged KV cache as it stands between steps: each block's references and owners,
        each live sequence's block table (core/kv_snapshot.py). Reads; changes nothing."""
        return take_snapshot(self.executor.counters.num_steps, self.scheduler, self.block_manager)

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        """Block until the background compile thread is done (every step shape ready): what
        a benchmark of steady-state speed waits for. False on timeout."""
        return self.executor.wait_for_compiles(timeout)


def _mix(a: int, b: int) -> int:
    """A 64-bit hash of two integers (splitmix64 finaliser): distinct streams per sequence."""
    x = (a * 0x9E3779B97F4A7C15 + b) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return x ^ (x >> 31)
