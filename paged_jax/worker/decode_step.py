"""The decode loop's device step: one decode step whose input is the step before's output.

A decode loop (model_runner.py) chains these without the host in between: each step's
sampled tokens, positions, context lengths and sampler counters (DecodeState) stay on the
device and feed the next, so the host can read step i while step i + 1 computes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from paged_jax.model.cache import AttentionMetadata
from paged_jax.worker.sampler import SamplerFlags, SamplingBatch, sample


class DecodeState(NamedTuple):
    """What a decode step hands the next, on the device."""

    tokens: jax.Array  # [S] int32: each row's newest token, the step's input
    positions: jax.Array  # [S] int32: that token's position
    context_lens: jax.Array  # [S] int32: tokens the row's attention reads, the input included
    counters: jax.Array  # [S] int32: tokens the row has sampled (its random stream's position)


def make_decode_step(module, block_size: int):
    """The jitted decode step of module (see _decode_step; the state and the KV cache are
    donated). The runner holds its model's as `decode_step`; a profiler makes one for a
    changed module (experiments/step_profile.py: attention off)."""
    return jax.jit(functools.partial(_decode_step, module, block_size), static_argnames=("flags",),
                   donate_argnums=(1, 2))


def loop_flags(flags: SamplerFlags) -> SamplerFlags:
    """The decode loop's sampler variant for a step's flags: greedy rows are handled by a
    sampling step too, one compiled variant fewer."""
    return flags._replace(sample=True)


def _decode_step(module, block_size, params, state: DecodeState, kv_cache, meta: AttentionMetadata,
                 batch: SamplingBatch, limit, *, flags: SamplerFlags):
    """One decode step of a loop. meta holds the loop's block tables (grown for all its
    steps); row i writes K/V only at positions below limit[i] (what its blocks hold), later
    tokens are computed and dropped. Returns the step's SamplerOutput [rows, ...], the next
    step's state and the cache."""
    rows = jnp.arange(state.tokens.shape[0])
    real = meta.slot_mapping[0] >= 0  # padding rows stay padding
    positions = state.positions
    block = meta.block_tables[:, rows, jnp.clip(positions, 0, jnp.maximum(limit - 1, 0)) // block_size]  # [G, S]
    slots = jnp.where(real & (positions < limit), block * block_size + positions % block_size, -1)
    step_meta = meta.replace(context_lens=state.context_lens, slot_mapping=slots)
    logits, kv_cache = module.apply({"params": params}, state.tokens, positions, kv_cache, step_meta)
    out = sample(logits, batch.replace(counters=state.counters), flags)
    return out, DecodeState(out.tokens, positions + 1, state.context_lens + real, state.counters + 1), kv_cache
