"""Tensor and data parallelism (paged_jax/model/sharding.py, engine/data_parallel.py).

The multi-device checks run once, in one subprocess with 4 simulated CPU devices
(tests/parallel_checks.py), so the rest of the suite keeps its single device; each test
below asserts on the facts it reported. The layout arithmetic runs here, on one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax.model import sharding
from paged_jax.model.config import ARCHITECTURES, ModelConfig

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(HERE / "parallel_checks.py"), str(tmp_path_factory.mktemp("tp"))],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["devices"] == 4
    return facts


@pytest.mark.parametrize("variant, tp", [("gpt2", 2), ("gpt2", 4), ("opt", 2), ("opt", 4), ("llama", 2),
                                         ("llama", 4), ("qwen2", 2), ("qwen2", 4), ("odd", 3), ("pallas", 2),
                                         ("qwen3_moe_dense_first", 2), ("gemma2", 2), ("phi3", 2)])
def test_greedy_under_tensor_parallelism_equals_hf(checks, variant, tp):
    """llama has 2 KV heads and qwen2 one: T = 4 replicates them. odd: 6 heads, 2 KV heads,
    intermediate 100, vocabulary 128 on T = 3. qwen3_moe_dense_first: a dense layer, then a
    mixture of experts with each expert split over the devices. gemma2 (soft caps, a sliding
    and a global layer) and phi3 (all sliding, partial rotary, fused checkpoint tensors): one KV
    head per device, past the window. pallas: llama through the Pallas kernels (interpreted)
    under shard_map; the others run the xla backend."""
    assert checks[f"greedy/{variant}/{tp}"]


def test_random_model_is_the_same_on_every_mesh(checks):
    assert checks["random/same_on_1_and_2"]


def test_what_does_not_divide_is_padded_or_replicated(checks):
    assert checks["odd/config"] == [6, 102, 129]  # 3 devices x 2 KV heads; 102 = 3 x 34; 129 = 3 x 43


def test_parameters_and_cache_are_really_split(checks):
    assert checks["sharding/specs"] == {"qkv": "P(None, 'tp')", "o": "P('tp', None)", "gate_up": "P(None, 'tp')",
                                        "down": "P('tp', None)"}
    assert checks["sharding/embed"] == "P('tp', None)"
    assert checks["sharding/cache"] == "P('tp',)"
    assert checks["sharding/cache_shape"][0] == 4 and checks["sharding/cache_shard_shape"][0] == 1
    assert checks["sharding/cache_fraction"] == pytest.approx(1 / 4)
    # Norms are replicated: a little more than a quarter of the parameters on each device.
    assert 0.25 <= checks["sharding/param_fraction"] < 0.27


def test_blocks_come_from_per_device_memory(checks):
    assert checks["blocks/2"] == 2 * checks["blocks/1"]


def test_no_compile_after_warm_up_and_the_cache_is_donated(checks):
    assert checks["compile/after_warmup"] == 0
    assert checks["compile/second_run_backend_compiles"] == 0
    assert checks["compile/donated"]
    assert checks["compile/same_output"]


def test_one_step_all_reduces_twice_per_layer_and_gathers_the_logits(checks):
    """Megatron's communication: after o_proj and after down_proj, plus the vocabulary-split
    embedding; the logits gathered once for the sampler; nothing else moves."""
    assert checks["hlo/num_all_reduce"] == 2 * checks["hlo/num_layers"] + 1
    assert set(checks["hlo/collectives"]) == {"all-reduce", "all-gather"}


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_is_exact_under_tensor_parallelism(checks, mode):
    preemptions, swapped_out, swapped_in = checks[f"preempt/{mode}/stats"]
    assert checks[f"preempt/{mode}/equal"] and preemptions > 0
    assert (swapped_out > 0 and swapped_in == swapped_out) if mode == "swap" else swapped_out == 0


def test_int8_pages_and_their_scales_split_and_swap_exactly_under_tensor_parallelism(checks):
    assert checks["preempt/int8/equal"] and checks["preempt/int8/swapped"] > 0


def test_prefix_caching_is_exact_under_tensor_parallelism(checks):
    assert checks["prefix/equal"] and checks["prefix/hit_rate"] > 0


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_speculative_decoding_under_tensor_parallelism_equals_greedy_without_it(checks, proposer):
    assert checks[f"spec/{proposer}/equal"] and checks[f"spec/{proposer}/accepted"] > 0


@pytest.mark.parametrize("tp", [1, 2])
def test_data_parallel_engines_serve_every_request_in_input_order(checks, tp):
    assert checks[f"dp/{tp}/equal"] and checks[f"dp/{tp}/in_order"]
    assert checks[f"dp/{tp}/devices"] == ([[0], [1]] if tp == 1 else [[0, 1], [2, 3]])
    assert all(checks[f"dp/{tp}/requests_per_engine"])  # the router used both
    assert not checks[f"dp/{tp}/unfinished"]


def test_the_server_engine_loop_drives_the_data_parallel_front(checks):
    served = checks["dp/server"]
    assert served["outputs"] == checks["dp/server_expected"]
    assert served["num_free_blocks"] == served["num_blocks"] == 2 * 128  # both engines' caches, all free again


def test_sizes_that_cannot_work_fail_clearly(checks):
    assert "8 devices, but only 4" in checks["error/{'tensor_parallel_size': 4, 'data_parallel_size': 2}"]
    assert "does not divide the model's 4 attention heads" in checks["error/{'tensor_parallel_size': 3}"]


# -- on one device --------------------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv_heads, tp, expected", [
    (4, 2, 2, (1, 2)), (4, 2, 4, (1, 1)), (4, 1, 4, (1, 1)), (32, 8, 4, (2, 4)), (6, 2, 3, (2, 1)), (6, 6, 3, (2, 1)),
    (8, 1, 2, (1, 4)),
])
def test_kv_layout(heads, kv_heads, tp, expected):
    """(KV heads per device, query heads per KV head): each device's query heads read its
    own KV heads in equal groups."""
    local_kv, group = sharding.kv_layout(heads, kv_heads, tp)
    assert (local_kv, group) == expected
    checkpoint_group = heads // kv_heads
    for device in range(tp):
        for local_q in range(heads // tp):
            q = device * heads // tp + local_q
            virtual = device * local_kv + local_q // group  # what the kernel reads on that device
            first_q_of_virtual = virtual * group
            assert first_q_of_virtual // checkpoint_group == q // checkpoint_group


def test_expanded_kv_heads_pair_each_query_head_with_its_own_kv_head():
    config = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=8, hidden_size=12,
                         num_layers=1, num_heads=6, num_kv_heads=2, head_dim=2, intermediate_size=4,
                         max_position_embeddings=8, activation="silu", norm="rmsnorm", norm_eps=1e-6)
    # Grouped columns [kv head, (3 query heads, k, v), dim]; each entry names its source.
    grouped = np.array([[[100 * kv + 10 * slot + d for d in range(2)] for slot in range(5)] for kv in range(2)])
    expanded = np.asarray(sharding.expand_kv_heads(jnp.asarray(grouped.reshape(-1)), config, 6))
    virtual = expanded.reshape(6, 3, 2)  # 6 virtual KV heads, each (1 query head, k, v)
    for q in range(6):
        kv = q // 3
        assert list(virtual[q, 0]) == [100 * kv + 10 * (q % 3), 100 * kv + 10 * (q % 3) + 1]
        assert list(virtual[q, 1]) == [100 * kv + 30, 100 * kv + 31] and list(virtual[q, 2]) == [100 * kv + 40,
                                                                                                 100 * kv + 41]


def test_partition_rules_cover_every_family():
    for family in set(ARCHITECTURES.values()):
        assert sharding.partition_spec(family, "layers_3/attn/qkv_proj/bias") == sharding.P(sharding.TP)
        assert sharding.partition_spec(family, "layers_3/attn/o_proj/bias") == sharding.P()
        assert sharding.partition_spec(family, "final_norm/scale") == sharding.P()
        assert sharding.partition_spec(family, "embed/embedding", vocab_parallel=False) == sharding.P()
    assert sharding.partition_spec("opt", "layers_0/mlp/fc2/kernel") == sharding.P(sharding.TP, None)
    assert sharding.partition_spec("llama", "layers_0/mlp/gate_up_proj/kernel") == sharding.P(None, sharding.TP)
    assert sharding.partition_spec("phi3", "layers_0/mlp/gate_up_proj/kernel") == sharding.P(None, sharding.TP)
    assert sharding.partition_spec("gpt_neox", "layers_0/mlp/fc1/kernel") == sharding.P(None, sharding.TP)
    assert sharding.partition_spec("llama", "layers_0/attn/q_norm/scale") == sharding.P()  # over head_dim: whole


def test_collective_bytes_reads_compiled_hlo():
    hlo = """
  %all-reduce.1 = f32[16,64]{1,0} all-reduce(%x), channel_id=3, to_apply=%add
  %y = f32[16,64]{1,0} fusion(%all-reduce.1, %p), kind=kLoop
  %all-gather = bf16[2,128]{0,1} all-gather(%c), dimensions={1}
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ard = (f32[8]{0}, f32[8]{0}) all-reduce-done(%ars)
"""
    assert sharding.collective_bytes(hlo) == {"all-reduce": 16 * 64 * 4 + 64, "all-gather": 2 * 128 * 2}
