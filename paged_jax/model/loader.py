"""Load a local Hugging Face checkpoint directory into our parameter tree.

Reads `config.json` and `model.safetensors` or sharded `model-0000x-of-0000y.safetensors`
(+ `model.safetensors.index.json`). Tensors are read one at a time and converted (transposed,
fused, cast) as they arrive, then placed on their devices (sharding.placement), so no second
full copy of the weights is ever held. A mapping of rules says, for each of our parameters, which Hugging Face
tensors build it and how; every result is checked against the shape the config implies, and
a mismatch names the tensor and its file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import traverse_util
from safetensors import safe_open

from paged_jax.model.config import ModelConfig, from_hf_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PREFIXES = ("", "model.", "transformer.")  # older checkpoints were saved without the wrapper


def read_config(path: str | Path) -> ModelConfig:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    return from_hf_config(json.loads(file.read_text()))


def resolve_dtype(dtype, config: ModelConfig):
    """`auto` takes the checkpoint's dtype."""
    name = config.dtype if dtype == "auto" else (dtype if isinstance(dtype, str) else jnp.dtype(dtype).name)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


class Checkpoint:
    """The safetensors files of one directory, read tensor by tensor."""

    def __init__(self, path: str | Path):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {key: path / name for key, name in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            single = path / "model.safetensors"
            with safe_open(single, framework="flax") as f:
                self.files = {key: single for key in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path} "
                "(PyTorch .bin checkpoints are not read; re-save with safe_serialization=True)"
            )
        for file in set(self.files.values()):
            if not file.is_file():
                raise FileNotFoundError(f"shard {file.name} listed in the index is missing from {path}")

    def key(self, name: str) -> str:
        for prefix in PREFIXES:
            for candidate in (prefix + name, name.removeprefix(prefix)):
                if candidate in self.files:
                    return candidate
        raise KeyError(f"tensor {name!r} not found in {sorted(set(f.name for f in self.files.values()))}")

    def get(self, name: str) -> jax.Array:
        key = self.key(name)
        with safe_open(self.files[key], framework="flax") as f:
            return f.get_tensor(key)

    def where(self, name: str) -> str:
        key = self.key(name)
        return f"{key} in {self.files[key].name}"


# Per family: the prefix of the model's tensors, its embedding, its final norm, its LM head.
OUTER_NAMES = {
    "gpt2": ("transformer.", "wte", "ln_f", "lm_head"),
    "opt": ("model.decoder.", "embed_tokens", "final_layer_norm", "lm_head"),
    "llama": ("model.", "embed_tokens", "norm", "lm_head"),
    "phi3": ("model.", "embed_tokens", "norm", "lm_head"),
    "gpt_neox": ("gpt_neox.", "embed_in", "final_layer_norm", "embed_out"),
}

# How hub checkpoints name a sparse layer's tensors: its block (router `gate` and `experts`),
# then each expert's gate, up and down projections.
EXPERT_NAMES = {
    "MixtralForCausalLM": ("block_sparse_moe", "w1", "w3", "w2"),
    "Qwen3MoeForCausalLM": ("mlp", "gate_proj", "up_proj", "down_proj"),
}

# A rule: the Hugging Face tensors that build one of our parameters, and how.
Rule = tuple[tuple[str, ...], Callable[..., jax.Array]]


def _linear(*weights):  # torch Linear [out, in] (several fused along out) -> Dense kernel [in, out]
    return jnp.concatenate(weights, axis=0).T if len(weights) > 1 else weights[0].T


def _transposed(weights):  # torch Linear weights stacked [experts, out, in] -> kernels [experts, in, out]
    return weights.swapaxes(-1, -2)


def _stacked(per_expert: int):
    """A tensor per expert and projection, expert by expert -> one [experts, in, out] kernel,
    each expert's `per_expert` projections fused along out as _linear fuses them."""
    def stack(*weights):
        return jnp.stack([_linear(*weights[e : e + per_expert]) for e in range(0, len(weights), per_expert)])
    return stack


def _cat(*arrays):
    return jnp.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]


def _same(array):
    return array


def _qkv(config: ModelConfig, combine):
    """q|k|v columns (or bias entries) -> grouped by KV head: [kv_heads, (group q heads, k, v),
    head_dim], the layout transformer.py splits (so a split of the columns over devices
    is a split by heads)."""
    def grouped(*arrays):
        x = combine(*arrays)
        lead, d, kv = x.shape[:-1], config.head_dim, config.num_kv_heads
        group = config.num_heads // kv
        q = x[..., : kv * group * d].reshape(*lead, kv, group, d)
        k, v = (x[..., kv * (group + i) * d : kv * (group + i + 1) * d].reshape(*lead, kv, 1, d) for i in (0, 1))
        return jnp.concatenate([q, k, v], axis=-2).reshape(x.shape)
    return grouped


