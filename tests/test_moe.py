"""The mixture-of-experts block (paged_jax/model/moe.py) computes what each expert computes
alone, and both layouts Hugging Face saves experts in load to the same model. Logits and
generation against Hugging Face are in test_models.py and test_engine.py (the MoE variants)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_checkpoints import save_checkpoint

from paged_jax import load_model
from paged_jax.model.config import ModelConfig, from_hf_config
from paged_jax.model.loader import Checkpoint
from paged_jax.model.moe import MoE


def moe_config(num_experts: int, renormalize: bool) -> ModelConfig:
    return ModelConfig(family="llama", architecture="Qwen3MoeForCausalLM", vocab_size=16, hidden_size=16,
                       num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=8,
                       max_position_embeddings=16, activation="silu", norm="rmsnorm", norm_eps=1e-6,
                       gated_mlp=True, num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=12,
                       norm_topk_prob=renormalize, sparse_layers=(0,))


def each_expert_densely(params, x, config: ModelConfig) -> np.ndarray:
    """Every expert on every token, then each token's top-k outputs weighted: no sorting, no groups."""
    width = config.moe_intermediate_size
    logits = x @ np.asarray(params["router"]["kernel"])  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, : config.num_experts_per_tok]  # [T, k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    if config.norm_topk_prob:
        weights /= weights.sum(-1, keepdims=True)
    gate_up = np.asarray(params["experts"]["gate_up_proj"]["kernel"]).reshape(config.num_experts, -1, width, 2)
    down = np.asarray(params["experts"]["down_proj"]["kernel"])  # [E, width, H]
    gate, up = np.einsum("th,ehi->eti", x, gate_up[..., 0]), np.einsum("th,ehi->eti", x, gate_up[..., 1])
    outputs = np.einsum("eti,eih->eth", gate / (1 + np.exp(-gate)) * up, down)  # [E, T, H]
    tokens = np.arange(len(x))[:, None]
    return np.sum(weights[..., None] * outputs[chosen, tokens], axis=1)


@pytest.mark.parametrize("num_tokens, num_experts, renormalize", [(3, 8, True), (16, 4, False)])
def test_grouped_experts_equal_each_expert_applied_alone(rng, num_tokens, num_experts, renormalize):
    """3 tokens x 2 choices leave at least 2 of 8 experts with no rows (empty groups);
    16 tokens over 4 experts give every expert many."""
    config = moe_config(num_experts, renormalize)
    x = rng.standard_normal((num_tokens, config.hidden_size)).astype(np.float32)
    module = MoE(config, jnp.float32)
    params = module.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x)["params"]
    params = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x))
    np.testing.assert_allclose(ours, each_expert_densely(params, x, config), rtol=1e-4, atol=1e-4)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    hf = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=16, hidden_size=16, num_hidden_layers=6,
              num_attention_heads=2, head_dim=8, intermediate_size=24, moe_intermediate_size=8, num_experts=4,
              num_experts_per_tok=2, max_position_embeddings=16, rms_norm_eps=1e-6, decoder_sparse_step=2,
              mlp_only_layers=[3])
    config = from_hf_config(hf)
    assert config.sparse_layers == (1, 5)  # layers 1, 3, 5 by the step; 3 kept dense
    assert (config.intermediate_size, config.moe_intermediate_size, config.norm_topk_prob) == (24, 8, False)
    assert from_hf_config({**hf, "architectures": ["MixtralForCausalLM"], "decoder_sparse_step": 1,
                           "mlp_only_layers": []}).norm_topk_prob  # Mixtral always renormalises


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_fused_and_per_expert_checkpoints_load_the_same_model(tmp_path, variant):
    """Hub checkpoints hold a tensor per expert and projection; transformers 5 can also save
    each layer's experts fused (save_original_format=False)."""
    paths = save_checkpoint(variant, tmp_path / "per_expert"), save_checkpoint(variant, tmp_path / "fused",
                                                                                save_original_format=False)
    assert [any(".experts.0." in key for key in Checkpoint(p).files) for p in paths] == [True, False]
    per_expert, fused = (load_model(p, attention_backend="xla").params for p in paths)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), per_expert, fused))
