"""The arithmetic every layer shares (the decoder in transformer.py, the experts in moe.py):
how a matrix product accumulates and rounds, and the activations by their Hugging Face names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATION_FNS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Every matrix product of the model: accumulated in float32 and rounded to the inputs'
    dtype, as PyTorch computes half precision. For bfloat16 on a CPU it is also what makes it
    fast: XLA's bfloat16 x bfloat16 -> float32 product uses the CPU's bfloat16 instructions
    (2-3x float32's speed here), while a bfloat16 result takes a slower path (slower than
    float32 at 8 and 256 rows; experiments/results/dtype_cpu.md). float32 is unchanged."""
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))
