"""paged-jax: vLLM's PagedAttention serving system in JAX."""

from paged_jax.config import ModelConfig
from paged_jax.models import Model, load_model
from paged_jax.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["ModelConfig", "Model", "load_model", "Tokenizer", "IncrementalDetokenizer"]
