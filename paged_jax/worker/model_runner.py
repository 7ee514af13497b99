"""The model runner: turns a scheduled step into one jitted model call and one sampler call,
or a decode loop into a chain of jitted decode steps.

A decode loop (num_scheduler_steps > 1, decode-only batches) dispatches each step before
the host has read the one before: a step's input tokens are the previous step's output, on
the device. So the device never waits for the host, and the host appends, detokenises and
streams each step's tokens while the next step computes: a streaming client sees a token
per step, not a burst per loop, and the host's work per token overlaps the device's.

Every step is padded to a bucket (buckets.py) so that a small, fixed set of shapes is compiled
ahead of time. The largest of each kind is compiled before serving, the others on a
background thread (compilation.py); a step pads to the smallest ready bucket that fits.
A shape outside the warm-up set is a bug: it is compiled, counted and logged as an error.

With speculative decoding (num_speculative_tokens = k) a step verifies draft tokens: a chunk
with d drafts needs the logits after its last token and after each draft (d + 1 rows), so the
mixed buckets return the logits of up to k + 1 chosen rows per sequence, and the rows that
speculated are sampled by the rejection sampler (rejection_sampler.py), the others as ever.

A step with a chunk whose request asked for its prompt's logprobs needs the logits at every
token, not only at each sequence's last: it runs its bucket's every-token variant. The warm-up
set leaves these out (they would double start-up compile time for what few requests ask), so
one is compiled when a step first needs it, as expected and not counted as a bug; while a
larger one is ready, a better-fitting one compiles on the background thread.

The KV cache lives here, on the device, donated into every step and returned. Swapped-out
blocks live in host memory (numpy), an array per cache array (block_moves.py).
"""

from __future__ import annotations

import itertools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from paged_jax.core.scheduler import SamplerRow, ScheduledChunk, SchedulerOutput
from paged_jax.model import Model, sharding
from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache, layout_of
from paged_jax.worker import block_moves
from paged_jax.worker.buckets import (
    Bucket,
    bucket_of,
    bucket_sizes,
    compile_logit_rows,
    every_token,
    logit_rows_of,
    mixed_buckets,
)
from paged_jax.worker.compilation import Executables
from paged_jax.worker.decode_step import DecodeState, loop_flags, make_decode_step
from paged_jax.worker.executor import (
    CompileStats,
    ExecutorSpec,
    Sampled,
    StepCounters,
    StepListener,
    StepResult,
    prompt_positions,
)
from paged_jax.worker.rejection_sampler import verify
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, empty_batch, sample, score
from paged_jax.worker.sampling_batch import sampler_flags, sampling_batch, verification_batch

logger = logging.getLogger(__name__)
WANT_PADDING = 2.0  # a step padded beyond this wants its own shape compiled next (bucket_for)
LOOP_FLAGS = SamplerFlags(sample=True, filter=False, adjust=False, logprobs=False)  # plain sampling


