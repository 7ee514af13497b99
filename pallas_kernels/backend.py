"""The attention backend a model runs on: one set of four functions, chosen by name.

`pallas` compiles the Pallas kernels (GPU), `pallas_interpret` runs the same kernels in the
Pallas interpreter (any machine; slow, for testing), `xla` runs the same tiled attention
written in jax.numpy (fast on a CPU) and the jax.numpy cache updates. `auto` is `pallas` on
a GPU and `xla` elsewhere. All four functions have the
same signatures and results whichever backend provides them.

Pages may be 8-bit (quantization.py). Every function takes the int8 pages' scales as
`k_scales`, `v_scales` ([num_kv_heads, num_blocks, block_size] float32; None for pages of any
other dtype), and the two cache functions return them updated beside the pages.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from pallas_kernels import cache_ops, paged_attention, reference, xla_attention

BACKENDS = ("auto", "pallas", "pallas_interpret", "xla")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # (q, k_pages, v_pages, block_tables, lengths, *, sm_scale, sliding_window, soft_cap,
    #  k_scales, v_scales)
    paged_attention: Callable
    # (q, k_pages, v_pages, block_tables, context_lens, cu_q_lens, *, sm_scale, max_q_len,
    #  sliding_window, soft_cap, k_scales, v_scales); see paged_attention.ragged_paged_attention
    ragged_paged_attention: Callable
    # (k_pages, v_pages, k, v, slot_mapping, k_scales=None, v_scales=None)
    #   -> (k_pages, v_pages, k_scales, v_scales), K/V quantized to the pages' dtype
    write_kv: Callable
    # (k_pages, v_pages, src, dst, k_scales=None, v_scales=None)
    #   -> (k_pages, v_pages, k_scales, v_scales), a block's scales copied with its pages
    copy_blocks: Callable
    # the dtype pages are stored in, for pages holding dtype (the model's, or an 8-bit one)
    page_dtype: Callable = jnp.dtype


def _pallas(name: str, interpret: bool) -> AttentionBackend:
    bind = functools.partial(functools.partial, interpret=interpret)
    return AttentionBackend(
        name=name,
        paged_attention=bind(paged_attention.paged_attention),
        ragged_paged_attention=bind(paged_attention.ragged_paged_attention),
        write_kv=bind(cache_ops.write_kv),
        copy_blocks=bind(cache_ops.copy_blocks),
    )


def get_backend(name: str = "auto") -> AttentionBackend:
    """The backend called `name`; see the module docstring."""
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else "xla"
    if name == "pallas":
        return _pallas(name, interpret=False)
    if name == "pallas_interpret":
        return _pallas(name, interpret=True)
    if name == "xla":
        return AttentionBackend(
            name=name,
            paged_attention=xla_attention.paged_attention_xla,
            ragged_paged_attention=xla_attention.ragged_paged_attention_xla,
            write_kv=xla_attention.write_kv_xla,
            copy_blocks=reference.copy_blocks_reference,
            page_dtype=xla_attention.page_dtype,
        )
    raise ValueError(f"unknown attention_backend {name!r}; choose one of {BACKENDS}")
