"""Pallas kernels for paged attention and the paged KV cache, each with a jax.numpy reference.

This package knows nothing of sequences or requests: it sees pages, block tables and lengths.
"""

from pallas_kernels.backend import BACKENDS, AttentionBackend, get_backend
from pallas_kernels.cache_ops import copy_blocks, write_kv
from pallas_kernels.paged_attention import TilePlan, attention_plan, paged_attention, ragged_paged_attention
from pallas_kernels.quantization import dequantize, needs_scales, quantize
from pallas_kernels.reference import (
    copy_blocks_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "get_backend",
    "TilePlan",
    "attention_plan",
    "paged_attention",
    "ragged_paged_attention",
    "write_kv",
    "copy_blocks",
    "needs_scales",
    "quantize",
    "dequantize",
    "paged_attention_reference",
    "ragged_paged_attention_reference",
    "write_kv_reference",
    "copy_blocks_reference",
]
