"""One decoder-only transformer for GPT-2, OPT and the Llama family, on the paged KV cache.

The architectures share every code path where their math is the same; `ModelConfig` switches
select the differences (positions, norm kind and placement, MLP shape, biases, tied head).
Attention runs over a ragged batch: each sequence contributes any number of new tokens (a
prompt, a prompt chunk, one decode token), writes their K/V into their cache slots, and
attends to its whole cached context through the chosen kernel backend.

Parameter layout, shared by the loader: q/k/v are one fused `qkv_proj` and Llama's gate/up
one `gate_up_proj`, so each is a single matrix product. Their output columns are grouped so
that any contiguous split of them is a split by heads (tensor parallelism, sharding.py):
qkv_proj's by KV head, each with its query heads then its k and v
([kv_heads, group + 2, head_dim]), gate_up_proj's as (gate, up) pairs ([intermediate, 2]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from paged_jax.model.cache import AttentionMetadata, KVCache
from paged_jax.model.config import ModelConfig
from pallas_kernels import AttentionBackend

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


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32 as Hugging Face does, cast back after."""

    config: ModelConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [T, H] -> [T, H]
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if c.norm == "rmsnorm":
            normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.norm_eps)
            return scale * normed.astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * lax.rsqrt(var + c.norm_eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, Hugging Face's half-split convention. x [T, heads, D], positions [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)  # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, kv, meta: AttentionMetadata):
        c = self.config
        num_tokens = x.shape[0]
        q_size, group = c.num_heads * c.head_dim, c.num_heads // c.num_kv_heads
        qkv = nn.Dense(c.num_kv_heads * (group + 2) * c.head_dim, use_bias=c.qkv_bias,
                       param_dtype=self.param_dtype, dot_general=dot_general, name="qkv_proj")(x)
        qkv = qkv.reshape(num_tokens, c.num_kv_heads, group + 2, c.head_dim)  # per KV head: q..., k, v
        q = qkv[:, :, :group].reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]  # [T, Hkv, D]
        if not c.learned_positions:
            inv_freq = c.rope_inv_freq()
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_pages, v_pages = self.backend.write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = self.backend.ragged_paged_attention(
            q, k_pages, v_pages, meta.block_tables, meta.context_lens, meta.cu_q_lens,
            max_q_len=meta.max_q_len,
        )  # [T, Hq, D]
        out = nn.Dense(c.hidden_size, use_bias=c.out_bias, param_dtype=self.param_dtype, dot_general=dot_general,
                       name="o_proj")(out.reshape(num_tokens, q_size))
        return out, (k_pages, v_pages)


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = ACTIVATION_FNS[c.activation]
        dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, param_dtype=self.param_dtype,  # noqa: E731
                                         dot_general=dot_general, name=name)
        if c.gated_mlp:
            pairs = dense(2 * c.intermediate_size, "gate_up_proj")(x).reshape(-1, c.intermediate_size, 2)
            hidden = act(pairs[..., 0]) * pairs[..., 1]  # (gate, up) pairs
        else:
            hidden = act(dense(c.intermediate_size, "fc1")(x))
        return dense(c.hidden_size, "down_proj" if c.gated_mlp else "fc2")(hidden)


class DecoderLayer(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, positions, kv, meta):
        attn = Attention(self.config, self.backend, self.param_dtype, name="attn")
        mlp = MLP(self.config, self.param_dtype, name="mlp")
        attn_norm = Norm(self.config, self.param_dtype, name="attn_norm")
        mlp_norm = Norm(self.config, self.param_dtype, name="mlp_norm")
        if self.config.pre_norm:
            h, kv = attn(attn_norm(x), positions, kv, meta)
            x = x + h
            return x + mlp(mlp_norm(x)), kv
        h, kv = attn(x, positions, kv, meta)  # OPT-350m: normalise after each residual add
        x = attn_norm(x + h)
        return mlp_norm(x + mlp(x)), kv


class CausalLM(nn.Module):
    """`apply({'params': p}, tokens, positions, kv_cache, meta) -> (logits, kv_cache)`.

    tokens, positions: int32[num_tokens]. Logits (float32 [num_seqs, vocab]) only for each
    sequence's last token in the batch, the one that is sampled; a whole prompt's logits
    would cost a [prompt_len, vocab] product for nothing."""

    config: ModelConfig
    backend: AttentionBackend
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, kv_cache: KVCache, meta: AttentionMetadata):
        c = self.config
        vocab = c.padded_vocab_size or c.vocab_size  # padded: a multiple of the devices it is split over
        embed = nn.Embed(vocab, c.embed_dim or c.hidden_size, param_dtype=self.param_dtype,
                         name="embed")
        x = embed(tokens)
        if c.embed_dim:
            x = nn.Dense(c.hidden_size, use_bias=False, param_dtype=self.param_dtype, dot_general=dot_general,
                         name="project_in")(x)
        if c.learned_positions:
            table = nn.Embed(c.max_position_embeddings + c.position_offset, c.hidden_size,
                             param_dtype=self.param_dtype, name="positions")
            x = x + table(positions + c.position_offset)
        new_cache = []
        for i, kv in enumerate(kv_cache):
            x, kv = DecoderLayer(c, self.backend, self.param_dtype, name=f"layers_{i}")(x, positions, kv, meta)
            new_cache.append(kv)
        last = jnp.maximum(meta.cu_q_lens[1:] - 1, 0)  # [num_seqs]
        x = x[last]
        if c.final_norm:
            x = Norm(c, self.param_dtype, name="final_norm")(x)
        if c.embed_dim:
            x = nn.Dense(c.embed_dim, use_bias=False, param_dtype=self.param_dtype, dot_general=dot_general,
                         name="project_out")(x)
        if c.tie_word_embeddings:
            logits = dot_general(x, embed.embedding, (((1,), (1,)), ((), ())))
        else:
            logits = nn.Dense(vocab, use_bias=False, param_dtype=self.param_dtype, dot_general=dot_general,
                              name="lm_head")(x)
        return logits[:, : c.vocab_size].astype(jnp.float32), tuple(new_cache)
