"""ModelConfig: one description of every architecture we serve, read from a Hugging Face
`config.json`.

GPT-2, OPT, GPT-NeoX, the Llama family (Llama 2/3, Mistral, Qwen2/3, Phi-3, and the mixtures
of experts Mixtral and Qwen3-MoE) and Gemma 2/3 differ only in a handful of switches: how
positions enter (learned table, rotary over all or part of each head), which norm and where,
which MLP (and which layers' MLP is a mixture of experts), which biases, which layers attend
through a sliding window, how scores and logits are scaled and capped, and whether the LM head
is tied. The model code branches on these fields, never on the architecture's name: what an
architecture implies without writing it in its config.json is in IMPLIED, applied here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "llama",
    "Gemma2ForCausalLM": "llama",
    "Gemma3ForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",  # Llama's math, q|k|v and gate|up saved fused
    "GPTNeoXForCausalLM": "gpt_neox",
}
# Switches an architecture implies that its config.json does not write.
IMPLIED = {
    "Qwen2ForCausalLM": dict(qkv_bias=True),
    "Qwen3ForCausalLM": dict(qk_norm=True),
    "Qwen3MoeForCausalLM": dict(qk_norm=True),
    "MixtralForCausalLM": dict(norm_topk_prob=True),  # Mixtral has no switch: it always renormalises
    "Gemma2ForCausalLM": dict(norm_offset=1.0, sandwich_norms=True, scale_embeddings=True),
    "Gemma3ForCausalLM": dict(norm_offset=1.0, sandwich_norms=True, scale_embeddings=True, qk_norm=True),
}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
SLIDING_PATTERNS = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}  # configs without layer_types


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "gpt2" | "opt" | "llama" | "phi3" | "gpt_neox": how the checkpoint names its tensors
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
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight), in float32
    sandwich_norms: bool = False  # Gemma: attention and MLP outputs normalised before each residual add
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm1(x)) + mlp(norm2(x))
    final_norm: bool = True
    gated_mlp: bool = False  # Llama's SwiGLU: down(act(gate(x)) * up(x))
    qk_norm: bool = False  # queries and keys normalised per head (over head_dim) before rotary
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # A mixture of experts (moe.py; Mixtral, Qwen3-MoE): in each of sparse_layers the MLP is
    # num_experts SwiGLU experts of width moe_intermediate_size, of which each token takes
    # the num_experts_per_tok its router ranks highest, weighted by the router's probabilities,
    # renormalised over the chosen experts when norm_topk_prob. Other layers keep the MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    learned_positions: bool = False  # a position table instead of rotary embeddings
    position_offset: int = 0  # OPT's table starts at index 2
    embed_dim: int | None = None  # OPT-350m: embeddings narrower than the model, projected in/out
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), rounded to the dtype
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    rotary_dim: int | None = None  # partial rotary (GPT-NeoX, Phi-3): the leading dims of a head rotated
    local_rope_theta: float | None = None  # Gemma 3: sliding-window layers' own base, unscaled
    sliding_window: int | None = None
    # Per layer, "full_attention" or "sliding_attention" (the last sliding_window tokens). Left
    # empty, every layer slides when there is a window (Mistral, Phi-3).
    layer_types: tuple[str, ...] = ()
    attn_scale: float | None = None  # the scores' scale; None: head_dim ** -0.5
    attn_soft_cap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_soft_cap: float | None = None  # the same on the logits
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's dtype
    # Rows of the embedding / columns of the LM head when the vocabulary is split over devices
    # and padded to a multiple of them (sharding.py); logits are cut back to vocab_size.
    padded_vocab_size: int | None = None

    def __post_init__(self):
        if not self.layer_types:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            object.__setattr__(self, "layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ValueError(f"layer_types {self.layer_types} must name one of {LAYER_TYPES} for each of "
                             f"the {self.num_layers} layers")

    @property
    def max_model_len(self) -> int:
        """Longest context the model serves: its positions. Sliding windows are exact at any length."""
        return self.max_position_embeddings

    def window_of(self, layer: int) -> int | None:
        """How many of the latest tokens a layer's queries see; None: their whole context."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def rope_inv_freq(self, layer: int) -> np.ndarray:
        """A layer's rotary inverse frequencies [rotary_dim // 2], with the checkpoint's scaling
        (Gemma 3's sliding layers turn at their own base, unscaled)."""
        dim = self.rotary_dim or self.head_dim
        if self.local_rope_theta and self.layer_types[layer] == "sliding_attention":
            return _inv_freq(self.local_rope_theta, dim)
        inv_freq = _inv_freq(self.rope_theta, dim)
        kind = self.rope_scaling.get("rope_type", "default")
        if kind == "linear":
            return inv_freq / self.rope_scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, self.rope_scaling)
        return inv_freq


def _inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


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


