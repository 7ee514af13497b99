"""Tokenizer from a checkpoint directory's `tokenizer.json`, and incremental detokenisation.

Only the `tokenizers` library is needed at run time. Streaming text one token at a time is
not `decode([token])`: byte-level BPE can split one character over several tokens, and
SentencePiece-style tokenizers decide a token's leading space from its neighbour. The
incremental detokenizer re-decodes a short window of recent tokens and emits only text that
is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"
WINDOW = 5  # tokens of left context re-decoded with each new token


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {path}; save a fast tokenizer there "
                "(AutoTokenizer.from_pretrained(...).save_pretrained(path))"
            )
        tokenizer = HFTokenizer.from_file(str(file))
        settings = _read_json(path / "tokenizer_config.json")
        config = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if not eos_ids:
            eos_ids = tuple(i for i in [_token_id(tokenizer, settings.get("eos_token"))] if i is not None)
        bos = config.get("bos_token_id", _token_id(tokenizer, settings.get("bos_token")))
        return cls(tokenizer, eos_ids, bos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of output tokens into text deltas. The concatenated deltas equal
    the text of all the output tokens decoded in the context of the prompt."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - WINDOW, 0)  # start of the re-decoded window
        self.read_offset = len(self.ids)  # text up to here has been emitted
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special_tokens)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # an incomplete character: wait for the next token
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(tokenizer: HFTokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": "</s>", ...}
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None
