"""Tensor parallelism on a `jax.sharding.Mesh`: the mesh, one table of partition rules per
architecture family, the sharded KV cache, and the kernels run per shard under `shard_map`.

Every model lives on a mesh; one device is a mesh of one (T = 1: nothing padded, nothing
replicated, every shard whole), so one device and many take the same path. The model code
is the single-device code. Parameters carry a `NamedSharding` from the rules
(Megatron-LM's split: q/k/v, gate/up and fc1 column-parallel, o, down and fc2 row-parallel,
the vocabulary split over the devices), so XLA's SPMD partitioner runs each matrix product
on its shard and adds the all-reduce after each row-parallel product. Attention and the cache
ops read and write the paged cache directly, so they run under `shard_map`: each device sees
its own KV heads `[num_kv_heads / T, num_blocks, block_size, head_dim]` and its query heads,
and the kernels are the single-device kernels. Block ids, block tables, the allocator and the
scheduler are global and know nothing of devices.

What does not divide is made to divide: the intermediate size and the vocabulary are padded
with zeros to a multiple of T (zero rows and columns add nothing; padded logits are cut off),
and KV heads are replicated when T does not divide them (vLLM's rule), see `kv_layout`.

Across hosts (after `jax.distributed.initialize`) the mesh spans the processes' devices and
every process runs the whole engine on the same requests (SPMD). No step is broadcast: the
scheduler is deterministic, the requests are the same everywhere (LLM.generate checks) and the
sampled tokens come from replicated logits, so every process makes the same decisions. A
broadcast from process 0 would cost a collective per step for a description every process
can compute; what is not deterministic (background compilation, whose shapes become ready at
different times) is turned off instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from paged_jax.engine_args import EngineArgs
from paged_jax.model.config import ModelConfig
from pallas_kernels import AttentionBackend

TP = "tp"  # the mesh axis tensor parallelism splits over

# Parameter path (regex, first match wins) -> how it is split over the `tp` axis. Kernels are
# [in, out]. The fused qkv_proj columns are grouped by KV head and gate_up_proj's are (gate,
# up) pairs (transformer.py), so a contiguous split of the columns is a split by heads
# and by intermediate units. The vocabulary is split (embedding rows, LM head columns): see
# experiments/results/scaling_cpu.md for the measurement against replicating it.
_COMMON = (
    (r"attn/qkv_proj/(kernel|bias)$", P(None, TP)),
    (r"attn/o_proj/kernel$", P(TP, None)),
    (r"^embed/embedding$", P(TP, None)),
    (r"^lm_head/kernel$", P(None, TP)),
)
_DENSE_MLP = _COMMON + (  # GPT-2, OPT, GPT-NeoX: fc1 -> activation -> fc2
    (r"mlp/fc1/(kernel|bias)$", P(None, TP)),
    (r"mlp/fc2/kernel$", P(TP, None)),
)
_GATED_MLP = _COMMON + (  # the Llama family, Gemma: down(act(gate) * up)
    (r"mlp/gate_up_proj/(kernel|bias)$", P(None, TP)),
    (r"mlp/down_proj/kernel$", P(TP, None)),
    # A mixture of experts (Mixtral, Qwen3-MoE): kernels [experts, in, out], each expert split
    # as the MLP is (moe.py); the router is replicated, every device routes every token.
    (r"mlp/experts/gate_up_proj/kernel$", P(None, None, TP)),
    (r"mlp/experts/down_proj/kernel$", P(None, TP, None)),
)
# Everything else (norms, biases added after a row-parallel product, position tables,
# OPT-350m's projections) is replicated.
RULES: dict[str, tuple[tuple[str, P], ...]] = {"gpt2": _DENSE_MLP, "opt": _DENSE_MLP, "gpt_neox": _DENSE_MLP,
                                               "llama": _GATED_MLP, "phi3": _GATED_MLP}
VOCABULARY = (r"^embed/embedding$", r"^lm_head/kernel$")  # split; replicated with vocab_parallel=False


def partition_spec(family: str, path: str, vocab_parallel: bool = True) -> P:
    """The PartitionSpec of one parameter ('layers_0/attn/qkv_proj/kernel')."""
    for pattern, spec in RULES[family]:
        if re.search(pattern, path):
            if not vocab_parallel and any(re.search(v, path) for v in VOCABULARY):
                return P()
            # A 1-d bias of a column-parallel product is split like the kernel's columns.
            return P(TP) if path.endswith("bias") else spec
    return P()


# -- sizes ------------------------------------------------------------------------------------


def check_devices(tensor_parallel_size: int, data_parallel_size: int = 1) -> None:
    """vLLM's rule: the T x D devices must exist."""
    t, d = tensor_parallel_size, data_parallel_size
    devices = jax.devices()
    if t * d > len(devices):
        raise ValueError(f"tensor_parallel_size {t} x data_parallel_size {d} = {t * d} devices, "
                         f"but only {len(devices)} are available ({devices[0].platform})")


