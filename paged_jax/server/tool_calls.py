"""Tool calls: OpenAI's function `tools` and `tool_choice` in chat completions, as vLLM serves
them.

A named function ({"type": "function", "function": {"name": ...}}) and "required" constrain
the output with a JSON schema, as vLLM builds it: the named function's parameters (the output
is its arguments object), or for "required" an array of at least one {"name", "parameters"}
object, any of the tools. "auto" lets the model choose, so it needs the model's own tool-call
format to read calls back: the Hermes/Qwen one, `<tool_call>{"name", "arguments"}</tool_call>`,
wherever the chat template writes "<tool_call>" (vLLM leaves the format to a server flag; the
template is what trained the model to write it). "none" calls nothing. In every case the tools
go to the template, as vLLM gives them (even with "none"), so the model sees them.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass

from paged_jax.outputs import CompletionOutput
from paged_jax.sampling_params import StructuredOutputsParams
from paged_jax.server.chat_template import ChatTemplate
from paged_jax.server.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from paged_jax.server.serving import APIError
from paged_jax.structured_output import parse

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # a function without parameters takes {}


@dataclass(frozen=True)
class ToolMode:
    """What a request's tool_choice makes of its output."""

    kind: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the function, when named


def tool_mode(body: ChatCompletionRequest, template: ChatTemplate | None) -> ToolMode:
    """The request's mode, as vLLM reads it (no tool_choice with tools is "auto", "required"
    with no tools is "none"); a 400 naming the field it cannot serve."""
    choice = body.tool_choice if body.tool_choice is not None else "auto" if body.tools else "none"
    if choice == "none" or (choice == "required" and body.tools == []):
        return ToolMode("none")
    if not body.tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        names = [tool.function.name for tool in body.tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                                f"({', '.join(names)})", "tool_choice.function.name")
        return ToolMode("named", choice.function.name)
    if choice == "auto":
        if template is None or HERMES_OPEN not in template.source:
            raise APIError(400, 'tool_choice "auto" needs the model\'s tool-call format, and the model\'s chat '
                                'template declares none (no "<tool_call>"): send "required" or a named function',
                           "tool_choice")
    return ToolMode(choice)


async def tool_grammar(body: ChatCompletionRequest, mode: ToolMode) -> StructuredOutputsParams | None:
    """The grammar mode constrains the output to, with each parameters schema it uses checked
    first (a 400 naming the tool's); None for "none" and "auto"."""
    if mode.kind not in ("named", "required"):
        return None
    used = [(i, tool.function) for i, tool in enumerate(body.tools)
            if mode.kind == "required" or tool.function.name == mode.name]
    for i, function in used:
        await _check_schema(function.parameters or EMPTY_PARAMETERS, f"tools.{i}.function.parameters")
    if mode.kind == "named":
        return StructuredOutputsParams(json=used[0][1].parameters or EMPTY_PARAMETERS)
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": []}}
    definitions = {}
    for i, function in used:
        parameters = dict(function.parameters or EMPTY_PARAMETERS)
        for name, definition in parameters.pop("$defs", {}).items():  # refs resolve from the root: move them there
            if definitions.setdefault(name, definition) != definition:
                raise APIError(400, f"tools.{i}.function.parameters: $defs.{name} differs from another tool's",
                               f"tools.{i}.function.parameters")
        schema["items"]["anyOf"].append({"properties": {"name": {"type": "string", "enum": [function.name]},
                                                        "parameters": parameters},
                                         "required": ["name", "parameters"]})
    if definitions:
        schema["$defs"] = definitions
    await _check_schema(schema, "tools")
    return StructuredOutputsParams(json=schema)


async def _check_schema(schema: dict, param: str) -> None:
    try:
        await asyncio.to_thread(parse, StructuredOutputsParams(json=schema))
    except ValueError as error:
        raise APIError(400, str(error).replace("StructuredOutputsParams.json", param), param) from None


# -- reading the calls back --------------------------------------------------------------------------


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's form


def call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))


def tool_calls(mode: ToolMode, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished choice's text. Output cut short (max_tokens) that is not
    the JSON "required" asks for stays content."""
    if mode.kind == "named":
        return None, [call(mode.name, text)]
    if mode.kind == "required":
        try:
            return None, [call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]
        except json.JSONDecodeError:
            return text, []
    if mode.kind == "auto":
        return hermes_calls(text)
    return text, []


def finish_reason(mode: ToolMode, choice: CompletionOutput, called: bool) -> str | None:
    """vLLM's: "tool_calls" for "required" output that ended by its grammar, and for "auto"
    output with calls in it; otherwise the engine's (a named function's is "stop")."""
    if choice.finish_reason == "stop" and (mode.kind == "required" or (mode.kind == "auto" and called)):
        return "tool_calls"
    return choice.finish_reason


def hermes_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of text as calls,
    and the rest (stripped; None if nothing is left) as content. A block that is not such a
    JSON object, or is never closed, stays in the content as the model wrote it."""
    calls, content, end = [], [], 0
    for block in re.finditer(re.escape(HERMES_OPEN) + "(.*?)" + re.escape(HERMES_CLOSE), text, re.DOTALL):
        parsed = _hermes_call(block.group(1))
        if parsed is not None:
            calls.append(parsed)
            content.append(text[end:block.start()])
            end = block.end()
    content.append(text[end:])
    return "".join(content).strip() or None, calls


