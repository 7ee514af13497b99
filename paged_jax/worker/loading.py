"""How an engine's model runner comes to be: the checkpoint loaded onto the engine's mesh, and
the KV cache sized from what the devices have left (vLLM's worker does the same before the
engine plans anything with the number of blocks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from paged_jax.engine_args import EngineArgs
from paged_jax.model import load_model, sharding
from paged_jax.model.cache import kv_cache_bytes_per_block, kv_dtype
from paged_jax.model.config import ModelConfig
from paged_jax.model.loader import read_config
from paged_jax.worker.compilation import configure_persistent_cache
from paged_jax.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)
CPU_KV_CACHE_BYTES = 1 << 30  # the cache budget where there is no accelerator memory to measure


def load_runner(args: EngineArgs, devices: Sequence[jax.Device] | None, max_num_batched_tokens: int,
                eos_token_ids: tuple[int, ...], blocks: tuple[int, int] | None = None) -> ModelRunner:
    """The model of args.model on its tensor_parallel_size devices (`devices`, else the first
    ones) and a KV cache sized for them. eos_token_ids: the tokenizer's, when it has some (else
    the checkpoint's are used). blocks: (device, host) blocks of the cache, instead of sizing it
    (a draft model's cache has its target's block ids). With a draft model in
    args.speculative_config, the target's cache leaves room for the draft's pages of its blocks."""
    cache_dir = configure_persistent_cache(args.compilation_cache)
    checkpoint = read_config(args.model)
    mesh = sharding.engine_mesh(args, checkpoint, devices)
    model = load_model(args.model, mesh, config=checkpoint, dtype=_compute_dtype(args.dtype, checkpoint),
                       attention_backend=args.attention_backend)
    config = model.config
    max_model_len = args.max_model_len or config.max_model_len
    if max_model_len > config.max_model_len:
        raise ValueError(f"max_model_len {max_model_len} exceeds what the model serves exactly "
                         f"({config.max_model_len}: its position range)")
    page_dtype = model.page_dtype(args.kv_cache_dtype)
    bytes_per_block = kv_cache_bytes_per_block(config, args.block_size, page_dtype)
    speculative = args.speculative()
    if speculative and speculative.model:  # its draft's pages of every block, in the same memory
        bytes_per_block += kv_cache_bytes_per_block(read_config(speculative.model), args.block_size, page_dtype)
    bfloat16_bytes = kv_cache_bytes_per_block(config, args.block_size, jnp.bfloat16)
    # Each device holds its share of every block's KV heads: T devices hold ~T times the blocks.
    num_blocks = args.num_gpu_blocks_override or _num_blocks(
        args, mesh.devices.flat[0], config, bytes_per_block // args.tensor_parallel_size, max_model_len,
        max_num_batched_tokens)
    num_swap_blocks = int(args.swap_space * (1 << 30)) // bytes_per_block if args.preemption_mode == "swap" else 0
    if blocks:
        num_blocks, num_swap_blocks = blocks
    logger.info("%s: %s %s, %s attention, max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d",
                args.model, config.architecture, jnp.dtype(model.dtype).name, model.module.backend.name,
                max_model_len, args.max_num_seqs, max_num_batched_tokens)
    logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), %s pages (%.2fx the blocks of bfloat16 "
                "pages in the same memory), %s memory manager; compilation cache %s",
                num_blocks, args.block_size, num_blocks * args.block_size, num_blocks * bytes_per_block / 2**20,
                kv_dtype(args.kv_cache_dtype, model.dtype).name, bfloat16_bytes / bytes_per_block,
                args.memory_manager, cache_dir or "off")
    return ModelRunner(model, num_blocks=num_blocks, block_size=args.block_size, num_swap_blocks=num_swap_blocks,
                       page_dtype=page_dtype, kv_bytes_per_block=bytes_per_block,
                       max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_model_len, eos_token_ids=eos_token_ids or config.eos_token_ids,
                       num_speculative_tokens=speculative.num_speculative_tokens if speculative else 0)


def _num_blocks(args: EngineArgs, device: jax.Device, config: ModelConfig, bytes_per_block: int, max_model_len: int,
                max_num_batched_tokens: int) -> int:
    """From free accelerator memory x gpu_memory_utilization, less room for activations;
    on a CPU from a fixed budget. Never more than max_num_seqs full contexts need.
    bytes_per_block and the budget are per device."""
    stats = device.memory_stats() if device.platform == "gpu" else None
    if stats:
        activations = 8 * max_num_batched_tokens * (4 * config.hidden_size + 2 * config.intermediate_size) * 4
        speculative = args.speculative()  # logits of k + 1 rows per sequence to verify drafts
        activations += 3 * args.max_num_seqs * config.vocab_size * 4 * (1 + (speculative.num_speculative_tokens
                                                                            if speculative else 0))
        budget = stats["bytes_limit"] * args.gpu_memory_utilization - stats["bytes_in_use"] - activations
    else:
        budget = CPU_KV_CACHE_BYTES
    useful = args.max_num_seqs * -(-max_model_len // args.block_size) + 1
    return int(max(1, min(budget // bytes_per_block, useful)))


def _compute_dtype(dtype: str, checkpoint: ModelConfig) -> str:
    """`auto` is the checkpoint's dtype (as in vLLM), except half precision on a CPU without
    bfloat16 instructions, where it is float32: XLA emulates half precision there, and float32
    holds half-precision weights exactly. float16 becomes bfloat16 on a CPU that has them
    (vLLM's CPU build does the same; XLA's float16 is emulated)."""
    if dtype != "auto" or jax.default_backend() != "cpu":
        return dtype
    stored = checkpoint.dtype
    if stored not in ("bfloat16", "float16"):
        return dtype
    chosen = "bfloat16" if cpu_has_bfloat16() else "float32"
    if chosen != stored:
        logger.info("computing in %s on this CPU (the checkpoint stores %s)", chosen, stored)
    return chosen


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX-512 BF16 or AMX, Arm BF16): there
    a bfloat16 model decodes 1.3x faster than in float32 (experiments/results/dtype_cpu.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))
