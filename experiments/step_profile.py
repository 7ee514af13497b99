"""Where a run's milliseconds go: every device call of a real engine run is recorded, then
replayed in pieces on the same machine, and set beside the matmul roofline of the same work.

Recording wraps the runner's executable lookup (`ModelRunner.executable`, no change to the
engine): each call's executable and arguments (the KV cache aside). Replaying each call times:

- `device`: the call itself (a forward pass, or a step of a decode loop with its sampler);
- the same call on the same model with attention returning zeros (KV writes kept): the
  difference is attention, the paged gather included;
- `matmuls`: the model's matrix products alone (QKV, output, MLP, LM head) at the bucket's
  token count;
- `matmuls, real tokens`: the same at the call's real token count: the difference is the cost
  of bucket padding, and the sum is the roofline, the time the run's arithmetic needs at
  this machine's matmul speed with nothing else (the schedule's batch sizes kept);
- `sampler`: the jitted sampler at the call's rows (inside a decode loop's step, a separate
  call after a forward pass).
What is left of a call (norms, RoPE, embedding, KV writes) is its null-attention time less
its matmuls and sampler. The pieces of one call are timed back to back, so they share the
machine's load of the moment; they split the run's device time in their proportions. The
host's share (scheduling, input preparation, detokenisation, device-to-host transfers) is the
engine's own measure: the step time it did not spend waiting for the device (in a decode
loop, part of it runs while the device computes the next step, so this is an upper bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import device_slug, markdown_table, report, time_call
from paged_jax import LLM, SamplingParams
from paged_jax.model import CausalLM, Model, make_forward
from paged_jax.model.cache import init_kv_cache
from paged_jax.worker.decode_step import make_decode_step
from paged_jax.worker.model_runner import Bucket, ModelRunner
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, empty_batch, sample

SAMPLING = SamplerFlags(sample=True, filter=False, adjust=False, logprobs=False)  # the benchmark's temperature 1


@dataclasses.dataclass
class Call:
    key: object  # Bucket (one forward step) or (Bucket, flags) (a step of a decode loop)
    args: tuple  # the executable's arguments with the KV cache left out (on the host)

    @property
    def forward(self) -> bool:
        return isinstance(self.key, Bucket)

    @property
    def bucket(self) -> Bucket:
        return self.key if self.forward else self.key[0]

    @property
    def cache_position(self) -> int:
        """Where the KV cache goes in the arguments: forward(params, tokens, positions, cache,
        meta), decode_step(params, state, cache, meta, batch, limit)."""
        return 3 if self.forward else 2

    def with_cache(self, cache) -> tuple:
        i = self.cache_position
        return self.args[:i] + (cache,) + self.args[i:]

    @property
    def meta(self):
        return self.args[self.cache_position]

    @property
    def real_tokens(self) -> int:
        return int(self.meta.cu_q_lens[-1])

    @property
    def real_seqs(self) -> int:
        return int(np.count_nonzero(np.diff(np.asarray(self.meta.cu_q_lens))))


@contextmanager
def recording(runner: ModelRunner):
    """Record runner's device calls while the block runs; yields the list they land in. A
    decode step's state is read to the host before the call (the call donates it)."""
    calls: list[Call] = []
    executable_for = runner.executable

    def recorded(key):
        executable = executable_for(key)

        def call(*args):
            recorded_call = Call(key, ())
            i = recorded_call.cache_position
            recorded_call.args = args[:1] + jax.device_get(args[1:i]) + args[i + 1:]
            calls.append(recorded_call)
            return executable(*args)

        return call

    runner.executable = recorded
    try:
        yield calls
    finally:
        runner.executable = executable_for


def _matmuls(params, x, num_logits: int):
    """The model's matrix products in its order, on x [T, hidden]: what the roofline counts."""
    hidden = x.shape[1]
    for name in sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])):
        attn, mlp = params[name]["attn"], params[name]["mlp"]
        qkv = x @ attn["qkv_proj"]["kernel"]
        x = x + qkv[:, : attn["o_proj"]["kernel"].shape[0]] @ attn["o_proj"]["kernel"]
        up_name, down_name = ("gate_up_proj", "down_proj") if "gate_up_proj" in mlp else ("fc1", "fc2")
        up = x @ mlp[up_name]["kernel"]
        x = x + up[:, : mlp[down_name]["kernel"].shape[0]] @ mlp[down_name]["kernel"]
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed"]["embedding"].T
    return x[:num_logits, :hidden] @ head


