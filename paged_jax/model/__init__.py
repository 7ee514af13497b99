"""Models on the paged KV cache, loaded from Hugging Face checkpoints onto a mesh of devices
(sharding.py; one device is a mesh of one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from paged_jax.model import sharding
from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache, kv_dtype, layout_of
from paged_jax.model.config import ModelConfig
from paged_jax.model.loader import Checkpoint, load_params, read_config, resolve_dtype
from paged_jax.model.transformer import CausalLM
from pallas_kernels import get_backend

__all__ = ["CausalLM", "Model", "load_model", "random_model", "param_shapes"]


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: `forward(params, tokens, positions, kv_cache, metadata, logit_rows=None)`
    is jitted and donates the KV cache, returning `(logits [num_seqs, vocab] float32, kv_cache)`
    (or one row per logit_rows entry: CausalLM). config is the config as the mesh holds it
    (sharding.sharded_config)."""

    config: ModelConfig
    module: CausalLM
    params: dict
    dtype: jnp.dtype
    forward: Callable
    mesh: Mesh

    def page_dtype(self, kv_cache_dtype: str = "auto") -> jnp.dtype:
        """What the KV cache's pages are made of for vLLM's kv_cache_dtype: the model's dtype
        ("auto") or an 8-bit one (cache.kv_dtype), or its bits where the attention backend
        stores it so (pallas_kernels/xla_attention.py: bfloat16 and fp8 on a CPU)."""
        return self.module.backend.page_dtype(kv_dtype(kv_cache_dtype, self.dtype))


def make_forward(module: CausalLM, mesh: Mesh) -> Callable:
    """The jitted forward pass: logits replicated (the sampler sees the whole vocabulary on
    every device), the cache donated and returned with the sharding it came in."""
    def forward(params, tokens, positions, kv_cache, metadata, logit_rows=None):
        return module.apply({"params": params}, tokens, positions, kv_cache, metadata, logit_rows)

    return jax.jit(forward, donate_argnums=(3,),
                   out_shardings=(sharding.replicated(mesh), sharding.cache_sharding(mesh)))


def param_shapes(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[int, ...]]:
    """Our parameter paths and shapes for a config, from an abstract initialisation."""
    module = CausalLM(config, get_backend("xla"), param_dtype=dtype)
    groups = len(layout_of(config).windows)
    positions, meta = build_metadata([SequenceChunk([[0]] * groups, 0, 1)], block_size=1, max_blocks_per_seq=1)
    tokens = jnp.zeros(1, jnp.int32)

    def init():
        cache = init_kv_cache(config, num_blocks=1, block_size=1, dtype=dtype, mesh=sharding.default_mesh())
        return module.init(jax.random.PRNGKey(0), tokens, positions, cache, meta)

    flat = traverse_util.flatten_dict(jax.eval_shape(init)["params"], sep="/")
    return {path: leaf.shape for path, leaf in flat.items()}


def load_model(path: str | Path, mesh: Mesh | None = None, *, config: ModelConfig | None = None, dtype="auto",
               attention_backend: str = "auto", vocab_parallel: bool = True) -> Model:
    """Load a local Hugging Face checkpoint directory onto `mesh` (by default this process's
    first device). config: the checkpoint's, when the caller has read it already."""
    config = read_config(path) if config is None else config
    dtype = resolve_dtype(dtype, config)
    return _on_mesh(config, mesh, dtype, attention_backend, vocab_parallel,
                    lambda shapes, place: load_params(Checkpoint(path), config, shapes, dtype, place=place))


def random_model(config: ModelConfig, mesh: Mesh | None = None, *, dtype=jnp.float32,
                 attention_backend: str = "auto", seed: int = 0) -> Model:
    """A randomly initialised model of `config`'s shape, for benchmarks that need the cost of
    a model and not its answers; the same weights on every mesh."""
    def params(shapes, place):
        keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
        return traverse_util.unflatten_dict({tuple(path.split("/")): place(path, _random_leaf(key, path, shape, dtype))
                                             for key, (path, shape) in zip(keys, shapes.items())})

    return _on_mesh(config, mesh, jnp.dtype(dtype), attention_backend, True, params)


def _on_mesh(config: ModelConfig, mesh: Mesh | None, dtype, attention_backend: str, vocab_parallel: bool,
             make_params: Callable) -> Model:
    """The model of `config` on the mesh: make_params(shapes, place) makes each parameter on
    the host in the checkpoint's shape and hands it to place (sharding.placement), which puts
    its shards on their devices, one tensor at a time."""
    mesh = sharding.default_mesh() if mesh is None else mesh
    sharded = sharding.sharded_config(config, mesh.shape[sharding.TP])
    place = sharding.placement(config, mesh, param_shapes(sharded, dtype), vocab_parallel)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = make_params(param_shapes(config, dtype), place)
    module = CausalLM(sharded, sharding.shard_backend(get_backend(attention_backend), mesh), param_dtype=dtype)
    return Model(config=sharded, module=module, params=params, dtype=dtype, forward=make_forward(module, mesh),
                 mesh=mesh)


def _random_leaf(key, path: str, shape, dtype) -> jax.Array:
    if path.endswith(("kernel", "embedding")):
        return (0.02 * jax.random.normal(key, shape)).astype(dtype)
    return (jnp.ones if path.endswith("scale") else jnp.zeros)(shape, dtype)
