"""Models on the paged KV cache, loaded from Hugging Face checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from paged_jax.cache import SequenceChunk, build_metadata, init_kv_cache
from paged_jax.config import ModelConfig
from paged_jax.loader import Checkpoint, load_params, read_config, resolve_dtype
from paged_jax.models.transformer import CausalLM
from pallas_kernels import get_backend

__all__ = ["CausalLM", "Model", "load_model", "random_model", "param_shapes"]


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: `forward(params, tokens, positions, kv_cache, metadata)` is jitted and
    donates the KV cache, returning `(logits [num_seqs, vocab] float32, kv_cache)`."""

    config: ModelConfig
    module: CausalLM
    params: dict
    dtype: jnp.dtype
    forward: Callable
    mesh: Any = None  # a jax.sharding.Mesh when tensor parallel (parallel.py); None: one device


def make_forward(module: CausalLM) -> Callable:
    def forward(params, tokens, positions, kv_cache, metadata):
        return module.apply({"params": params}, tokens, positions, kv_cache, metadata)

    return jax.jit(forward, donate_argnums=(3,))


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[int, ...]]:
    """Our parameter paths and shapes for a config, from an abstract initialisation."""
    module = CausalLM(config, get_backend("xla"), param_dtype=dtype)
    cache = init_kv_cache(config, num_blocks=1, block_size=1, dtype=dtype)
    positions, meta = build_metadata([SequenceChunk([0], 0, 1)], block_size=1, max_blocks_per_seq=1)
    tokens = jnp.zeros(1, jnp.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, positions, cache, meta))
    flat = traverse_util.flatten_dict(abstract["params"], sep="/")
    return {path: leaf.shape for path, leaf in flat.items()}


def load_model(path: str | Path, *, dtype="auto", attention_backend: str = "auto") -> Model:
    """Load a local Hugging Face checkpoint directory."""
    config = read_config(path)
    dtype = resolve_dtype(dtype, config)
    params = load_params(Checkpoint(path), config, param_shapes(config, dtype), dtype)
    module = CausalLM(config, get_backend(attention_backend), param_dtype=dtype)
    return Model(config=config, module=module, params=params, dtype=dtype, forward=make_forward(module))


def random_model(config: ModelConfig, *, dtype=jnp.float32, attention_backend: str = "auto", seed: int = 0) -> Model:
    """A randomly initialised model of `config`'s shape, for benchmarks that need the cost of
    a model and not its answers."""
    module = CausalLM(config, get_backend(attention_backend), param_dtype=dtype)
    shapes = param_shapes(config, dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    flat = {tuple(path.split("/")): _random_leaf(key, path, shape, dtype)
            for key, (path, shape) in zip(keys, shapes.items())}
    params = traverse_util.unflatten_dict(flat)
    return Model(config=config, module=module, params=params, dtype=jnp.dtype(dtype), forward=make_forward(module))


def _random_leaf(key, path: str, shape, dtype) -> jax.Array:
    if path.endswith(("kernel", "embedding")):
        return (0.02 * jax.random.normal(key, shape)).astype(dtype)
    return (jnp.ones if path.endswith("scale") else jnp.zeros)(shape, dtype)
