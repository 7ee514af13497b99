"""EngineArgs: every setting of an engine, with vLLM's names and defaults, checked in one place
(`validate`) so that a bad setting is a ValueError naming the field before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, fields

from paged_jax.sampling_params import requirement

PREEMPTION_MODES = ("recompute", "swap")
# ours, and the paper's Orca baselines by how much each request reserves (kv/reservation.py)
MEMORY_MANAGERS = ("paged", "orca-max", "orca-pow2", "orca-oracle")
BATCHING = ("continuous", "static")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")  # model/cache.py: kv_dtype
SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's speculative_config: who proposes the next tokens that the model then verifies in
    one step (spec_decode/). "ngram": the sequence's own tokens, by prompt lookup (the latest
    1..prompt_lookup_max tokens, longest first but no shorter than prompt_lookup_min, found
    earlier in the sequence propose what followed them there). "draft_model": a smaller model
    with the target's vocabulary, run by the same engine over the same block tables."""

    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft model: a checkpoint directory or a hub id
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1

    @classmethod
    def from_dict(cls, config: dict) -> SpeculativeConfig:
        """From vLLM's JSON form: "method" defaults to "draft_model" when a "model" is given
        ("ngram" must be named); an unknown or missing key is a ValueError naming it."""
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict (JSON object), got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]} is not a field (known: {sorted(known)})")
        values = dict(config)
        values.setdefault("method", "draft_model" if values.get("model") else None)
        if "num_speculative_tokens" not in values:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        spec = cls(**values)
        spec.validate()
        return spec

    def validate(self) -> None:
        require = requirement(self)
        require(self.method in SPECULATIVE_METHODS, "method", f"must be one of {list(SPECULATIVE_METHODS)}")
        require(isinstance(self.num_speculative_tokens, int) and 1 <= self.num_speculative_tokens <= 16,
                "num_speculative_tokens", "must be an integer in [1, 16]")
        require(self.method != "draft_model" or bool(self.model), "model", "names the draft model (required)")
        require(self.method != "ngram" or self.model is None, "model", "is for method 'draft_model' only")
        require(isinstance(self.prompt_lookup_min, int) and self.prompt_lookup_min >= 1, "prompt_lookup_min",
                "must be an integer >= 1")
        require(isinstance(self.prompt_lookup_max, int) and self.prompt_lookup_max >= self.prompt_lookup_min,
                "prompt_lookup_max", "must be an integer >= prompt_lookup_min")


@dataclass(frozen=True)
class EngineArgs:
    # A checkpoint directory, or a Hugging Face Hub id downloaded into download_dir (default: the
    # hub's cache, HF_HOME) at a revision (branch, tag or commit; default main): model/hub.py.
    model: str
    tokenizer: str | None = None  # default: the model's files
    revision: str | None = None
    tokenizer_revision: str | None = None  # default: revision, as in vLLM
    download_dir: str | None = None
    dtype: str = "auto"
    # What the KV pages hold, as vLLM spells it: "auto" (the model's dtype), "bfloat16", "fp8"
    # (= "fp8_e4m3"), "fp8_e5m2" or "int8" (a scale per token and KV head). The cache is sized
    # in bytes, so 8-bit pages hold about twice the blocks of bfloat16 ones.
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4  # GiB of host memory for swapped-out blocks
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = False
    # False: a fork copies every block instead of sharing it (what sharing saves is measured
    # against this; outputs are the same).
    enable_block_sharing: bool = True
    preemption_mode: str = "recompute"
    # The paper's baselines run in this engine with only these two changed: "orca-max",
    # "orca-pow2", "orca-oracle" reserve each request's KV contiguously (kv/reservation.py);
    # batching="static" admits a new batch only when the last is done.
    memory_manager: str = "paged"
    batching: str = "continuous"
    seed: int = 0
    attention_backend: str = "auto"
    # T devices run one model (tensor parallelism, model/sharding.py); D engines on disjoint groups
    # of T devices share the requests (data parallelism, engine/data_parallel.py). vLLM's names.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # Decode steps per device loop when only decodes run (one host round trip per loop). 8 was the
    # best of 1 / 4 / 8 on a 2-core CPU: `python -m experiments.throughput --scheduler-steps N`.
    num_scheduler_steps: int = 8
    # Compile the step shapes at start-up (else on first use). With background_compile only
    # the largest of each kind is compiled before serving, the rest on a background thread
    # (steps pad to a ready shape meanwhile); False waits for all of them (steady-state
    # benchmarks). compilation_cache: JAX's persistent cache (paged_jax/worker/compilation.py).
    # Speculative decoding: None, or vLLM's speculative_config dict (SpeculativeConfig.from_dict),
    # e.g. {"method": "ngram", "num_speculative_tokens": 4} or {"model": DIR, "num_speculative_tokens": 4}.
    speculative_config: dict | None = None
    warm_up: bool = True
    background_compile: bool = True
    compilation_cache: bool = True

    def validate(self) -> None:
        require = requirement(self)
        require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0, "block_size",
                "must be a power of two")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        require(self.swap_space >= 0, "swap_space", "must be >= 0 GiB")
        require(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                "max_num_batched_tokens", "must be >= 1")
        require(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
                "num_gpu_blocks_override", "must be >= 1")
        require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", f"must be one of {PREEMPTION_MODES}")
        require(self.num_scheduler_steps >= 1, "num_scheduler_steps", "must be >= 1")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        require(self.data_parallel_size >= 1, "data_parallel_size", "must be >= 1")
        require(self.memory_manager in MEMORY_MANAGERS, "memory_manager", f"must be one of {MEMORY_MANAGERS}")
        require(self.batching in BATCHING, "batching", f"must be one of {BATCHING}")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {list(KV_CACHE_DTYPES)}")
        if self.speculative_config is not None:
            self.speculative()
        require(self.memory_manager == "paged" or not (self.enable_prefix_caching or self.preemption_mode == "swap"),
                "memory_manager", "reserves whole requests: no prefix caching, nothing to swap")

    def speculative(self) -> SpeculativeConfig | None:
        """speculative_config, checked (a ValueError naming its bad field)."""
        return None if self.speculative_config is None else SpeculativeConfig.from_dict(self.speculative_config)