def _pairs(combine):
    """gate|up columns -> (gate_i, up_i) pairs, so a split of the columns keeps pairs together."""
    def paired(*arrays):
        x = combine(*arrays)
        return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2).swapaxes(-1, -2).reshape(x.shape)
    return paired


def _dense(rules, ours: str, hf: tuple[str, ...], kernel_fn, bias: bool, layout=None):
    """layout (_qkv, _pairs): how the fused output columns are ordered, kernel and bias alike."""
    layout = layout or (lambda combine: combine)
    rules[f"{ours}/kernel"] = (tuple(k + ".weight" for k in hf), layout(kernel_fn))
    if bias:
        rules[f"{ours}/bias"] = (tuple(k + ".bias" for k in hf), layout(_cat))


def _norm(rules, ours: str, hf: str, config: ModelConfig):
    rules[f"{ours}/scale"] = ((hf + ".weight",), _same)
    if config.norm == "layernorm":
        rules[f"{ours}/bias"] = ((hf + ".bias",), _same)


def _experts(rules, ours: str, hf: str, config: ModelConfig, fused: bool):
    """A sparse layer's router and stacked experts (moe.py), gate/up as (gate, up) pairs. Hub
    checkpoints hold a tensor per expert and projection; transformers 5 can also save them
    fused (save_original_format=False): gate|up as one [experts, 2 * width, hidden] tensor,
    down as one [experts, hidden, width], under `mlp` whatever the architecture."""
    if fused:
        rules[f"{ours}/router/kernel"] = ((f"{hf}.mlp.gate.weight",), _linear)
        rules[f"{ours}/experts/gate_up_proj/kernel"] = ((f"{hf}.mlp.experts.gate_up_proj",), _pairs(_transposed))
        rules[f"{ours}/experts/down_proj/kernel"] = ((f"{hf}.mlp.experts.down_proj",), _transposed)
        return
    block, gate, up, down = EXPERT_NAMES[config.architecture]
    experts = [f"{hf}.{block}.experts.{e}" for e in range(config.num_experts)]
    rules[f"{ours}/router/kernel"] = ((f"{hf}.{block}.gate.weight",), _linear)
    rules[f"{ours}/experts/gate_up_proj/kernel"] = (tuple(f"{x}.{p}.weight" for x in experts for p in (gate, up)),
                                                    _pairs(_stacked(2)))
    rules[f"{ours}/experts/down_proj/kernel"] = (tuple(f"{x}.{down}.weight" for x in experts), _stacked(1))


