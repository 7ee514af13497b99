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
}


def save_checkpoint(variant: str, directory: Path, dtype=torch.float32, **save_kwargs) -> Path:
    torch.manual_seed(sum(map(ord, variant)))
    model = transformers.AutoModelForCausalLM.from_config(VARIANTS[variant]())
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
