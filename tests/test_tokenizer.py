"""The tokenizer reads tokenizer.json with the `tokenizers` library alone and encodes as
transformers does; streamed text (incremental detokenisation) adds up to the full decode,
including characters split over several byte-level tokens and SentencePiece-style spaces."""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from paged_jax import IncrementalDetokenizer, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def paged_attention(q, k_pages, v_pages): return q",
    "Grüße aus Köln, naïve café, 日本語のテキスト, emoji 🙂 and ✓ marks.",
] * 20


def byte_level_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def metaspace_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    return tok


@pytest.fixture(params=["byte_level", "metaspace"])
def tokenizer_dir(request, tmp_path):
    tok = byte_level_bpe() if request.param == "byte_level" else metaspace_bpe()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return tmp_path


def test_encodes_like_transformers(tokenizer_dir):
    ours = Tokenizer.from_pretrained(tokenizer_dir)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    for text in CORPUS[:3] + ["unseen wörds ✓✓ 🙂🙂"]:
        assert ours.encode(text) == theirs(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True)


def test_special_token_ids_come_from_the_directory(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    assert tok.eos_token_ids == (tok.tokenizer.token_to_id("</s>"),)
    assert tok.bos_token_id == tok.tokenizer.token_to_id("<s>")
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert Tokenizer.from_pretrained(tokenizer_dir).eos_token_ids == (5, 7)


@pytest.mark.parametrize("text", ["Grüße 日本語 🙂 ✓ over the lazy dog", "  spaced   out   words  ", "x"])
def test_streamed_text_adds_up_to_the_full_decode(tokenizer_dir, text):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    prompt = tok.encode("The quick brown fox")
    output = tok.encode(text, add_special_tokens=False) + [tok.eos_token_ids[0]]
    stream = IncrementalDetokenizer(tok, prompt)
    deltas = [stream.add([t]) for t in output]
    assert all("\ufffd" not in d for d in deltas)
    full = tok.decode(prompt + output)
    assert "".join(deltas) == stream.text == full[len(tok.decode(prompt)):]


def test_missing_tokenizer_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
