"""Whole blocks moved as the block manager asks: copied inside the device cache (copy-on-write,
a fork's copy), out to the host swap space and back in (preemption by swap).

Every array of the cache pytree (pages, and int8 pages' scales: model/cache.py's KVPool) has the
block axis second, so one gather or scatter moves a block's pages and scales together. Block id
lists are padded to a power of two, so a few shapes compile whatever the step moves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.model.cache import KVCache, KVPool

HostCache = tuple  # the cache pytree's shape in numpy arrays, num_swap_blocks on the block axis


def host_swap_space(kv_cache: KVCache, num_swap_blocks: int) -> HostCache:
    """Host copies of every cache array, num_swap_blocks blocks each."""
    return jax.tree.map(lambda x: np.zeros((x.shape[0], num_swap_blocks) + x.shape[2:], x.dtype), kv_cache)


def copy_blocks(copy: Callable, kv_cache: KVCache, pairs: list[tuple[int, int]]) -> KVCache:
    """(source, destination) device blocks copied with the backend's copy_blocks; donated."""
    src, dst = (pad_ids(np.asarray(x)) for x in zip(*pairs))
    return _copy_blocks(copy, kv_cache, src, dst)


def swap_out(kv_cache: KVCache, swap_space: HostCache, pairs: list[tuple[int, int]]) -> None:
    """Copy (device block, host block) pairs (at least one) to host memory, in one gather and
    one transfer. Returns once the host holds them."""
    device_blocks, host_blocks = (np.asarray(x) for x in zip(*pairs))
    pages = jax.device_get(_gather_blocks(kv_cache, jnp.asarray(pad_ids(device_blocks))))
    for host, got in zip(jax.tree.leaves(swap_space), jax.tree.leaves(pages)):
        host[:, host_blocks] = got[:, : len(host_blocks)]


def swap_in(kv_cache: KVCache, swap_space: HostCache, pairs: list[tuple[int, int]]) -> KVCache:
    """Copy (host block, device block) pairs (at least one) back into the cache (donated):
    the inverse of swap_out, asynchronous like any device update of the cache."""
    host_blocks, device_blocks = (np.asarray(x) for x in zip(*pairs))
    padded = pad_ids(device_blocks)
    pages = jax.tree.map(lambda host: _pad_rows(host[:, host_blocks], len(padded)), swap_space)
    return _scatter_blocks(kv_cache, jnp.asarray(padded), pages)


def pad_ids(ids: np.ndarray) -> np.ndarray:
    """Pad block ids to a power of two (>= 8) with -1, so few copy shapes compile."""
    width = max(8, 1 << (len(ids) - 1).bit_length())
    return np.concatenate([ids, np.full(width - len(ids), -1)]).astype(np.int32)


def _pad_rows(pages: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([pages, np.zeros((pages.shape[0], width - pages.shape[1]) + pages.shape[2:], pages.dtype)], 1)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(1,))
def _copy_blocks(copy, kv_cache, src, dst):
    """Copy whole blocks src[i] -> dst[i] (-1 = padding) in every pool, K and V, with their scales."""
    return tuple(KVPool(*copy(pool.k, pool.v, src, dst, pool.k_scales, pool.v_scales)) for pool in kv_cache)


@jax.jit
def _gather_blocks(kv_cache, blocks):
    """Every cache array's copies of the blocks ([Hkv, len(blocks), ...]; -1: block 0, unused)."""
    ids = jnp.maximum(blocks, 0)
    return jax.tree.map(lambda x: x[:, ids], kv_cache)


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_blocks(kv_cache, blocks, pages):
    ids = jnp.where(blocks >= 0, blocks, kv_cache[0].k.shape[1])  # padding is dropped
    return jax.tree.map(lambda x, new: x.at[:, ids].set(new, mode="drop"), kv_cache, pages)
