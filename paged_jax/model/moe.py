"""A mixture of experts: the MLP of a sparse layer (Mixtral, Qwen3-MoE), one option of the one
decoder (transformer.DecoderLayer).

A router scores every expert per token; each token goes through the `num_experts_per_tok`
experts it ranks highest, and their outputs are summed with the router's probabilities as
weights (renormalised over the chosen experts where the config says so). The experts are
SwiGLU MLPs, computed as grouped matrix products rather than a loop over experts: the
(token, choice) pairs are sorted by expert, so each expert's rows are contiguous, and
`lax.ragged_dot` multiplies each group of rows by its expert's kernel. A batch of T tokens
always makes T * num_experts_per_tok pairs, so every shape is static per bucket, whatever the
router chooses.

Parameter layout, shared by the loader and sharding.py: the router is a Dense kernel
[hidden, experts]; the experts' kernels are stacked, [experts, in, out], gate/up fused as
(gate, up) pairs ([experts, hidden, intermediate * 2]) like the dense MLP's gate_up_proj, so a
split of the intermediate columns over devices keeps pairs together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from paged_jax.model.config import ModelConfig
from paged_jax.model.numerics import ACTIVATION_FNS, dot_general


def route(logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, experts] -> (weights float32 [T, top_k], experts int32 [T, top_k]).
    Hugging Face takes the softmax, the top-k and the renormalisation in float32 whatever the
    model's dtype: a bfloat16 softmax would reorder near-tied experts."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


class GroupedDense(nn.Module):
    """nn.Dense with a kernel per expert: rows sorted by expert, group_sizes[e] of them for
    expert e, each multiplied by its own expert's kernel. Accumulated in float32 and rounded
    to the inputs' dtype, as every product of the model (numerics.dot_general)."""

    features: int
    num_experts: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:  # [P, in], [E] -> [P, features]
        kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                            (self.num_experts, x.shape[-1], self.features), self.param_dtype)
        out = lax.ragged_dot(x, kernel, group_sizes, preferred_element_type=jnp.float32)
        return out.astype(jnp.result_type(x, kernel))


class Experts(nn.Module):
    """The experts' SwiGLU, down(act(gate(x)) * up(x)), over rows sorted by expert."""

    config: ModelConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:  # [P, H], [E] -> [P, H]
        c = self.config
        width = c.moe_intermediate_size
        dense = lambda n, name: GroupedDense(n, c.num_experts, self.param_dtype, name=name)  # noqa: E731
        pairs = dense(2 * width, "gate_up_proj")(x, group_sizes).reshape(-1, width, 2)  # (gate, up) pairs
        hidden = ACTIVATION_FNS[c.activation](pairs[..., 0]) * pairs[..., 1]  # [P, width]
        return dense(c.hidden_size, "down_proj")(hidden, group_sizes)


class MoE(nn.Module):
    """The sparse MLP: route, sort the (token, choice) pairs by expert, run the experts,
    put the pairs back in order and sum each token's choices by their weights."""

    config: ModelConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [T, H] -> [T, H]
        c = self.config
        num_tokens, top_k = x.shape[0], c.num_experts_per_tok
        logits = nn.Dense(c.num_experts, use_bias=False, param_dtype=self.param_dtype, dot_general=dot_general,
                          name="router")(x)  # [T, E], rounded to the dtype as Hugging Face's gate is
        weights, experts = route(logits, top_k, c.norm_topk_prob)  # [T, k] each
        chosen = experts.reshape(-1)  # [T * k]: the expert of each (token, choice) pair
        order = jnp.argsort(chosen, stable=True)  # pairs grouped by expert
        group_sizes = jnp.bincount(chosen, length=c.num_experts).astype(jnp.int32)  # [E]
        out = Experts(c, self.param_dtype, name="experts")(x[order // top_k], group_sizes)  # [T * k, H]
        out = out[jnp.argsort(order)].reshape(num_tokens, top_k, -1)  # back in (token, choice) order
        # Summed in float32 and rounded once (Hugging Face adds each expert's share in the
        # dtype, in expert order: the same in float32, within a rounding in half precision).
        return jnp.sum(weights[..., None] * out.astype(jnp.float32), axis=1).astype(x.dtype)
