"""Where a run's milliseconds go: every device call of a real engine run is recorded, then
replayed in pieces on the same machine, and set beside the matmul roofline of the same work.

Recording wraps the runner's input builder (no change to the engine): each call's bucket,
token ids, positions, attention metadata and number of decode steps. Replaying each call
(a decode loop of k steps counts as k single steps at the same shapes) times:

- `forward`: the engine's own compiled forward pass at the call's bucket;
- `forward, attention skipped`: the same model with attention returning zeros (KV writes kept):
  forward minus this is attention, the paged gather included;
- `matmuls`: the model's matrix products alone (QKV, output, MLP, LM head) at the bucket's
  token count; the null-attention forward minus this is the rest (norms, RoPE, embedding, KV
  writes);
- `matmuls, real tokens`: the same at the call's real token count: the difference is the cost
  of bucket padding, and the sum is the roofline, the time the run's arithmetic needs at
  this machine's matmul speed with nothing else (the schedule's batch sizes kept);
- `sampler`: the jitted sampler at the bucket's rows.

The engine's wall time minus the replayed device time is host work (scheduling, input
preparation, detokenisation) plus device-to-host transfers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import time_call
from paged_jax.cache import init_kv_cache
from paged_jax.models import CausalLM, Model, make_forward
from paged_jax.runner import ModelRunner, _empty_batch
from paged_jax.sampling import SamplerFlags, SamplingBatch, sample

SAMPLING = SamplerFlags(sample=True, filter=False, adjust=False, logprobs=False)  # the benchmark's temperature 1


@dataclasses.dataclass
class Call:
    bucket_tokens: int
    bucket_seqs: int
    real_tokens: int
    real_seqs: int
    decode: bool
    tokens: np.ndarray
    positions: np.ndarray
    meta: object
    steps: int = 1


@contextmanager
def recording(runner: ModelRunner):
    """Record runner's device calls while the block runs; yields the list they land in."""
    calls: list[Call] = []
    inputs, execute = runner._inputs, runner.execute

    def record_inputs(chunks, tokens, bucket):
        padded, positions, meta = inputs(chunks, tokens, bucket)
        calls.append(Call(bucket.num_tokens, bucket.num_seqs, len(tokens), len(chunks), bucket.decode,
                          padded, positions, meta))
        return padded, positions, meta

    def record_execute(out, rows, num_steps=1, limits=None):
        before = len(calls)
        results = execute(out, rows, num_steps, limits)
        if len(calls) > before and results:
            calls[-1].steps = len(results[0])
        return results

    runner._inputs, runner.execute = record_inputs, record_execute
    try:
        yield calls
    finally:
        runner._inputs, runner.execute = inputs, execute


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


def profile(model: Model, runner: ModelRunner, calls: list[Call], wall_seconds: float, repeats: int = 3) -> dict:
    """Replay calls piecewise; seconds per component over the whole run (see module doc)."""
    null_backend = dataclasses.replace(model.module.backend, name="none",
                                       ragged_paged_attention=lambda q, *args, **kwargs: jnp.zeros_like(q))
    null_forward = make_forward(CausalLM(model.config, null_backend, param_dtype=model.dtype))
    matmuls = jax.jit(_matmuls, static_argnums=2)
    num_blocks = runner.kv_cache[0][0].shape[1]
    state = {"cache": init_kv_cache(model.config, num_blocks, runner.block_size, model.dtype)}

    def forward_time(forward, call: Call) -> float:
        def run():
            logits, state["cache"] = forward(model.params, call.tokens, call.positions, state["cache"], call.meta)
            return logits
        return time_call(run, repeats=repeats)

    def matmul_time(tokens: int, rows: int) -> float:
        x = jnp.ones((tokens, model.config.hidden_size), model.dtype)
        return time_call(lambda: matmuls(model.params, x, rows), repeats=repeats)

    def sampler_time(rows: int) -> float:
        batch = SamplingBatch(**_empty_batch(rows)).replace(temperature=jnp.ones(rows, jnp.float32))
        logits = jax.random.normal(jax.random.PRNGKey(0), (rows, model.config.vocab_size))
        return time_call(lambda: sample(logits, batch, SAMPLING).tokens, repeats=repeats)

    totals = Counter()
    memo: dict = {}
    for call in calls:
        def cached(key, measure):
            if key not in memo:
                memo[key] = measure()
            return memo[key]

        totals["forward"] += call.steps * forward_time(model.forward, call)
        totals["null_attention"] += call.steps * forward_time(null_forward, call)
        totals["matmuls_bucket"] += call.steps * cached(("mm", call.bucket_tokens, call.bucket_seqs),
                                                          lambda: matmul_time(call.bucket_tokens, call.bucket_seqs))
        totals["matmuls_real"] += call.steps * cached(("mm", call.real_tokens, call.real_seqs),
                                                        lambda: matmul_time(call.real_tokens, call.real_seqs))
        totals["sampler"] += call.steps * cached(("sample", call.bucket_seqs), lambda: sampler_time(call.bucket_seqs))
    device = totals["forward"] + totals["sampler"]
    return dict(
        wall=wall_seconds,
        attention=totals["forward"] - totals["null_attention"],
        other_layers=totals["null_attention"] - totals["matmuls_bucket"],
        padding=totals["matmuls_bucket"] - totals["matmuls_real"],
        roofline=totals["matmuls_real"],
        sampler=totals["sampler"],
        host=wall_seconds - device,
        device_calls=len(calls),
        device_steps=sum(c.steps for c in calls),
        real_tokens=sum(c.real_tokens * c.steps for c in calls),
        bucket_tokens=sum(c.bucket_tokens * c.steps for c in calls),
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
    ("host", "host: scheduling, input preparation, detokenisation, transfers (wall minus the above)"),
]


def breakdown_rows(p: dict) -> list[list[str]]:
    return [[what, f"{1e3 * p[key]:.0f}", f"{100 * p[key] / p['wall']:.0f}%"] for key, what in BREAKDOWN]
