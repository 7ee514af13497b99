"""The embedded default model, models/stdlib-llama (made by experiments/train_default_model.py):
Hugging Face transformers loads the same files we do, both read the tokenizer alike, and our
engine's greedy output equals Hugging Face `generate` token for token on a trained model, whose
confident predictions make the comparison sharper than on random tiny checkpoints. The weights
are stored in bfloat16; both sides compute in float32, which holds them exactly."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from paged_jax import LLM, SamplingParams
from paged_jax.tokenizer import Tokenizer

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "stdlib-llama"
PROMPTS = ["def __init__(self", "import os\n"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_hf_loads_the_model_and_both_tokenizers_agree(reference, hf_tokenizer):
    assert type(reference).__name__ == "LlamaForCausalLM"
    ours = Tokenizer.from_pretrained(MODEL_DIR)
    assert ours.vocab_size == reference.config.vocab_size == len(hf_tokenizer)
    assert ours.eos_token_ids == (hf_tokenizer.eos_token_id,) == (reference.config.eos_token_id,)
    code = Path(textwrap.__file__).read_text()[:4000] + "\tx = 'é ∑ 😀'  \r\n\n\n    \n"
    for text in PROMPTS + [code]:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert ours.decode(ids) == text  # byte-level BPE: whitespace and newlines survive


def test_greedy_equals_hf_generate(reference, hf_tokenizer):
    llm = LLM(str(MODEL_DIR), dtype="float32", attention_backend="xla", max_num_seqs=4, warm_up=False)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
        assert output.prompt_token_ids == ids[0].tolist()
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=MAX_TOKENS, eos_token_id=None,  # as ignore_eos
                                    pad_token_id=hf_tokenizer.pad_token_id)
        completion = output.outputs[0]
        assert completion.token_ids == theirs[0, ids.shape[1]:].tolist()
        assert completion.text == hf_tokenizer.decode(completion.token_ids)


def test_the_committed_model_is_trained(reference, hf_tokenizer):
    """Far below the ~6.5 nats/token of a unigram model on its own kind of text: a smoke run's
    checkpoint (a few dozen steps) fails here."""
    text = Path(textwrap.__file__).read_text()
    ids = torch.tensor([hf_tokenizer(text)["input_ids"][:reference.config.max_position_embeddings]])
    with torch.no_grad():
        loss = reference(ids, labels=ids).loss.item()
    assert loss < 5.0, f"{loss:.2f} nats/token: retrain with `python -m experiments.train_default_model`"