class ModelRunner:
    def __init__(self, model: Model, *, num_blocks: int, block_size: int, num_swap_blocks: int, page_dtype,
                 kv_bytes_per_block: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...], num_speculative_tokens: int = 0):
        self.model = model
        self.kv_layout = layout_of(model.config)
        self.spec = ExecutorSpec(num_blocks, num_swap_blocks, max_model_len, model.config.vocab_size, eos_token_ids,
                                 self.kv_layout.windows, kv_bytes_per_block)
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_cache = init_kv_cache(model.config, num_blocks, block_size, page_dtype, model.mesh)
        self.swap_space = block_moves.host_swap_space(self.kv_cache, num_swap_blocks)
        self.decode_buckets = [Bucket(s, s, True) for s in bucket_sizes(1, max_num_seqs, halves=True)]
        # Mixed steps pad tokens and sequences apart: a lone prompt in a bucket sized for many
        # sequences pays for their attention tiles and logits rows.
        self.mixed_buckets = mixed_buckets(max_num_seqs, max_num_batched_tokens, num_speculative_tokens)
        self.num_speculative_tokens = num_speculative_tokens
        # Bucket (one forward step) or (Bucket, flags) (a step of a decode loop) -> executable
        self.executables = Executables()
        self.decode_step = make_decode_step(model.module, block_size)
        self.warmed_up = False
        self.compiles_after_warmup = 0
        self.counters = StepCounters()

    # -- shapes ------------------------------------------------------------------------------

    def _fitting(self, num_tokens: int, num_seqs: int, decode: bool) -> list[Bucket]:
        buckets = self.decode_buckets if decode else self.mixed_buckets
        return [b for b in buckets if b.num_seqs >= num_seqs and (decode or b.num_tokens >= num_tokens)]

    def bucket_for(self, num_tokens: int, num_seqs: int, decode: bool, key=lambda bucket: bucket) -> Bucket:
        """The smallest bucket that fits and whose executable (key(bucket)) is ready; the
        smallest that fits when none is ready (then it compiles now: without warm-up only).
        When the ready one is more than WANT_PADDING times the step (in tokens or sequences),
        the smallest that fits is wanted: compiled next, before the shapes nobody wants. Less
        padding than that costs less than the compile, which takes a core from the steps
        (a batch that shrinks as its requests finish would want a shape every few steps)."""
        fitting = self._fitting(num_tokens, num_seqs, decode)
        ready = next((b for b in fitting if key(b) in self.executables), fitting[0])
        if ready != fitting[0] and (ready.num_seqs > WANT_PADDING * num_seqs
                                    or (not decode and ready.num_tokens > WANT_PADDING * num_tokens)):
            self._want(key(fitting[0]))
        return ready

    def _want(self, key) -> None:
        """Compile key next on the background thread, queued first if the warm-up set left it
        out (a rare decode-loop variant, an every-token one). Before warm-up, nothing compiles
        in the background."""
        if self.warmed_up and not self.executables.known(key):
            self.executables.queue([self._task(key)])
        self.executables.want(key)

    def executable(self, key):
        """The compiled device call for key: a Bucket (one forward step) or (Bucket, flags) (a
        step of a decode loop). `execute` gets each executable it calls here, so a wrapper set
        on an instance sees every call's key and arguments (experiments/step_profile.py records
        a run so). Building one here is a compile on the serving path, which after warm-up means the
        warm-up set is incomplete (a bug, counted and logged), unless it is an every-token
        variant, which the warm-up set leaves out on purpose."""
        executable = self.executables.get(key)
        if executable is None:
            if self.warmed_up and not bucket_of(key).every_token:
                self.compiles_after_warmup += 1
                logger.error("compiling step %s after warm-up; the warm-up set is incomplete", key)
            executable = self.executables.build(*self._task(key))
        return executable

    def _inputs(self, chunks: list[SequenceChunk], tokens: np.ndarray, bucket: Bucket):
        positions, meta = build_metadata(
            chunks, self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
            num_tokens=bucket.num_tokens, num_seqs=bucket.num_seqs, max_q_len=bucket.max_q_len,
        )
        padded = np.zeros(bucket.num_tokens, np.int32)
        padded[: len(tokens)] = tokens
        return padded, positions, meta

    def _placeholder_chunk(self) -> SequenceChunk:
        """A one-token chunk in block 0 of every group: the shapes of a step, for compiling it."""
        return SequenceChunk([[0]] * len(self.kv_layout.windows), 0, 1)

    def _task(self, key):
        return self._step_task(key) if isinstance(key, Bucket) else self._decode_task(*key)

    def _step_task(self, bucket: Bucket):
        """How to build a bucket's step: compile the forward pass (from abstract arguments, so
        a background thread never touches the live cache) and warm the common samplers."""
        tokens, positions, meta = self._inputs([self._placeholder_chunk()], np.zeros(1, np.int32), bucket)
        args = (_abstract(self.model.params), tokens, positions, _abstract(self.kv_cache), meta,
                *compile_logit_rows(bucket))
        forward, vocab = self.model.forward, self.model.config.vocab_size

        def make():
            batch = SamplingBatch(**empty_batch(bucket.num_seqs))
            # Placed as the forward pass returns them (replicated over the mesh): jit
            # keys its cache on where arguments live, so a warm-up elsewhere would warm nothing.
            logits = jax.device_put(jnp.zeros((bucket.num_seqs, vocab), jnp.float32),
                                    sharding.replicated(self.model.mesh))
            for flags in (SamplerFlags(False, False, False, False), LOOP_FLAGS):
                sample(logits, batch, flags).tokens.block_until_ready()
            if bucket.num_logits:  # the returned rows: the prompt's scorer, the verifier
                chosen = jax.device_put(jnp.zeros((bucket.num_logits, vocab), jnp.float32),
                                        sharding.replicated(self.model.mesh))
                score(chosen, np.zeros(bucket.num_logits, np.int32)).tokens.block_until_ready()
            if self.num_speculative_tokens and not bucket.decode:
                rows = self._verifier_rows(bucket)
                index, drafts = np.zeros(rows, np.int32), np.full(rows, -1, np.int32)
                for flags in (SamplerFlags(False, False, False, False), LOOP_FLAGS):
                    verify(chosen, index, drafts, SamplingBatch(**empty_batch(rows)), flags)[0].block_until_ready()
            return forward.lower(*args).compile()

        return bucket, make

    def _decode_task(self, bucket: Bucket, flags: SamplerFlags):
        tokens, positions, meta = self._inputs([self._placeholder_chunk()], np.zeros(1, np.int32), bucket)
        batch = SamplingBatch(**empty_batch(bucket.num_seqs))
        args = (_abstract(self.model.params), DecodeState(tokens, positions, meta.context_lens, batch.counters),
                _abstract(self.kv_cache), meta, batch, np.zeros(bucket.num_seqs, np.int32))
        step = self.decode_step
        return (bucket, flags), lambda: step.lower(*args, flags=flags).compile()

    def warm_up(self, num_scheduler_steps: int = 1, background: bool = True) -> None:
        """Make every step shape ready before it is needed: the largest bucket of each kind
        now (with it every step can run, padded), the others now too or, with background,
        on the compile thread while serving (smallest first). The decode loop's plain-sampling
        variant is part of the set when it will be used; its rarer variants (top-k/p,
        logprobs) are queued the first time a step wants them."""
        tasks = []
        for bucket in sorted(self.decode_buckets + self.mixed_buckets, key=lambda b: (b.num_tokens, not b.decode)):
            tasks.append(self._step_task(bucket))
            if bucket.decode and num_scheduler_steps > 1:
                tasks.append(self._decode_task(bucket, LOOP_FLAGS))
        covering = {self.decode_buckets[-1], self.mixed_buckets[-1]}
        now = [t for t in tasks if bucket_of(t[0]) in covering] if background else tasks
        for key, make in tqdm(now, desc="compiling step shapes", unit="shape", leave=False,
                              disable=not logger.isEnabledFor(logging.INFO)):
            self.executables.build(key, make)
        if background:
            self.executables.queue([t for t in tasks if bucket_of(t[0]) not in covering])
        self.warmed_up = True

    def compile_stats(self) -> CompileStats:
        built = self.executables
        return CompileStats(built.built, built.from_cache, built.pending, self.compiles_after_warmup, built.seconds)

    def wait_for_compiles(self, timeout: float | None = None) -> bool:
        return self.executables.wait(timeout)

    # -- one step ----------------------------------------------------------------------------

    def decode_loop_steps(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int) -> int:
        """num_steps when the decode loop this batch needs is ready (or the plain-sampling one,
        always in the warm-up set); else 1, and the loop variant it lacks (top-k/p, logprobs)
        is queued for the compile thread, so a rare variant never waits for a compiler."""
        flags, fitting = loop_flags(sampler_flags(rows)), self._fitting(0, len(out.chunks), True)
        if not self.warmed_up or flags == LOOP_FLAGS or any((b, flags) in self.executables for b in fitting):
            return num_steps
        self._want((fitting[0], flags))
        return 1

    def execute(self, out: SchedulerOutput, rows: list[SamplerRow], num_steps: int = 1,
                limits: list[int] | None = None, on_step: StepListener | None = None) -> StepResult:
        """Executor.execute on the device. A row's tokens past its limit are computed and
        dropped."""
        self.counters.count_moves(out)
        if out.swap_out:
            self.swap_out(out.swap_out)
        if out.swap_in:
            self.swap_in(out.swap_in)
        if out.copies:
            self.kv_cache = block_moves.copy_blocks(self.model.module.backend.copy_blocks, self.kv_cache, out.copies)
        if not out.chunks:
            return StepResult()
        self.executables.used()
        self.counters.num_calls += 1
        chunks = out.chunks
        # One sampling row per chunk (row i = chunk i), unless a prompt fans out to n siblings or
        # the step returns chosen logits rows (prompt logprobs, speculation): then the rows are
        # packed and take their chunk's logits by index.
        fan_out = len(rows) > sum(c.samples for c in chunks)
        flags = sampler_flags(rows) if rows else None
        scored = {i: positions for i, c in enumerate(chunks) if (positions := prompt_positions(c))}
        if num_steps > 1:
            assert out.decode_only and len(rows) == len(chunks) and not fan_out and not scored
            assert not (flags.adjust or flags.mask or flags.bias), "inputs a loop cannot hold (engine._decode_steps)"
            flags = loop_flags(flags)
            bucket = self.bucket_for(out.num_tokens, len(chunks), True, key=lambda b: (b, flags))
        elif scored:
            bucket = every_token(self.bucket_for(out.num_tokens, len(chunks), out.decode_only, key=every_token))
        else:
            bucket = self.bucket_for(out.num_tokens, len(chunks), out.decode_only)
        tokens = np.fromiter(itertools.chain.from_iterable(c.token_ids() for c in chunks), np.int32,
                             count=out.num_tokens)
        tokens, positions, meta = self._inputs(
            [SequenceChunk(c.seq.block_tables, c.num_cached, c.num_new) for c in chunks], tokens, bucket)
        if num_steps > 1:
            placed = [(i, (c, seq)) for i, c, seq in rows]
            batch = sampling_batch(placed, bucket.num_seqs, flags, self.spec)
            limit = np.zeros(bucket.num_seqs, np.int32)
            limit[: len(limits)] = limits
            # The loop's fixed inputs go to the device once, not with every step.
            meta, batch, limit = jax.device_put((meta, batch, limit), sharding.replicated(self.model.mesh))
            state = DecodeState(tokens, positions, meta.context_lens, batch.counters)
            executable, params = self.executable((bucket, flags)), self.model.params

            def step(state: DecodeState, kv_cache):
                return executable(params, state, kv_cache, meta, batch, limit)

            return StepResult(self._decode_loop(step, state, num_steps, placed, on_step))
        chosen, first = logit_rows_of(chunks, bucket)
        logits, self.kv_cache = self.executable(bucket)(self.model.params, tokens, positions, self.kv_cache, meta,
                                                        *chosen)
        self.counters.num_steps += 1
        prompt = self._score_prompts(logits, chunks, scored) if scored else {}
        if not rows:
            return StepResult(prompt_logprobs=prompt)
        drafted = any(c.draft_token_ids for _, c, _ in rows)
        sampled = self._verify(logits, rows, first, bucket, flags) if drafted \
            else [[s] for s in self._sample(logits, rows, first, bucket, fan_out or bool(bucket.num_logits), flags)]
        if on_step is not None:
            on_step(0, sampled)
        return StepResult(sampled, prompt_logprobs=prompt)

    def _sample(self, logits, rows: list[SamplerRow], first: np.ndarray, bucket: Bucket, packed: bool,
                flags: SamplerFlags) -> list[Sampled]:
        """A token per row. Packed: the rows take their chunk's logits by index (a prompt
        that fans out to n siblings, or logits of chosen rows); else row i is chunk i."""
        if packed:
            num_rows = self.bucket_for(0, len(rows), decode=True).num_seqs
            logit_rows = np.zeros(num_rows, np.int32)
            logit_rows[: len(rows)] = [first[i] for i, _, _ in rows]
            logits = _take_rows(logits, logit_rows)
            placed = [(row, (c, seq)) for row, (_, c, seq) in enumerate(rows)]
        else:
            num_rows, placed = bucket.num_seqs, [(i, (c, seq)) for i, c, seq in rows]
        return self._fetch(sample(logits, sampling_batch(placed, num_rows, flags, self.spec), flags), placed)

    def _verifier_rows(self, bucket: Bucket) -> int:
        """The rows the verifier is compiled for in a mixed bucket: k + 1 per sequence (an
        every-token variant returns more logits, and the verifier takes only those it needs)."""
        return min(bucket.num_tokens, bucket.num_seqs * (self.num_speculative_tokens + 1))

    def _verify(self, logits, rows: list[SamplerRow], first: np.ndarray, bucket: Bucket,
                flags: SamplerFlags) -> list[list[Sampled]]:
        """Each row's accepted drafts and the token after them (rejection_sampler.py)."""
        index, drafts, batch, spans = verification_batch(rows, first, self._verifier_rows(bucket), flags, self.spec)
        accepted, result = self._read(verify(logits, index, drafts, batch, flags))
        out, n = [], 0
        for (_, c, _), span in zip(rows, spans):
            kept = next((j for j in range(span - 1) if not accepted[n + j]), span - 1)  # drafts kept
            out.append([self._result(result, n + j, c.group.params.logprobs or 0) for j in range(kept + 1)])
            n += span
        return out

    def _score_prompts(self, logits, chunks: list[ScheduledChunk],
                       scored: dict[int, range]) -> dict[int, list[Sampled]]:
        """From every token's logits, the score of the prompt token after each scored position:
        chunk index -> one per position, with the request's prompt_logprobs top tokens."""
        first = np.cumsum([0] + [c.num_new for c in chunks])  # each chunk's first row
        rows, targets = {}, np.zeros(logits.shape[0], np.int32)
        for i, positions in scored.items():
            start = first[i] - chunks[i].num_cached  # the row position 0 would have
            rows[i] = range(start + positions.start, start + positions.stop)
            next_tokens = chunks[i].group.prompt_token_ids[positions.start + 1 : positions.stop + 1]
            targets[rows[i].start : rows[i].stop] = next_tokens
        result = self._read(score(logits, targets))
        return {i: [self._result(result, row, chunks[i].group.params.prompt_logprobs) for row in rows[i]]
                for i in scored}

    def _decode_loop(self, step, state: DecodeState, num_steps: int, placed, on_step) -> list[list[Sampled]]:
        """A decode loop: up to num_steps decode steps, each dispatched before the host reads
        the one before it. A step's input tokens are the previous step's output, so the
        device never waits for the host, and the host appends, detokenises and streams step
        i's tokens (on_step) while step i + 1 runs. on_step returning False ends the loop
        after the step in flight. Returns the tokens per row, one per step run."""
        in_flight = step(state, self.kv_cache)
        go, rows = True, [[] for _ in placed]
        for i in range(num_steps):
            sampled, state, self.kv_cache = in_flight
            self.counters.num_steps += 1
            in_flight = step(state, self.kv_cache) if go and i + 1 < num_steps else None
            for row, s in zip(rows, self._fetch(sampled, placed)):
                row.append(s)
            go = on_step(i, [[row[-1]] for row in rows]) if on_step is not None else True
            if in_flight is None:
                break
        return rows

    def _fetch(self, sampled, placed) -> list[Sampled]:
        """A step's SamplerOutput, read to the host: one Sampled per placed row."""
        result = self._read(sampled)
        return [self._result(result, row, chunk.group.params.logprobs or 0) for row, (chunk, _) in placed]

    def _read(self, outputs):
        """Device outputs read to the host, the wait counted as the device's."""
        start = time.perf_counter()
        result = jax.device_get(outputs)
        self.counters.device_wait += time.perf_counter() - start
        self.executables.used()
        return result

    @staticmethod
    def _result(result, row: int, k: int) -> Sampled:
        """Row `row` of a SamplerOutput on the host, with its top k tokens."""
        return Sampled(int(result.tokens[row]), float(result.logprobs[row]), int(result.ranks[row]),
                       list(zip(result.top_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist())))

    # -- swapping ----------------------------------------------------------------------------

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """(device block, host block) pairs to host memory (block_moves.py): what `execute` does
        with a step's swap-out list, and what a benchmark of swapping times (experiments/preemption.py)."""
        block_moves.swap_out(self.kv_cache, self.swap_space, pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """(host block, device block) pairs back into the KV cache."""
        self.kv_cache = block_moves.swap_in(self.kv_cache, self.swap_space, pairs)


def _abstract(tree):
    """Shapes, dtypes and shardings (tensor parallel: the executables take the sharded arrays)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@jax.jit
def _take_rows(logits, rows):
    return logits[rows]
