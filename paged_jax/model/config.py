"""ModelConfig: one description of every architecture we serve, read from a Hugging Face
`config.json`.

GPT-2, OPT and the Llama family (Llama 2/3, Mistral, Qwen2) differ only in a handful of
switches: how positions enter (learned table or rotary), which norm and where, which MLP, which
biases, and whether the LM head is tied. The model code branches on these fields, never on
the architecture's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gpt2" | "opt" | "llama"
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    activation: str
    norm: str  # "layernorm" | "rmsnorm"
    norm_eps: float
    pre_norm: bool = True  # False: OPT-350m normalises after each residual add
    final_norm: bool = True
    gated_mlp: bool = False  # Llama's SwiGLU: down(act(gate(x)) * up(x))
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    learned_positions: bool = False  # a position table instead of rotary embeddings
    position_offset: int = 0  # OPT's table starts at index 2
    embed_dim: int | None = None  # OPT-350m: embeddings narrower than the model, projected in/out
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's dtype
    # Rows of the embedding / columns of the LM head when the vocabulary is split over devices
    # and padded to a multiple of them (sharding.py); logits are cut back to vocab_size.
    padded_vocab_size: int | None = None

    @property
    def max_model_len(self) -> int:
        """Longest context the model serves exactly. Attention is global, so a model with a
        sliding window is exact up to its window only."""
        return min(self.max_position_embeddings, self.sliding_window or math.inf)

    def rope_inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2], with the checkpoint's scaling."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        kind = self.rope_scaling.get("rope_type", "default")
        if kind == "linear":
            return inv_freq / self.rope_scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, self.rope_scaling)
        return inv_freq


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    interpolation between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either the transformers-5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {ROPE_TYPES}")
    merged["rope_type"] = kind
    return float(theta), merged if kind != "default" else {}


def from_hf_config(hf: dict) -> ModelConfig:
    """Normalise a Hugging Face config.json dict; unsupported models fail with the reason."""
    architectures = hf.get("architectures") or []
    arch = next((a for a in architectures if a in ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"unsupported architecture {architectures or hf.get('model_type')!r}; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[arch]
    common = dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        tie_word_embeddings=hf.get("tie_word_embeddings", family != "llama"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        bos_token_id=hf.get("bos_token_id"),
        dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
    if family == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                             "reorder_and_upcast_attn are not supported")
        hidden = hf["n_embd"]
        config = ModelConfig(
            family=family, hidden_size=hidden, num_layers=hf["n_layer"], num_heads=hf["n_head"],
            num_kv_heads=hf["n_head"], head_dim=hidden // hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=hf["n_positions"], activation=hf["activation_function"],
            norm="layernorm", norm_eps=hf["layer_norm_epsilon"], qkv_bias=True, out_bias=True,
            mlp_bias=True, learned_positions=True, **common,
        )
    elif family == "opt":
        hidden = hf["hidden_size"]
        embed_dim = hf.get("word_embed_proj_dim", hidden)
        pre_norm = hf.get("do_layer_norm_before", True)
        bias = hf.get("enable_bias", True)
        config = ModelConfig(
            family=family, hidden_size=hidden, num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_attention_heads"],
            head_dim=hidden // hf["num_attention_heads"], intermediate_size=hf["ffn_dim"],
            max_position_embeddings=hf["max_position_embeddings"],
            activation=hf.get("activation_function", "relu"), norm="layernorm", norm_eps=1e-5,
            pre_norm=pre_norm, final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
            qkv_bias=bias, out_bias=bias, mlp_bias=bias, learned_positions=True, position_offset=2,
            embed_dim=embed_dim if embed_dim != hidden else None, **common,
        )
    else:
        heads = hf["num_attention_heads"]
        theta, scaling = _rope(hf)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if is_qwen2 and not hf.get("use_sliding_window", False):
            window = None
        config = ModelConfig(
            family=family, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            activation=hf.get("hidden_act", "silu"), norm="rmsnorm", norm_eps=hf["rms_norm_eps"],
            gated_mlp=True, qkv_bias=is_qwen2 or hf.get("attention_bias", False),
            out_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            rope_theta=theta, rope_scaling=scaling, sliding_window=window, **common,
        )
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {config.activation!r}; supported: {ACTIVATIONS}")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_attention_heads {config.num_heads} is not a multiple of "
                         f"num_key_value_heads {config.num_kv_heads}")
    return config