def profile(model: Model, runner: ModelRunner, calls: list[Call], wall_seconds: float, host_share: float,
            repeats: int = 3) -> dict:
    """Replay calls piecewise; seconds of the run's wall time per component (module doc)."""
    null_backend = dataclasses.replace(model.module.backend, name="none",
                                       ragged_paged_attention=lambda q, *args, **kwargs: jnp.zeros_like(q))
    null_module = CausalLM(model.config, null_backend, param_dtype=model.dtype)
    real = dict(forward=model.forward, step=runner.decode_step)
    null = dict(forward=make_forward(null_module, model.mesh), step=make_decode_step(null_module, runner.block_size))
    matmuls = jax.jit(_matmuls, static_argnums=2)
    state = {"cache": init_kv_cache(model.config, runner.kv_cache[0][0].shape[1], runner.block_size, model.page_dtype(),
                                   model.mesh)}

    def call_time(functions, call: Call) -> float:
        def run():
            args = call.with_cache(state["cache"])
            if call.forward:
                out, state["cache"] = functions["forward"](*args)
            else:
                out, _, state["cache"] = functions["step"](*args, flags=call.key[1])
            return out
        return time_call(run, repeats=repeats)

    memo: dict = {}

    def measured(key, measure):
        if key not in memo:
            memo[key] = measure()
        return memo[key]

    def matmul_times(bucket: tuple[int, int], real: tuple[int, int]) -> tuple[float, float]:
        """Matmuls at the bucket's and at the real (tokens, rows), timed alternately (their
        difference, the padding, is small beside the machine's drift)."""
        def measure():
            inputs = [(jnp.ones((tokens, model.config.hidden_size), model.dtype), rows)
                      for tokens, rows in (bucket, real)]
            samples = [[time_call(lambda: matmuls(model.params, x, rows), repeats=1) for x, rows in inputs]
                       for _ in range(repeats)]
            return tuple(min(times) for times in zip(*samples))
        return measured(("matmuls", bucket, real), measure)

    def sampler_time(rows: int) -> float:
        def measure():
            batch = SamplingBatch(**empty_batch(rows)).replace(temperature=jnp.ones(rows, jnp.float32))
            logits = jax.random.normal(jax.random.PRNGKey(0), (rows, model.config.vocab_size))
            return time_call(lambda: sample(logits, batch, SAMPLING).tokens, repeats=repeats)
        return measured(("sampler", rows), measure)

    totals = Counter()
    for call in calls:
        bucket = call.bucket
        device, without_attention = call_time(real, call), call_time(null, call)
        sampler = sampler_time(bucket.num_seqs)
        if call.forward:  # the sampler ran as its own call after the step
            device, without_attention = device + sampler, without_attention + sampler
        totals["device"] += device
        totals["attention"] += device - without_attention
        totals["sampler"] += sampler
        padded, unpadded = matmul_times((bucket.num_tokens, bucket.num_seqs), (call.real_tokens, call.real_seqs))
        totals["matmuls_bucket"] += padded
        totals["matmuls_real"] += unpadded
        totals["without_attention"] += without_attention
    scale = wall_seconds * (1 - host_share) / totals["device"]  # replayed seconds -> the run's device seconds
    return dict(
        wall=wall_seconds,
        attention=scale * totals["attention"],
        other_layers=scale * (totals["without_attention"] - totals["matmuls_bucket"] - totals["sampler"]),
        padding=scale * (totals["matmuls_bucket"] - totals["matmuls_real"]),
        roofline=scale * totals["matmuls_real"],
        sampler=scale * totals["sampler"],
        host=wall_seconds * host_share,
        device_calls=len(calls),
        real_tokens=sum(c.real_tokens for c in calls),
        bucket_tokens=sum(c.bucket.num_tokens for c in calls),
    )


def matmul_rate(model: Model, num_tokens: int, repeats: int = 5) -> float:
    """Tokens per second of the model's matmuls alone at num_tokens rows (logits for all)."""
    x = jnp.ones((num_tokens, model.config.hidden_size), model.dtype)
    matmuls = jax.jit(_matmuls, static_argnums=2)
    return num_tokens / time_call(lambda: matmuls(model.params, x, num_tokens), repeats=repeats)


BREAKDOWN = [  # (key, what it is)
    ("roofline", "model matmuls at the real token counts (the roofline of this schedule)"),
    ("padding", "matmuls on bucket padding"),
    ("attention", "attention, paged gather included"),
    ("other_layers", "norms, RoPE, embedding, KV writes"),
    ("sampler", "sampler"),
    ("host", "host: scheduling, input preparation, detokenisation, transfers"),
]


def breakdown_rows(p: dict) -> list[list[str]]:
    return [[what, f"{1e3 * p[key]:.0f}", f"{100 * p[key] / p['wall']:.0f}%"] for key, what in BREAKDOWN]


def main(argv: list[str] | None = None) -> str:
    """Profile a serving-shaped batch: the embedded model on vLLM's random trace (every request
    --input-len random prompt tokens and --output-len greedy output tokens), all requests at
    once, so the decode batch is as large as serving at saturation makes it. Recording reads
    each decode step's state to the host before the call, so the recorded run overlaps less
    than an unrecorded one; the pieces are timed apart from it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", default=str(Path(__file__).parent.parent / "models" / "stdlib-llama"))
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=100)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    llm = LLM(args.model, max_model_len=args.input_len + args.output_len + 1, dtype=args.dtype,
              background_compile=False)
    runner = llm.engine.executor
    rng = np.random.default_rng(0)
    inputs = [{"prompt_token_ids": rng.integers(3, llm.engine.vocab_size, args.input_len).tolist()}
              for _ in range(args.requests)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(inputs, params, use_tqdm=False)  # warm
    with recording(runner) as calls:
        start = time.perf_counter()
        llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    p = profile(runner.model, runner, calls, seconds, llm.stats()["host_overhead"])
    tokens = args.requests * args.output_len
    body = (
        f"Model `{args.model}` ({np.dtype(runner.model.dtype).name}), {args.requests} requests of {args.input_len} "
        f"prompt and {args.output_len} output tokens at once (greedy, ignore_eos), default engine settings: "
        f"{tokens / seconds:.0f} output tok/s while recorded, {1e3 * seconds / tokens:.2f} ms per output token; "
        f"{p['device_calls']} device calls, {p['real_tokens']} tokens in {p['bucket_tokens']} bucket slots.\n\n"
        + markdown_table(["component", "ms", "share of wall"], breakdown_rows(p))
    )
    report(f"step_profile_{device_slug()}", "Where a serving-shaped batch's time goes", body)
    return body


if __name__ == "__main__":
    main()
