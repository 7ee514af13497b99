"""paged-jax: vLLM's PagedAttention serving system in JAX."""

from paged_jax.beam_search import BeamSearchParams
from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.engine.llm import LLM
from paged_jax.engine.llm_engine import LLMEngine
from paged_jax.engine_args import EngineArgs
from paged_jax.model import Model, load_model
from paged_jax.model.config import ModelConfig
from paged_jax.outputs import (
                               BeamSearchOutput,
                               BeamSearchSequence,
                               CompletionOutput,
                               Logprob,
                               RequestMetrics,
                               RequestOutput,
)
from paged_jax.sampling_params import SamplingParams, StructuredOutputsParams
from paged_jax.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncLLMEngine",
    "EngineArgs",
    "SamplingParams",
    "StructuredOutputsParams",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "ModelConfig",
    "Model",
    "load_model",
    "Tokenizer",
    "IncrementalDetokenizer",
]