def _hermes_call(body: str) -> ToolCall | None:
    try:
        parsed = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not (isinstance(parsed, dict) and isinstance(parsed.get("name"), str)
            and isinstance(parsed.get("arguments", {}), dict)):
        return None
    return call(parsed["name"], json.dumps(parsed.get("arguments", {}), ensure_ascii=False))


# -- streamed --------------------------------------------------------------------------------------


# Each stream turns a choice's new text into the delta to send: feed(text, final), final with
# the choice's last piece; `calls` counts the calls started so far.


class NamedCallStream:
    """A named function's output, streamed: one call, whose arguments are the text as it comes
    (its id and name in the first delta, as vLLM sends them)."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    def feed(self, text: str, final: bool) -> DeltaMessage:
        if not text:
            return DeltaMessage()
        name = None if self.calls else self.name
        delta = DeltaToolCall(index=0, id=name and new_call_id(), type=name and "function",
                              function=DeltaFunctionCall(name=name, arguments=text))
        self.calls = 1
        return DeltaMessage(tool_calls=[delta])


ITEM = 2  # bracket depth inside one call's object: [ {
_NAME_MEMBER = re.compile(r'\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')


class RequiredCallsStream:
    """"required" output, streamed: a JSON array of {"name", "parameters"} objects (in that
    order: the grammar writes an object's properties as its schema lists them), read as it
    grows. A call starts, with its id and name, when its name's string closes; its arguments
    are the text of its parameters object, sent as it comes. The scan keeps only its place:
    the bracket depth, whether it is in a string, and the text of the call object's current
    member (the arguments nest deeper)."""

    def __init__(self):
        self.depth = 0
        self.in_string = self.escaped = False
        self.member = ""
        self.calls = 0

    def feed(self, text: str, final: bool) -> DeltaMessage:
        deltas, arguments = [], ""
        for ch in text:
            opens, closes = not self.in_string and ch in "[{", not self.in_string and ch in "]}"
            if self.depth + opens > ITEM:  # in the parameters object, or opening it
                arguments += ch
            self._scan(ch, opens, closes)
            if self.depth == ITEM and opens:  # a call's object opened
                self.member = ""
            elif self.depth == ITEM and not (opens or closes):
                self.member = "" if ch == "," and not self.in_string else self.member + ch
                name = ch == '"' and not self.in_string and _NAME_MEMBER.fullmatch(self.member)
                if name:
                    deltas += self._arguments(arguments)
                    arguments = ""
                    deltas.append(DeltaToolCall(index=self.calls, id=new_call_id(), type="function",
                                                function=DeltaFunctionCall(name=json.loads(name.group(1)),
                                                                           arguments="")))
                    self.calls += 1
        return DeltaMessage(tool_calls=deltas + self._arguments(arguments))

    def _scan(self, ch: str, opens: bool, closes: bool) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        else:
            self.depth += opens - closes

    def _arguments(self, text: str) -> list[DeltaToolCall]:
        return [DeltaToolCall(index=self.calls - 1, function=DeltaFunctionCall(arguments=text))] if text else []


class HermesStream:
    """"auto" output, streamed: content until a `<tool_call>` opens; the block is sent whole, as
    a call, once it closes (or as content if it is not a call: as hermes_calls reads it, but
    the content unstripped). Text that could still become `<tool_call>` waits for the next
    piece, and at the end an unclosed block is content."""

    def __init__(self):
        self.pending = ""  # not sent yet: an open block, or a tail that may begin one
        self.calls = 0

    def feed(self, text: str, final: bool) -> DeltaMessage:
        self.pending += text
        content, deltas = "", []
        while (start := self.pending.find(HERMES_OPEN)) >= 0 and (end := self.pending.find(HERMES_CLOSE, start)) >= 0:
            content += self.pending[:start]
            block, self.pending = self.pending[start:end + len(HERMES_CLOSE)], self.pending[end + len(HERMES_CLOSE):]
            parsed = _hermes_call(block[len(HERMES_OPEN):-len(HERMES_CLOSE)])
            if parsed is None:
                content += block
                continue
            deltas.append(DeltaToolCall(index=self.calls, id=parsed.id, type="function",
                                        function=DeltaFunctionCall(name=parsed.function.name,
                                                                   arguments=parsed.function.arguments)))
            self.calls += 1
        sent = len(self.pending) - (0 if final else _held(self.pending))
        content, self.pending = content + self.pending[:sent], self.pending[sent:]
        return DeltaMessage(content=content or None, tool_calls=deltas or None)


def _held(text: str) -> int:
    """How much of text's end must wait: from an open block on, or a tail that begins one."""
    start = text.find(HERMES_OPEN)
    if start >= 0:
        return len(text) - start
    return next((n for n in range(min(len(text), len(HERMES_OPEN) - 1), 0, -1) if HERMES_OPEN.startswith(text[-n:])),
                0)


def call_stream(mode: ToolMode) -> NamedCallStream | RequiredCallsStream | HermesStream | None:
    """What turns a choice's streamed text into deltas with tool calls; None for plain content."""
    streams = {"named": lambda: NamedCallStream(mode.name), "required": RequiredCallsStream, "auto": HermesStream}
    return streams[mode.kind]() if mode.kind in streams else None