def _rope(hf: dict) -> tuple[float, dict, float | None]:
    """(theta, scaling, sliding layers' theta or None) from the transformers-5 `rope_parameters`
    (one dict, or Gemma 3's one per layer type) or the older `rope_theta` (GPT-NeoX:
    `rotary_emb_base`), `rope_scaling` and `rope_local_base_freq` fields."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:
        theta, scaling = _rope_of(params["full_attention"], {}, 10000.0)
        local_theta, local_scaling = _rope_of(params.get("sliding_attention") or {}, {}, theta)
        if local_scaling:
            raise ValueError("rope scaling on sliding-window layers is not supported")
        return theta, scaling, local_theta
    base = hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    theta, scaling = _rope_of(params, hf.get("rope_scaling") or {}, base)
    return theta, scaling, hf.get("rope_local_base_freq")


def _rope_of(params: dict, older: dict, theta: float) -> tuple[float, dict]:
    """(theta, scaling) of one set of rope parameters, over the older `rope_scaling`."""
    merged = {**older, **params}
    theta = merged.pop("rope_theta", theta)
    merged.pop("partial_rotary_factor", None)  # not a scaling: _rotary_dim reads it
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: {ROPE_TYPES}")
    merged["rope_type"] = kind
    return float(theta), merged if kind != "default" else {}


def _rotary_dim(hf: dict, head_dim: int) -> int | None:
    """How many leading dims of each head turn (None: all); the fraction is `partial_rotary_factor`
    (in `rope_parameters` since transformers 5) or GPT-NeoX's older `rotary_pct`."""
    params = hf.get("rope_parameters") or {}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    dim = int(head_dim * fraction)
    return dim if dim != head_dim else None


def _layer_types(hf: dict, arch: str, window: int | None) -> tuple[str, ...]:
    """transformers 5 writes `layer_types`. Older configs: Qwen2/3 slide from layer
    `max_window_layers` on, Gemma makes every n-th layer global (n = `sliding_window_pattern`).
    Empty: ModelConfig decides from the window alone."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    layers = range(hf["num_hidden_layers"])
    if window and "max_window_layers" in hf:
        return tuple("sliding_attention" if i >= hf["max_window_layers"] else "full_attention" for i in layers)
    pattern = hf.get("sliding_window_pattern") or SLIDING_PATTERNS.get(arch)
    if not pattern:
        return ()
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in layers)


def _experts(hf: dict) -> dict:
    """The mixture-of-experts fields (none for a dense model). Mixtral's experts are
    `intermediate_size` wide, in every layer. Qwen3-MoE's are `moe_intermediate_size` wide, and
    a layer is sparse when it is a multiple of `decoder_sparse_step` (counting from 1) and not
    in `mlp_only_layers`; the others keep a dense MLP."""
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not num_experts:
        return {}
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    return dict(
        num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        norm_topk_prob=hf.get("norm_topk_prob", False),
        sparse_layers=tuple(i for i in range(hf["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense),
    )


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
        tie_word_embeddings=hf.get("tie_word_embeddings", family in ("gpt2", "opt")),
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
    elif family == "gpt_neox":
        heads, bias = hf["num_attention_heads"], hf.get("attention_bias", True)
        theta, scaling, _ = _rope(hf)
        config = ModelConfig(
            family=family, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=heads, head_dim=hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
            activation=hf.get("hidden_act", "gelu"), norm="layernorm", norm_eps=hf["layer_norm_eps"],
            parallel_residual=hf.get("use_parallel_residual", True), qkv_bias=bias, out_bias=bias, mlp_bias=True,
            rope_theta=theta, rope_scaling=scaling, rotary_dim=_rotary_dim(hf, hf["hidden_size"] // heads),
            **common,
        )
    else:  # Llama's config fields: llama, phi3
        if hf.get("use_bidirectional_attention"):
            raise ValueError("bidirectional attention (use_bidirectional_attention) is not supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        theta, scaling, local_theta = _rope(hf)
        # Qwen2/3 may write a window that use_sliding_window turns off.
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        scalar = hf.get("query_pre_attn_scalar")
        config = ModelConfig(
            family=family, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            activation=hf.get("hidden_activation") or hf.get("hidden_act", "silu"), norm="rmsnorm",
            norm_eps=hf["rms_norm_eps"], gated_mlp=True, qkv_bias=hf.get("attention_bias", False),
            out_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            rope_theta=theta, rope_scaling=scaling, rotary_dim=_rotary_dim(hf, head_dim),
            local_rope_theta=local_theta, sliding_window=window, layer_types=_layer_types(hf, arch, window),
            attn_scale=scalar**-0.5 if scalar else None, attn_soft_cap=hf.get("attn_logit_softcapping"),
            final_soft_cap=hf.get("final_logit_softcapping"), **_experts(hf), **common,
        )
    config = dataclasses.replace(config, **IMPLIED.get(arch, {}))
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {config.activation!r}; supported: {ACTIVATIONS}")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_attention_heads {config.num_heads} is not a multiple of "
                         f"num_key_value_heads {config.num_kv_heads}")
    return config
