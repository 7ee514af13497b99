"""Tensor- and data-parallel checks on 4 simulated CPU devices, run once in a subprocess by
tests/test_parallel.py (the rest of the suite keeps one device): every check's facts go to
one JSON document on stdout, and the test module asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/parallel_checks.py TMPDIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from hf_checkpoints import load_reference, save_checkpoint  # noqa: E402
from serving import generate_ids, hf_greedy, make_llm, random_prompts  # noqa: E402

from paged_jax import SamplingParams  # noqa: E402
from paged_jax.model import random_model, sharding  # noqa: E402
from paged_jax.model.cache import SequenceChunk, build_metadata, init_kv_cache  # noqa: E402
from paged_jax.model.config import ModelConfig  # noqa: E402
from paged_jax.worker import loading  # noqa: E402

RNG = np.random.default_rng(13)
PROMPTS = random_prompts(RNG, [5, 23, 11, 2])
TOKENS = 10


def save_odd(directory: Path) -> Path:
    """6 query heads, 2 KV heads, intermediate 100, vocabulary 128: on 3 devices nothing
    divides (KV heads replicated, intermediate and vocabulary padded)."""
    torch.manual_seed(3)
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=128, initializer_range=0.2)
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    return directory


def per_device_bytes(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def total_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def greedy(root: Path, out: dict) -> None:
    """T = 2 and 4 (T = 3 on the odd model) against Hugging Face, per architecture."""
    cases = {"gpt2": (2, 4), "opt": (2, 4), "llama": (2, 4), "qwen2": (2, 4), "odd": (3,),
             "qwen3_moe_dense_first": (2,), "gemma2": (2,), "phi3": (2,)}
    for variant, sizes in cases.items():
        path = root / variant
        save_odd(path) if variant == "odd" else save_checkpoint(variant, path)
        reference = load_reference(path)
        expected = [hf_greedy(reference, p, TOKENS) for p in PROMPTS]
        for tp in sizes:
            llm = make_llm(path, tensor_parallel_size=tp)
            out[f"greedy/{variant}/{tp}"] = generate_ids(llm, PROMPTS) == expected
            if variant == "llama" and tp == 4:
                sharded(llm, out)
            if variant == "llama" and tp == 2:  # the Pallas kernels per shard (interpreted: short)
                short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
                kernels = make_llm(path, tensor_parallel_size=2, attention_backend="pallas_interpret",
                                   num_scheduler_steps=1, num_gpu_blocks_override=16)
                out["greedy/pallas/2"] = generate_ids(kernels, PROMPTS[:2], short) == [e[:4] for e in expected[:2]]
            if variant == "odd":
                config = llm.engine.executor.model.config
                out["odd/config"] = [config.num_kv_heads, config.intermediate_size, config.padded_vocab_size]


def sharded(llm, out: dict) -> None:
    """Parameters and cache really split: specs, and one device's bytes against the whole."""
    engine = llm.engine
    params, cache = engine.executor.model.params, engine.executor.kv_cache
    device = engine.executor.model.mesh.devices.flat[0]
    out["sharding/specs"] = {
        path: str(params[a][b][c][d].sharding.spec) for path, (a, b, c, d) in {
            "qkv": ("layers_0", "attn", "qkv_proj", "kernel"), "o": ("layers_0", "attn", "o_proj", "kernel"),
            "gate_up": ("layers_0", "mlp", "gate_up_proj", "kernel"),
            "down": ("layers_0", "mlp", "down_proj", "kernel")}.items()}
    out["sharding/embed"] = str(params["embed"]["embedding"].sharding.spec)
    out["sharding/cache"] = str(cache[0][0].sharding.spec)
    out["sharding/cache_shard_shape"] = list(cache[0][0].addressable_shards[0].data.shape)
    out["sharding/cache_shape"] = list(cache[0][0].shape)
    out["sharding/param_fraction"] = per_device_bytes(params, device) / total_bytes(params)
    out["sharding/cache_fraction"] = per_device_bytes(cache, device) / total_bytes(cache)
    out["sharding/mesh_size"] = engine.executor.model.mesh.size


