"""Tiny random Hugging Face checkpoints, one per architecture variant we serve, made with
`transformers` and saved to disk the way users' checkpoints are (no hub, no network)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=128, max_position_embeddings=128)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.2, **COMMON)
OPT = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, init_std=0.2,
           eos_token_id=2, bos_token_id=2, pad_token_id=1, **COMMON)

VARIANTS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=128,
                                            initializer_range=0.2, bos_token_id=0, eos_token_id=0),
    "opt": lambda: transformers.OPTConfig(**OPT),
    "opt_350m_style": lambda: transformers.OPTConfig(**OPT, do_layer_norm_before=False, word_embed_proj_dim=32),
    "llama": lambda: transformers.LlamaConfig(**LLAMA, rope_theta=500.0),
    "llama3_scaled_tied": lambda: transformers.LlamaConfig(
        **LLAMA, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**LLAMA, sliding_window=64),
    "qwen2": lambda: transformers.Qwen2Config(**{**LLAMA, "num_key_value_heads": 1}),
    "qwen3": lambda: transformers.Qwen3Config(**LLAMA, head_dim=32),
    "phi3": lambda: transformers.Phi3Config(**LLAMA, partial_rotary_factor=0.5, sliding_window=16, bos_token_id=1,
                                            eos_token_id=2, pad_token_id=0),
    "pythia": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, rotary_pct=0.25, initializer_range=0.2,
                                                 **COMMON),
    # Small caps and a query_pre_attn_scalar apart from head_dim, so that each one shows.
    "gemma2": lambda: transformers.Gemma2Config(**LLAMA, head_dim=32, sliding_window=8, query_pre_attn_scalar=24,
                                                attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**LLAMA, "num_hidden_layers": 3}, head_dim=16, sliding_window=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    # Mixtures of experts: 4 experts of width 32, top 2.
    "mixtral": lambda: transformers.MixtralConfig(**{**LLAMA, "intermediate_size": 32}, num_local_experts=4,
                                                  num_experts_per_tok=2, sliding_window=None),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**LLAMA, head_dim=32, moe_intermediate_size=32, num_experts=4,
                                                     num_experts_per_tok=2, norm_topk_prob=True),
    # The top-2 weights as the router gives them; layer 0 keeps a dense MLP (every 2nd layer is sparse).
    "qwen3_moe_dense_first": lambda: transformers.Qwen3MoeConfig(
        **LLAMA, head_dim=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=2),
}


def save_checkpoint(variant: str, directory: Path, dtype=torch.float32, **save_kwargs) -> Path:
    torch.manual_seed(sum(map(ord, variant)))
    model = transformers.AutoModelForCausalLM.from_config(VARIANTS[variant]())
    with torch.no_grad():  # norms start at one (Gemma's at zero), biases at zero: alike, a mix-up would not show
        for vector in (p for p in model.parameters() if p.ndim == 1):
            vector.add_(0.1 * torch.randn_like(vector))
    model = model.to(dtype).eval()
    model.save_pretrained(directory, **save_kwargs)
    return directory


def save_tokenizer(directory: Path) -> Path:
    """A small SentencePiece-style BPE (vocab < 128, so it fits every tiny model) with
    <unk>, <s>, </s> as ids 0, 1, 2 (Llama's convention)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = ["the quick brown fox jumps over the lazy dog", "a paged cache of keys and values",
              "serving large language models with paged attention"] * 10
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return directory


def load_reference(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
