"""One decoder-only transformer for GPT-2, OPT, GPT-NeoX, the Llama family and Gemma, on the
paged KV cache.

The architectures share every code path where their math is the same; `ModelConfig` switches
select the differences (positions, norm kind and placement, residual shape, MLP shape (dense,
or a mixture of experts on sparse layers: moe.py), biases, score and logit scaling, tied head).
Attention runs over a ragged batch: each sequence contributes any number of new tokens (a
prompt, a prompt chunk, one decode token), writes their K/V into their cache slots, and attends
to its cached context (the whole of it, or the last `sliding_window` tokens on a sliding layer)
through the chosen kernel backend.

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

from paged_jax.model.cache import AttentionMetadata, KVCache, KVPool, layout_of
from paged_jax.model.config import ModelConfig
from paged_jax.model.moe import MoE
from paged_jax.model.numerics import ACTIVATION_FNS, dot_general
from pallas_kernels import AttentionBackend


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32 as Hugging Face does, cast back after. Llama's
    RMSNorm casts before it scales; Gemma's scales by (norm_offset + weight), then casts."""

    config: ModelConfig
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [T, H] -> [T, H]
        c = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if c.norm == "rmsnorm":
            normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.norm_eps)
            if c.norm_offset:
                return (normed * (c.norm_offset + scale.astype(jnp.float32))).astype(x.dtype)
            return scale * normed.astype(x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * lax.rsqrt(var + c.norm_eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, Hugging Face's half-split convention, over the leading 2 * len(inv_freq)
    dims of each head; the rest pass through (partial rotary). x [T, heads, D], positions [T]."""
    rotary = 2 * len(inv_freq)
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)  # [T, rotary/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x[..., :rotary].astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary:]], axis=-1)


class Attention(nn.Module):
    config: ModelConfig
    backend: AttentionBackend
    param_dtype: jnp.dtype
    layer: int  # which layer: its window and its rotary frequencies

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
        if c.qk_norm:
            q = Norm(c, self.param_dtype, name="q_norm")(q)
            k = Norm(c, self.param_dtype, name="k_norm")(k)
        if not c.learned_positions:
            inv_freq = c.rope_inv_freq(self.layer)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        kv = KVPool(*self.backend.write_kv(kv.k, kv.v, k, v, meta.slot_mapping, kv.k_scales, kv.v_scales))
        out = self.backend.ragged_paged_attention(
            q, kv.k, kv.v, meta.block_tables, meta.context_lens, meta.cu_q_lens, k_scales=kv.k_scales,
            v_scales=kv.v_scales, max_q_len=meta.max_q_len, sm_scale=c.attn_scale,
            sliding_window=c.window_of(self.layer), soft_cap=c.attn_soft_cap,
        )  # [T, Hq, D]
        out = nn.Dense(c.hidden_size, use_bias=c.out_bias, param_dtype=self.param_dtype, dot_general=dot_general,
                       name="o_proj")(out.reshape(num_tokens, q_size))
        return out, kv


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
    layer: int

    @nn.compact
    def __call__(self, x, positions, kv, meta):
        c = self.config
        attn = Attention(c, self.backend, self.param_dtype, self.layer, name="attn")
        mlp = (MoE if self.layer in c.sparse_layers else MLP)(c, self.param_dtype, name="mlp")
        attn_norm = Norm(c, self.param_dtype, name="attn_norm")
        mlp_norm = Norm(c, self.param_dtype, name="mlp_norm")

        def out_norm(name):  # Gemma normalises each branch's output before it joins the residual
            return Norm(c, self.param_dtype, name=name) if c.sandwich_norms else (lambda h: h)

        if c.pre_norm:
            h, kv = attn(attn_norm(x), positions, kv, meta)
            if c.parallel_residual:  # GPT-NeoX: both branches read the layer's input
                return x + h + mlp(mlp_norm(x)), kv
            x = x + out_norm("attn_out_norm")(h)
            return x + out_norm("mlp_out_norm")(mlp(mlp_norm(x))), kv
        h, kv = attn(x, positions, kv, meta)  # OPT-350m: normalise after each residual add
        x = attn_norm(x + h)
        return mlp_norm(x + mlp(x)), kv


class CausalLM(nn.Module):
    """`apply({'params': p}, tokens, positions, kv_cache, meta, logit_rows=None) -> (logits, kv_cache)`.

    tokens, positions: int32[num_tokens]. Logits (float32 [len(logit_rows), vocab]) only for
    the tokens at logit_rows (int32 indices into tokens); by default each sequence's last
    token in the batch, the one that is sampled, since a whole prompt's logits would cost a
    [prompt_len, vocab] product for nothing. A prompt's own logprobs
    (SamplingParams.prompt_logprobs) are what asks for every token's."""

    config: ModelConfig
    backend: AttentionBackend
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, kv_cache: KVCache, meta: AttentionMetadata, logit_rows=None):
        c = self.config
        vocab = c.padded_vocab_size or c.vocab_size  # padded: a multiple of the devices it is split over
        embed = nn.Embed(vocab, c.embed_dim or c.hidden_size, param_dtype=self.param_dtype,
                         name="embed")
        x = embed(tokens)
        if c.scale_embeddings:  # by sqrt(hidden_size) rounded to the dtype, as Gemma does
            x = x * jnp.asarray(c.hidden_size**0.5, x.dtype)
        if c.embed_dim:
            x = nn.Dense(c.hidden_size, use_bias=False, param_dtype=self.param_dtype, dot_general=dot_general,
                         name="project_in")(x)
        if c.learned_positions:
            table = nn.Embed(c.max_position_embeddings + c.position_offset, c.hidden_size,
                             param_dtype=self.param_dtype, name="positions")
            x = x + table(positions + c.position_offset)
        layout, cache = layout_of(c), list(kv_cache)
        for i in range(c.num_layers):  # each layer reads its KV group's tables and writes its pool
            pool, group = layout.pool_of[i], meta.group(layout.group_of[i])
            x, cache[pool] = DecoderLayer(c, self.backend, self.param_dtype, i, name=f"layers_{i}")(
                x, positions, cache[pool], group)
        if logit_rows is None:
            logit_rows = jnp.maximum(meta.cu_q_lens[1:] - 1, 0)  # [num_seqs]: each sequence's last token
        x = x[logit_rows]
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
        if c.final_soft_cap:
            logits = c.final_soft_cap * jnp.tanh(logits / c.final_soft_cap)
        return logits[:, : c.vocab_size].astype(jnp.float32), tuple(cache)
