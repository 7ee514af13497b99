"""Loading checkpoints: sharded or single-file, any dtype, and clear errors that name the
file or tensor when a checkpoint is not what we serve."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import pytest
import torch
from hf_checkpoints import save_checkpoint
from jax.sharding import PartitionSpec as P
from safetensors.torch import load_file, save_file
from serving import make_llm

from paged_jax import load_model
from paged_jax.model import loader
from paged_jax.model.cache import init_kv_cache
from paged_jax.model.config import from_hf_config


def params_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_sharded_checkpoint_equals_single_file(checkpoint, tmp_path):
    sharded = save_checkpoint("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert params_equal(load_model(sharded).params, load_model(checkpoint("llama")).params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_dtype_takes_the_checkpoint_dtype(tmp_path, dtype):
    path = save_checkpoint("qwen2", tmp_path, dtype=dtype)
    model = load_model(path, dtype="auto")
    expected = jnp.dtype(str(dtype).removeprefix("torch."))
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {expected}
    assert load_model(path, dtype="float32").params["embed"]["embedding"].dtype == jnp.float32


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture.*BertForMaskedLM"):
        load_model(tmp_path)


def test_missing_files_are_named(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    shutil.copy(checkpoint("gpt2") / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_missing_shard_is_named(tmp_path):
    path = save_checkpoint("opt", tmp_path, max_shard_size="40KB")
    shard = sorted(path.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(path)


def test_shape_mismatch_names_tensor_and_file(checkpoint, tmp_path):
    shutil.copytree(checkpoint("llama"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight in model\.safetensors"):
        load_model(tmp_path)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    shutil.copytree(checkpoint("gpt2"), tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight"):
        load_model(tmp_path)


def test_checkpoints_saved_without_the_wrapper_prefix_load(checkpoint, tmp_path):
    shutil.copytree(checkpoint("gpt2"), tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    assert params_equal(load_model(tmp_path).params, load_model(checkpoint("gpt2")).params)


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
     "unsupported rope scaling type 'yarn'"),
    ("hidden_act", "gelu_fast", "unsupported activation"),
])
def test_unsupported_options_are_rejected(checkpoint, tmp_path, field, value, message):
    shutil.copytree(checkpoint("llama"), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_bad_dtype_and_backend_are_rejected(checkpoint):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(checkpoint("gpt2"), dtype="int8")
    with pytest.raises(ValueError, match="unknown attention_backend"):
        load_model(checkpoint("gpt2"), attention_backend="flash")


def test_a_sliding_window_does_not_cap_the_context(checkpoint):
    """Attention honours the window exactly, so the model serves its whole position range."""
    config = load_model(checkpoint("mistral")).config
    assert config.sliding_window == 64 and config.window_of(0) == 64
    assert config.max_model_len == config.max_position_embeddings == 128


def test_one_device_is_a_mesh_of_one(checkpoint):
    """Without a mesh a model lives on a mesh of this process's first device: parameters and
    cache carry the shardings they have on T devices, each shard whole."""
    model = load_model(checkpoint("llama"))
    assert model.mesh.size == 1 and model.mesh.devices.flat[0] == jax.local_devices()[0]
    kernel = model.params["layers_0"]["attn"]["qkv_proj"]["kernel"]
    assert kernel.sharding.spec == P(None, "tp") and kernel.addressable_shards[0].data.shape == kernel.shape
    assert init_kv_cache(model.config, 4, 4, model.dtype, model.mesh)[0][0].sharding.spec == P("tp")


def test_an_engine_reads_the_checkpoint_config_once(checkpoint, monkeypatch):
    """The mesh, the compute dtype and the loader all use the one config the engine read."""
    reads = []
    monkeypatch.setattr(loader, "from_hf_config", lambda hf: reads.append(hf) or from_hf_config(hf))
    make_llm(checkpoint("llama"))
    assert len(reads) == 1
