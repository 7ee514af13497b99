"""What a request constrains of its output, as SamplingParams fields: the grammar it asks
for, as OpenAI's `response_format` ({"type": "json_object"}, or {"type": "json_schema",
"json_schema": {"name", "schema", "strict"}}) or vLLM's `structured_outputs` ({"json"},
{"regex"}, {"choice"}, {"grammar"}, {"json_object"}), and OpenAI's `logit_bias`.

A chat request's tool_choice can ask for a grammar too (tool_calls.py builds and checks it);
with another one beside it, it is a 400, as two grammars are.

A grammar is parsed before its request enters the engine (`constrained`), so a bad schema,
regex or grammar is a 400 naming the field the client sent it in, never a failed request;
the parse runs on a worker thread, as the first one imports xgrammar (seconds) and a large
schema takes a while. The engine compiles the grammar against the vocabulary when it adds
the request (structured_output.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

from paged_jax.sampling_params import SamplingParams, StructuredOutputsParams
from paged_jax.server.protocol import SamplingFields
from paged_jax.server.serving import APIError
from paged_jax.structured_output import parse

MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias, which vLLM clamps to as well


async def constrained(body: SamplingFields, params: SamplingParams, vocab_size: int,
                      tool_grammar: StructuredOutputsParams | None = None) -> SamplingParams:
    """params with the grammar and the logit_bias body asks for; a 400 naming the field for a
    bad one. tool_grammar is the one body's tool_choice asks for, checked already."""
    grammar = requested_grammar(body)
    await check_grammar(body, grammar)
    if tool_grammar is not None and grammar is not None:
        raise APIError(400, "tool_choice and the request's response_format or structured_outputs both ask for a "
                            "grammar: send one", "tool_choice")
    grammar = grammar or tool_grammar
    return dataclasses.replace(params, structured_outputs=grammar, logit_bias=requested_logit_bias(body, vocab_size))


def requested_grammar(body: SamplingFields) -> StructuredOutputsParams | None:
    """The grammar body asks for, in response_format or structured_outputs (not both); None
    for free text (no field, or response_format {"type": "text"})."""
    wanted, fmt = body.structured_outputs, body.response_format
    if wanted is not None and fmt is not None and fmt.type != "text":
        raise APIError(400, "response_format and structured_outputs both ask for a grammar: send one",
                       "structured_outputs")
    if wanted is not None:
        try:
            return StructuredOutputsParams(json=wanted.json_, regex=wanted.regex, choice=wanted.choice,
                                           grammar=wanted.grammar, json_object=wanted.json_object)
        except ValueError as error:
            field = re.match(r"StructuredOutputsParams(\.\w+)?", str(error)).group(1) or ""
            raise APIError(400, str(error).replace(f"StructuredOutputsParams{field}", f"structured_outputs{field}"),
                           f"structured_outputs{field}") from None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                       "response_format.json_schema.schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)


async def check_grammar(body: SamplingFields, spec: StructuredOutputsParams | None) -> None:
    """A 400 naming the field unless spec (body's requested_grammar) parses."""
    if spec is None:
        return
    try:
        await asyncio.to_thread(parse, spec)
    except ValueError as error:  # a bad spec, or no xgrammar
        if body.structured_outputs is not None:
            param = f"structured_outputs.{spec.kind}"
        else:
            param = "response_format" if spec.json_object else "response_format.json_schema.schema"
        raise APIError(400, str(error).replace(f"StructuredOutputsParams.{spec.kind}", param), param) from None


def requested_logit_bias(body: SamplingFields, vocab_size: int) -> dict[int, float] | None:
    """body's logit_bias with its token ids (JSON keys, so strings) as integers and each bias
    clamped to [-100, 100], as OpenAI and vLLM take it."""
    if not body.logit_bias:
        return None
    bias = {}
    for key, value in body.logit_bias.items():
        if not re.fullmatch(r"[0-9]+", key) or int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        bias[int(key)] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, value))
    return bias
