"""Every kernel configuration we serve lowers to Triton for CUDA, checked on any machine.

`jax.export` runs the Pallas -> Triton lowering for the `cuda` platform without a GPU, so
shape rules Triton enforces (power-of-two tensors, >= 16-wide matrix products) and unsupported
operations fail here in CI, not first on a lent GPU. On a GPU the kernel tests run compiled
instead, which covers this and Triton's own compiler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels as pk

pytestmark = pytest.mark.skipif(jax.default_backend() == "gpu", reason="compiled for real on a GPU")

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct


def lower_for_cuda(fn, *args, **kwargs) -> str:
    exported = jax.export.export(
        jax.jit(functools.partial(fn, interpret=False)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args, **kwargs)
    return exported.mlir_module()


CONFIGS = [  # (dtype, head_dim, block_size, num_q_heads, num_kv_heads)
    (jnp.bfloat16, 128, 16, 32, 8),
    (jnp.float16, 64, 1, 12, 12),
    (jnp.float32, 80, 256, 14, 2),
    (jnp.bfloat16, 96, 4, 8, 1),
    (jnp.bfloat16, 256, 64, 16, 16),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0].__name__}-d{c[1]}-b{c[2]}-{c[3]}q{c[4]}kv")
def test_attention_lowers_to_triton(config):
    dtype, head_dim, block_size, hq, hkv = config
    pages = S((hkv, 64, block_size, head_dim), dtype)
    table = S((8, max(1, 4096 // block_size)), jnp.int32)
    decode = lower_for_cuda(pk.paged_attention, S((8, hq, head_dim), dtype), pages, pages, table, S((8,), jnp.int32))
    ragged = lower_for_cuda(pk.ragged_paged_attention, S((100, hq, head_dim), dtype), pages, pages, table,
                            S((8,), jnp.int32), S((9,), jnp.int32))
    assert TRITON_CALL in decode and TRITON_CALL in ragged


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=lambda c: f"d{c[1]}-b{c[2]}")
def test_windowed_soft_capped_attention_lowers_to_triton(config):
    """A window not a multiple of the block size, and Gemma 2's soft-cap (a tanh)."""
    dtype, head_dim, block_size, hq, hkv = config
    pages = S((hkv, 64, block_size, head_dim), dtype)
    table = S((8, max(1, 4096 // block_size)), jnp.int32)
    options = dict(sliding_window=1000, soft_cap=50.0)
    decode = lower_for_cuda(functools.partial(pk.paged_attention, **options), S((8, hq, head_dim), dtype),
                            pages, pages, table, S((8,), jnp.int32))
    ragged = lower_for_cuda(functools.partial(pk.ragged_paged_attention, **options), S((100, hq, head_dim), dtype),
                            pages, pages, table, S((8,), jnp.int32), S((9,), jnp.int32))
    assert TRITON_CALL in decode and TRITON_CALL in ragged


def test_cache_ops_lower_to_triton():
    pages = S((4, 64, 16, 80), jnp.bfloat16)
    new = S((37, 4, 80), jnp.bfloat16)
    assert TRITON_CALL in lower_for_cuda(pk.write_kv, pages, pages, new, new, S((37,), jnp.int32))
    assert TRITON_CALL in lower_for_cuda(pk.copy_blocks, pages, pages, S((5,), jnp.int32), S((5,), jnp.int32))


EIGHT_BIT_CONFIGS = [  # (page dtype, model dtype, head_dim, block_size, num_q_heads, num_kv_heads)
    (jnp.int8, jnp.bfloat16, 128, 16, 32, 8),
    (jnp.float8_e4m3fn, jnp.bfloat16, 80, 256, 14, 2),
    (jnp.float8_e5m2, jnp.float16, 64, 1, 12, 12),
]


@pytest.mark.parametrize("config", EIGHT_BIT_CONFIGS, ids=lambda c: f"{c[0].__name__}-{c[1].__name__}-d{c[2]}-b{c[3]}")
def test_8bit_pages_lower_to_triton(config):
    """int8 loads with their float32 scales, and float8 upcasts (tt.fp_to_fp). Pallas lowers a
    float8_e4m3fn cast only for compute capability >= 8.9 (Ada, Hopper) or, as here with no GPU,
    an unknown one: on an A100 the attention kernels would refuse float8_e4m3fn pages."""
    page_dtype, dtype, head_dim, block_size, hq, hkv = config
    pages = S((hkv, 64, block_size, head_dim), page_dtype)
    scales = S(pages.shape[:3], jnp.float32) if pk.needs_scales(page_dtype) else None
    table = S((8, max(1, 4096 // block_size)), jnp.int32)
    new = S((37, hkv, head_dim), dtype)
    lowered = [
        lower_for_cuda(functools.partial(pk.paged_attention, sliding_window=1000), S((8, hq, head_dim), dtype),
                       pages, pages, table, S((8,), jnp.int32), k_scales=scales, v_scales=scales),
        lower_for_cuda(pk.ragged_paged_attention, S((100, hq, head_dim), dtype), pages, pages, table,
                       S((8,), jnp.int32), S((9,), jnp.int32), k_scales=scales, v_scales=scales),
        lower_for_cuda(pk.write_kv, pages, pages, new, new, S((37,), jnp.int32), scales, scales),
        lower_for_cuda(pk.copy_blocks, pages, pages, S((5,), jnp.int32), S((5,), jnp.int32), scales, scales),
    ]
    assert all(TRITON_CALL in module for module in lowered)
