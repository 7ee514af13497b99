"""8-bit KV pages: how a token's K/V is stored in the pages' dtype, and how it is read back.

The pages' dtype says how they are stored (vLLM's `kv_cache_dtype` maps to it):

- the model's dtype (float32, bfloat16, float16): as computed, nothing else stored.
- float8_e4m3fn (vLLM's "fp8") or float8_e5m2 ("fp8_e5m2"): the value itself, with vLLM's
  default per-tensor scale of 1.0 (k_scale = v_scale = 1.0 unless a checkpoint ships
  calibrated scales; none of ours does), so nothing extra is stored. The cast saturates:
  values are clipped to the format's finite range first, because a plain cast turns
  |x| > 448 into NaN in e4m3fn (it has no infinity) and |x| > 57344 into inf in e5m2, and one
  such key would poison every softmax that reads its page. Saturated pages also never hold
  NaN or inf, so a masked slot (score weight 0) can never turn into NaN (0 * inf).
- int8: round(x / scale) in [-127, 127], with a float32 scale per token and KV head,
  scale = max|x| over head_dim / 127 (floored so a zero vector does not divide by zero).
  The scale is computed from the token alone when it is written, so a write never rescales
  what a block already holds. The scales live beside the pages as `k_scales`, `v_scales`
  [num_kv_heads, num_blocks, block_size] float32: the same block ids and slots as the pages,
  so block tables, writes and copies treat them as a page with one column (4 bytes per
  head_dim bytes of page: 3% more at head_dim 128).

Every attention implementation dequantizes pages as it reads them: the Pallas kernels the
chunk each program has just loaded, in registers; the jax.numpy ones each gather. None builds
a full-precision copy of the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
INT8_MAX = 127
# Scales never fall below the smallest normal float32, so a zero vector is divided by it (and
# stored as zeros) rather than by zero; |x| / scale still stays within 127 for every x.
SCALE_FLOOR = float(jnp.finfo(jnp.float32).tiny)


def needs_scales(page_dtype) -> bool:
    """Whether pages of this dtype come with k_scales / v_scales (int8 pages do)."""
    return jnp.dtype(page_dtype) == jnp.int8


def quantize(
    x: jax.Array,  # [..., head_dim] K or V as the model computed it
    page_dtype,
) -> tuple[jax.Array, jax.Array | None]:  # [..., head_dim] page_dtype; float32[...] or None
    """x as pages of page_dtype store it, and its scales (None unless needs_scales)."""
    page_dtype = jnp.dtype(page_dtype)
    if needs_scales(page_dtype):
        x = x.astype(jnp.float32)
        scales = jnp.maximum(jnp.max(jnp.abs(x), axis=-1) / INT8_MAX, SCALE_FLOOR)
        stored = jnp.clip(jnp.round(x / scales[..., None]), -INT8_MAX, INT8_MAX)
        return stored.astype(page_dtype), scales
    if page_dtype in FLOAT8_DTYPES:
        finite = float(jnp.finfo(page_dtype).max)
        return jnp.clip(x.astype(jnp.float32), -finite, finite).astype(page_dtype), None
    return x.astype(page_dtype), None


def dequantize(
    stored: jax.Array,  # [..., head_dim] as the pages hold it
    scales: jax.Array | None,  # float32[...], or None for pages without scales
    dtype,  # the model's dtype
) -> jax.Array:  # [..., head_dim] dtype
    """What a quantized K/V stands for, in the dtype attention computes in."""
    if scales is None:
        return stored.astype(dtype)
    return (stored.astype(jnp.float32) * scales[..., None]).astype(dtype)