def weight_rules(config: ModelConfig, fused_experts: bool = False) -> dict[str, Rule]:
    """Our parameter path ('layers_0/attn/qkv_proj/kernel') -> its rule. fused_experts: the
    checkpoint saves each sparse layer's experts fused (_experts)."""
    c, rules = config, {}
    qkv_layout = functools.partial(_qkv, c)
    for i in range(c.num_layers):
        ours = f"layers_{i}"
        if c.family == "gpt2":  # Conv1D weights are already [in, out]
            hf = f"transformer.h.{i}"
            _dense(rules, f"{ours}/attn/qkv_proj", (f"{hf}.attn.c_attn",), _same, True, qkv_layout)
            _dense(rules, f"{ours}/attn/o_proj", (f"{hf}.attn.c_proj",), _same, True)
            _dense(rules, f"{ours}/mlp/fc1", (f"{hf}.mlp.c_fc",), _same, True)
            _dense(rules, f"{ours}/mlp/fc2", (f"{hf}.mlp.c_proj",), _same, True)
            _norm(rules, f"{ours}/attn_norm", f"{hf}.ln_1", c)
            _norm(rules, f"{ours}/mlp_norm", f"{hf}.ln_2", c)
        elif c.family == "opt":
            hf = f"model.decoder.layers.{i}"
            qkv = tuple(f"{hf}.self_attn.{p}_proj" for p in "qkv")
            _dense(rules, f"{ours}/attn/qkv_proj", qkv, _linear, c.qkv_bias, qkv_layout)
            _dense(rules, f"{ours}/attn/o_proj", (f"{hf}.self_attn.out_proj",), _linear, c.out_bias)
            _dense(rules, f"{ours}/mlp/fc1", (f"{hf}.fc1",), _linear, c.mlp_bias)
            _dense(rules, f"{ours}/mlp/fc2", (f"{hf}.fc2",), _linear, c.mlp_bias)
            _norm(rules, f"{ours}/attn_norm", f"{hf}.self_attn_layer_norm", c)
            _norm(rules, f"{ours}/mlp_norm", f"{hf}.final_layer_norm", c)
        elif c.family == "gpt_neox":  # query_key_value's columns are (q, k, v) per head: our layout
            hf = f"gpt_neox.layers.{i}"
            _dense(rules, f"{ours}/attn/qkv_proj", (f"{hf}.attention.query_key_value",), _linear, c.qkv_bias)
            _dense(rules, f"{ours}/attn/o_proj", (f"{hf}.attention.dense",), _linear, c.out_bias)
            _dense(rules, f"{ours}/mlp/fc1", (f"{hf}.mlp.dense_h_to_4h",), _linear, c.mlp_bias)
            _dense(rules, f"{ours}/mlp/fc2", (f"{hf}.mlp.dense_4h_to_h",), _linear, c.mlp_bias)
            _norm(rules, f"{ours}/attn_norm", f"{hf}.input_layernorm", c)
            _norm(rules, f"{ours}/mlp_norm", f"{hf}.post_attention_layernorm", c)
        else:  # llama, phi3
            hf = f"model.layers.{i}"
            attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
            if c.family == "phi3":  # q|k|v and gate|up saved as one tensor each
                qkv, gate_up = (f"{attn}.qkv_proj",), (f"{mlp}.gate_up_proj",)
            else:
                qkv, gate_up = tuple(f"{attn}.{p}_proj" for p in "qkv"), (f"{mlp}.gate_proj", f"{mlp}.up_proj")
            _dense(rules, f"{ours}/attn/qkv_proj", qkv, _linear, c.qkv_bias, qkv_layout)
            _dense(rules, f"{ours}/attn/o_proj", (f"{attn}.o_proj",), _linear, c.out_bias)
            if c.qk_norm:
                _norm(rules, f"{ours}/attn/q_norm", f"{attn}.q_norm", c)
                _norm(rules, f"{ours}/attn/k_norm", f"{attn}.k_norm", c)
            if i in c.sparse_layers:
                _experts(rules, f"{ours}/mlp", hf, c, fused_experts)
            else:
                _dense(rules, f"{ours}/mlp/gate_up_proj", gate_up, _linear, c.mlp_bias, _pairs)
                _dense(rules, f"{ours}/mlp/down_proj", (f"{mlp}.down_proj",), _linear, c.mlp_bias)
            _norm(rules, f"{ours}/attn_norm", f"{hf}.input_layernorm", c)
            if c.sandwich_norms:  # Gemma's post_attention_layernorm normalises the attention output
                _norm(rules, f"{ours}/attn_out_norm", f"{hf}.post_attention_layernorm", c)
                _norm(rules, f"{ours}/mlp_norm", f"{hf}.pre_feedforward_layernorm", c)
                _norm(rules, f"{ours}/mlp_out_norm", f"{hf}.post_feedforward_layernorm", c)
            else:
                _norm(rules, f"{ours}/mlp_norm", f"{hf}.post_attention_layernorm", c)

    top, embed, final, head = OUTER_NAMES[c.family]
    rules["embed/embedding"] = ((f"{top}{embed}.weight",), _same)
    if c.learned_positions:
        table = "wpe" if c.family == "gpt2" else "embed_positions"
        rules["positions/embedding"] = ((f"{top}{table}.weight",), _same)
    if c.final_norm:
        _norm(rules, "final_norm", top + final, c)
    if c.embed_dim:
        _dense(rules, "project_in", (f"{top}project_in",), _linear, False)
        _dense(rules, "project_out", (f"{top}project_out",), _linear, False)
    if not c.tie_word_embeddings:
        _dense(rules, "lm_head", (head,), _linear, False)
    return rules


def load_params(checkpoint: Checkpoint, config: ModelConfig, expected: dict, dtype,
                place: Callable[[str, jax.Array], jax.Array]) -> dict:
    """Build every parameter by its rule, checking it against `expected` (path -> shape).
    place(path, array) -> array puts each one where it lives (its shards on their devices) as
    soon as it is built."""
    fused_experts = any(key.endswith(".experts.gate_up_proj") for key in checkpoint.files)
    rules = weight_rules(config, fused_experts)
    assert set(rules) == set(expected), sorted(set(rules) ^ set(expected))
    flat = {}
    for path, (keys, combine) in rules.items():
        try:
            value = combine(*(checkpoint.get(k) for k in keys))
        except KeyError as error:
            raise ValueError(f"checkpoint is missing a weight for {config.architecture}: {error.args[0]}") from None
        if value.shape != tuple(expected[path]):
            sources = ", ".join(checkpoint.where(k) + f" {tuple(checkpoint.get(k).shape)}" for k in keys)
            raise ValueError(f"shape mismatch: {sources} give {tuple(value.shape)} for {path}, "
                             f"but config.json implies {tuple(expected[path])}")
        value = value.astype(dtype)
        flat[tuple(path.split("/"))] = place(path, value)
    return traverse_util.unflatten_dict(flat)