def random_models(root: Path, out: dict) -> None:
    """random_model makes the same model on one device and on two (one path)."""
    config = ModelConfig(family="llama", architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         max_position_embeddings=64, activation="silu", norm="rmsnorm", norm_eps=1e-6)
    positions, meta = build_metadata([SequenceChunk([[0, 1]], 0, 7)], 4, max_blocks_per_seq=2)
    logits = []
    for tp in (1, 2):
        model = random_model(config, sharding.make_mesh(jax.devices()[:tp]), attention_backend="xla")
        cache = init_kv_cache(model.config, 2, 4, model.dtype, model.mesh)
        logits.append(np.asarray(model.forward(model.params, np.arange(7, dtype=np.int32), positions, cache, meta)[0]))
    out["random/same_on_1_and_2"] = bool(np.allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5))


def memory_and_compiles(root: Path, out: dict) -> None:
    """Blocks from per-device memory; no compile after warm-up; the cache donated; the
    collectives of one step from its compiled HLO."""
    path = root / "llama"
    loading.CPU_KV_CACHE_BYTES = 1 << 20  # per device; small enough that memory decides
    try:
        for tp in (1, 2):
            llm = make_llm(path, tensor_parallel_size=tp, num_gpu_blocks_override=None, max_num_seqs=64)
            out[f"blocks/{tp}"] = llm.stats()["num_blocks"]
    finally:
        loading.CPU_KV_CACHE_BYTES = 1 << 30
    llm = make_llm(path, tensor_parallel_size=2, warm_up=True, background_compile=False, compilation_cache=False,
                   max_num_seqs=4, max_num_batched_tokens=32, num_scheduler_steps=4)
    generate_ids(llm, PROMPTS)  # first use of the helpers outside the step shapes (as on one device)
    compiles = []

    def count(event, *_, **__):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    before = llm.engine.executor.kv_cache[0][0]
    again = generate_ids(llm, PROMPTS)
    out["compile/after_warmup"] = llm.stats()["compiles_after_warmup"]
    out["compile/second_run_backend_compiles"] = len(compiles)
    out["compile/donated"] = before.is_deleted()
    out["compile/same_output"] = again == generate_ids(make_llm(path), PROMPTS)
    runner = llm.engine.executor
    bucket = runner.mixed_buckets[-1]
    hlo = runner.executables.get(bucket).as_text()
    out["hlo/collectives"] = sharding.collective_bytes(hlo)
    out["hlo/num_all_reduce"] = sum(" all-reduce(" in line for line in hlo.splitlines())
    out["hlo/num_layers"] = llm.engine.executor.model.config.num_layers


def preemption_and_prefix(root: Path, out: dict) -> None:
    """Preemption in both modes (and swapping int8 pages with their scales) and prefix caching
    under T = 2, against T = 1."""
    path = root / "llama"
    prompts = random_prompts(RNG, [9, 14, 6, 12, 8, 10])
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    expected = generate_ids(make_llm(path), prompts, params)
    for mode in ("recompute", "swap"):
        llm = make_llm(path, tensor_parallel_size=2, num_gpu_blocks_override=16, preemption_mode=mode,
                       swap_space=0.001)
        out[f"preempt/{mode}/equal"] = generate_ids(llm, prompts, params) == expected
        stats = llm.stats()
        out[f"preempt/{mode}/stats"] = [stats["num_preemptions"], stats["num_swapped_out_blocks"],
                                        stats["num_swapped_in_blocks"]]
    # int8 pages: their scales split by KV head and swapped with them
    expected = generate_ids(make_llm(path, kv_cache_dtype="int8"), prompts, params)
    llm = make_llm(path, tensor_parallel_size=2, kv_cache_dtype="int8", num_gpu_blocks_override=16,
                   preemption_mode="swap", swap_space=0.001)
    out["preempt/int8/equal"] = generate_ids(llm, prompts, params) == expected
    out["preempt/int8/swapped"] = llm.stats()["num_swapped_out_blocks"]
    shared = random_prompts(RNG, [20, 20, 20])
    for p in shared[1:]:
        p[:12] = shared[0][:12]
    expected = generate_ids(make_llm(path), shared)
    llm = make_llm(path, tensor_parallel_size=2, enable_prefix_caching=True, max_num_seqs=1)
    out["prefix/equal"] = generate_ids(llm, shared) == expected
    out["prefix/hit_rate"] = llm.stats()["prefix_cache_hit_rate"]