def kv_layout(num_heads: int, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(KV heads per device, query heads per KV head) under T-way tensor parallelism.

    Each device holds num_heads / T query heads. It needs the KV heads those query heads read,
    in groups of equal size so that the kernels' GQA rule (query head h reads KV head
    h // group) holds on every device. The largest such group is gcd(local query heads,
    checkpoint group). T divides the KV heads: each device has its share, nothing is
    replicated. T a multiple of the KV heads (e.g. MQA on 4 devices): one KV head per
    device, replicated T / num_kv_heads times, as vLLM does. Otherwise (e.g. 6 query and 2 KV
    heads on 3 devices) the group shrinks and some KV heads live on two devices."""
    local_q = num_heads // tp
    group = math.gcd(local_q, num_heads // num_kv_heads)
    return local_q // group, group


def sharded_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config the model is built with on T devices: KV heads as the devices hold them
    (T x KV heads per device, replicas included), intermediate sizes (the MLP's, the experts')
    and vocabulary padded to a multiple of T."""
    local_kv, _ = kv_layout(config.num_heads, config.num_kv_heads, tp)
    vocab = -(-config.vocab_size // tp) * tp
    return dataclasses.replace(
        config, num_kv_heads=tp * local_kv, intermediate_size=-(-config.intermediate_size // tp) * tp,
        moe_intermediate_size=-(-config.moe_intermediate_size // tp) * tp,
        padded_vocab_size=vocab if vocab != config.vocab_size else None)


def expand_kv_heads(qkv: jax.Array, config: ModelConfig, num_kv_heads: int) -> jax.Array:
    """qkv_proj kernel [in, kv_heads * (group + 2) * D] or bias [...] laid out for the
    checkpoint's KV heads -> the same for num_kv_heads (virtual) KV heads: virtual head j
    takes its `group` query heads and a copy of the K/V head they read."""
    g_old = config.num_heads // config.num_kv_heads
    g_new = config.num_heads // num_kv_heads
    if g_new == g_old:
        return qkv
    first = np.arange(num_kv_heads) * g_new  # first query head of each virtual group
    source = first // g_old  # the checkpoint KV head it reads
    slots = np.concatenate([first[:, None] % g_old + np.arange(g_new), np.full((num_kv_heads, 2), g_old)
                            + np.arange(2)], axis=1)  # [virtual heads, g_new + 2]: its q slots, k, v
    grouped = qkv.reshape(*qkv.shape[:-1], config.num_kv_heads, g_old + 2, config.head_dim)
    picked = grouped[..., source[:, None], slots, :]  # [..., virtual heads, g_new + 2, D]
    return picked.reshape(*qkv.shape[:-1], num_kv_heads * (g_new + 2) * config.head_dim)


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.pad(x, [(0, want - have) for have, want in zip(x.shape, shape)])


# -- mesh, parameters, cache --------------------------------------------------------------------


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A one-axis mesh ('tp') over the devices of one model."""
    return Mesh(np.asarray(devices), (TP,))


def default_mesh() -> Mesh:
    """Where a model lives when no mesh is given: this process's first device."""
    return make_mesh(jax.local_devices()[:1])


def engine_mesh(args: EngineArgs, config: ModelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of one engine (the checkpoint's config): its tensor_parallel_size devices, the
    first ones unless the data-parallel front chose them."""
    tp, dp = args.tensor_parallel_size, args.data_parallel_size
    if devices is None:
        if dp > 1:
            raise ValueError("data_parallel_size > 1 runs one engine per device group behind the "
                             "data-parallel front: use LLM or engine.data_parallel.DataParallelEngine")
        check_devices(tp)
        # One device is this process's own: under jax.distributed each process serves alone.
        devices = jax.local_devices()[:1] if tp == 1 else jax.devices()[:tp]
    if len(devices) != tp:
        raise ValueError(f"an engine with tensor_parallel_size {tp} was given {len(devices)} devices")
    if config.num_heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {config.num_heads} "
                         "attention heads")
    if jax.process_count() > 1 and tp > 1:
        check_multi_process(args)
    return make_mesh(devices)


def check_multi_process(args: EngineArgs) -> None:
    """What runs across processes (jax.distributed): every process runs the same engine on
    the same requests and takes the same scheduling decisions (see the README's Scale-out).
    Swapping reads pages back to the host, which would need each process's shards; data
    parallelism would need each process to drive only its own engines."""
    if args.preemption_mode == "swap":
        raise ValueError("preemption_mode='swap' runs in one process only; use 'recompute' under jax.distributed")
    if args.data_parallel_size > 1:
        raise ValueError("data_parallel_size > 1 runs in one process only; under jax.distributed use "
                         "tensor_parallel_size over the processes' devices")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV pages [num_kv_heads, num_blocks, block_size, head_dim] split on the head axis."""
    return NamedSharding(mesh, P(TP))


def placement(config: ModelConfig, mesh: Mesh, shapes: dict[str, tuple[int, ...]],
              vocab_parallel: bool = True) -> Callable[[str, jax.Array], jax.Array]:
    """place(path, value) for one parameter made on the host in the checkpoint's shape: fitted
    to the shapes of the mesh's config (sharded_config: KV heads replicated, padding) and put
    in its shards, so no device ever holds more than its own."""
    num_kv_heads = sharded_config(config, mesh.shape[TP]).num_kv_heads

    def place(name: str, value: jax.Array) -> jax.Array:
        if name.endswith(("qkv_proj/kernel", "qkv_proj/bias")):
            value = expand_kv_heads(value, config, num_kv_heads)
        value = _pad_to(value, shapes[name])
        sharding = NamedSharding(mesh, partition_spec(config.family, name, vocab_parallel))
        host = np.asarray(value)
        # Each process places the shards of its own devices (jax.distributed: the mesh spans hosts).
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return place


# -- kernels per shard ----------------------------------------------------------------------------


def shard_backend(backend: AttentionBackend, mesh: Mesh) -> AttentionBackend:
    """The backend's four functions run per shard: each device attends with its query heads
    over its KV heads, writes and copies blocks in its own pages. Block tables, lengths,
    slot mappings and block ids are replicated."""
    heads, pages, same = P(None, TP, None), P(TP), P()  # [tokens, heads, D]; [heads, blocks, B, (D)]
    scales = ("k_scales", "v_scales")  # int8 pages' scales (or None), split with their pages

    def per_shard(fn, in_specs, out_specs):
        def run(*args, **options):
            split = {name: options.pop(name) for name in scales if name in options}

            def body(*arrays):
                return fn(*arrays[: len(args)], **dict(zip(split, arrays[len(args):])), **options)

            return jax.shard_map(body, mesh=mesh, in_specs=in_specs[: len(args)] + (pages,) * len(split),
                                 out_specs=out_specs, check_vma=False)(*args, *split.values())
        return run

    return dataclasses.replace(
        backend, name=f"{backend.name} x{mesh.shape[TP]}",
        paged_attention=per_shard(backend.paged_attention, (heads, pages, pages, same, same), heads),
        ragged_paged_attention=per_shard(backend.ragged_paged_attention,
                                         (heads, pages, pages, same, same, same), heads),
        write_kv=per_shard(backend.write_kv, (pages, pages, heads, heads, same, pages, pages), (pages,) * 4),
        copy_blocks=per_shard(backend.copy_blocks, (pages, pages, same, same, pages, pages), (pages,) * 4),
    )


# -- measurement -------------------------------------------------------------------------------

_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_ARRAY = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each kind of collective produces per device, summed over a compiled module's
    HLO text (compiled.as_text()): what one step moves between devices."""
    totals: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        size = 0
        for kind, dims in _ARRAY.findall(match.group(1)):
            bits = _BITS.get(kind) or int(kind[1:])
            size += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
        totals[match.group(2)] = totals.get(match.group(2), 0) + size
    return totals
