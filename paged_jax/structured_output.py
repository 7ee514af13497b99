"""Structured outputs: a request's grammar (StructuredOutputsParams) as token masks, with
xgrammar.

A spec is first parsed into a grammar (`parse`): a JSON schema as it is, json_object as the
schema {"type": "object"} (as vLLM has it), a regular expression, the choices as an EBNF
alternation of their strings, an EBNF grammar as it is. That is where a bad spec is refused,
in a ValueError naming its field; parsing needs no tokenizer, so the server parses before a
request enters the engine and answers a 400. The engine then compiles the grammar against its
tokenizer's vocabulary (`GrammarCompiler`: xgrammar's compiler, whose cache keeps each grammar
compiled once) and gives each of the request's sequences a matcher of its own (`new_matcher`):
the grammar's state after the tokens the sequence has output.

Per step, the host does what only the host can: before the step, each constrained row's
matcher fills that row of a packed bitmask of the tokens it allows (bit v % 32 of int32 word
v // 32, xgrammar's layout), which the jitted sampler applies (worker/sampler.py); after it,
the engine advances the matcher with the sampled token. Once the grammar is complete the
matcher allows only the stop tokens, and accepting one terminates it: the sequence ends there.

xgrammar (the `structured` extra) is imported on first use: an engine that never sees a
constrained request never loads it (nor the torch it depends on), and without it such a
request fails alone, with an error naming the extra.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from paged_jax.sampling_params import StructuredOutputsParams
from paged_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar

JSON_OBJECT_SCHEMA = '{"type": "object"}'
# What each kind of spec is, for the error that refuses one.
NOUNS = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regular expression",
        "choice": "list of choices", "grammar": "EBNF grammar"}


def parse(spec: StructuredOutputsParams) -> xgrammar.Grammar:
    """The grammar spec describes; a ValueError naming spec's field if it describes none."""
    xgr = _xgrammar()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            schema = JSON_OBJECT_SCHEMA if kind == "json_object" else spec.json
            return xgr.Grammar.from_json_schema(schema if isinstance(schema, str) else json.dumps(schema))
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            # A JSON string literal is an EBNF one: the same quotes and escapes.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, TypeError, ValueError) as error:  # xgrammar's parsers raise RuntimeError
        raise ValueError(f"StructuredOutputsParams.{kind} is not a valid {NOUNS[kind]}: {_reason(error)}") from None


class GrammarCompiler:
    """Grammars compiled against one tokenizer's vocabulary, padded to the model's vocab_size
    (the width of the logits, which may exceed the tokenizer's: the ids past it are never
    allowed). The xgrammar compiler is built on the first compile."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None

    def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """spec's grammar with its token masks; ValueError naming the field of a bad spec. A
        grammar compiled before comes from the compiler's cache."""
        grammar = parse(spec)
        if self._compiler is None:
            self._compiler = _xgrammar().GrammarCompiler(self._tokenizer_info())
        return self._compiler.compile_grammar(grammar)

    def _tokenizer_info(self) -> xgrammar.TokenizerInfo:
        """xgrammar's view of the vocabulary: each token's bytes, which it decodes by the
        tokenizer's kind (byte-level, byte-fallback or raw pieces), read from the same
        tokenizer.json through transformers' wrapper (a dependency of xgrammar's)."""
        from transformers import PreTrainedTokenizerFast

        wrapped = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.tokenizer)
        return _xgrammar().TokenizerInfo.from_huggingface(wrapped, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)


def new_matcher(grammar: xgrammar.CompiledGrammar) -> xgrammar.GrammarMatcher:
    """A matcher at the grammar's start: one per sequence, advanced by each token it outputs."""
    return _xgrammar().GrammarMatcher(grammar)


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured outputs need xgrammar: pip install 'paged-jax[structured]'") from None
    return xgrammar


def _reason(error: Exception) -> str:
    """xgrammar's message without the time and C++ source location it starts with."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0] if lines else type(error).__name__)
    return re.sub(r"^Check failed: .*? is false: ", "", text)