def speculative(root: Path, out: dict) -> None:
    """Speculative decoding under T = 2 (n-gram drafts; the embedded model's draft model, its
    one KV head replicated) against T = 1 without it, greedy."""
    models = Path(__file__).parent.parent / "models"
    source = (Path(__file__).parent.parent / "paged_jax" / "kv" / "block_manager.py").read_text()
    prompts = [source[i : i + 160] for i in (source.index("    def grow("), source.index("    def fork("))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    settings = dict(dtype="float32", block_size=8, max_num_batched_tokens=128)

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    expected = run(make_llm(models / "stdlib-llama", **settings))
    for name, config in (("ngram", {"method": "ngram", "num_speculative_tokens": 3}),
                         ("draft", {"model": str(models / "stdlib-llama-draft"), "num_speculative_tokens": 3})):
        llm = make_llm(models / "stdlib-llama", tensor_parallel_size=2, speculative_config=config, **settings)
        out[f"spec/{name}/equal"] = run(llm) == expected
        out[f"spec/{name}/accepted"] = llm.stats()["spec_decode_num_accepted_tokens"]


def data_parallel(root: Path, out: dict) -> None:
    path = root / "llama"
    prompts = random_prompts(RNG, [5, 17, 9, 3, 30, 12, 7])
    expected = generate_ids(make_llm(path), prompts)
    for tp in (1, 2):
        llm = make_llm(path, data_parallel_size=2, tensor_parallel_size=tp)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=10,
                                                                                          ignore_eos=True),
                               use_tqdm=False)
        out[f"dp/{tp}/equal"] = [o.outputs[0].token_ids for o in outputs] == expected
        out[f"dp/{tp}/in_order"] = [o.prompt_token_ids for o in outputs] == prompts
        engines = llm.engine.engines
        out[f"dp/{tp}/devices"] = [sorted(d.id for d in e.executor.model.mesh.devices.flat) for e in engines]
        out[f"dp/{tp}/requests_per_engine"] = [e.scheduler.num_prompt_tokens > 0 for e in engines]
        out[f"dp/{tp}/unfinished"] = llm.engine.has_unfinished_requests()
    out["dp/server"] = served_by_async_engine(llm.engine, prompts[:3])
    out["dp/server_expected"] = expected[:3]
    for kwargs in (dict(tensor_parallel_size=4, data_parallel_size=2), dict(tensor_parallel_size=3)):
        try:
            make_llm(path, **kwargs)
            out[f"error/{kwargs}"] = None
        except ValueError as error:
            out[f"error/{kwargs}"] = str(error)


def served_by_async_engine(front, prompts) -> dict:
    """The server's engine loop (AsyncLLMEngine) over the data-parallel front."""
    import asyncio

    from paged_jax import AsyncLLMEngine

    server = AsyncLLMEngine(front)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    async def one(i, prompt):
        async for output in server.generate({"prompt_token_ids": prompt}, params, f"r{i}"):
            final = output
        return final.outputs[0].token_ids

    async def run():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    try:
        outputs = asyncio.run(run())
        snapshot = server.latest_load
        return {"outputs": outputs, "num_blocks": snapshot.num_blocks, "num_free_blocks": snapshot.num_free_blocks}
    finally:
        server.shutdown()


def main() -> None:
    root = Path(sys.argv[1])
    out, seconds = {"devices": len(jax.devices())}, {}
    for check in (greedy, random_models, memory_and_compiles, preemption_and_prefix, speculative, data_parallel):
        start = time.perf_counter()
        check(root, out)
        seconds[check.__name__] = round(time.perf_counter() - start, 1)
    out["seconds"] = seconds
    print(json.dumps(out))


if __name__ == "__main__":
    main()
