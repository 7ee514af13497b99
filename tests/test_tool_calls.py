"""Tool calls in chat completions: `tools` and `tool_choice` as vLLM serves them.

The model and tokenizer are test_structured_outputs' (a tiny random llama whose byte-level
tokenizer can write JSON), so what a constraint guarantees shows: sampled at temperature 1.0,
a named function's arguments and every call of a "required" output parse and validate against
their function's parameters, streamed or not. The model cannot be made to write a Hermes
`<tool_call>` block, so the parser of "auto" output is specified on text, and "auto" through
the server only has to answer. The server is started once for the module, with a Hermes-style
template that writes the tools' names and an assistant's calls.
"""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from test_structured_outputs import SAMPLING, SCHEMA, model_dir, served  # noqa: F401 - a fixture

from paged_jax.server.chat_template import ChatTemplate
from paged_jax.server.protocol import ChatCompletionRequest
from paged_jax.server.serving import APIError
from paged_jax.server.serving_chat import OpenAIServingChat
from paged_jax.server.tool_calls import HermesStream, RequiredCallsStream, hermes_calls, tool_mode

HERMES = ("{% for t in tools or [] %}{{ t.function.name }} {% endfor %}"
          "{% for m in messages %}"
          "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
          "{{ m.content or '' }} {% endfor %}")
PARAMETERS = {"fox": SCHEMA, "dog": {"type": "object", "required": ["q"],
                                     "properties": {"q": {"type": "string", "maxLength": 4}}}}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in PARAMETERS.items()]
USER = [{"role": "user", "content": "the quick"}]
FOX = {"type": "function", "function": {"name": "fox"}}


# -- reading calls from text -----------------------------------------------------------------------


HERMES_TEXT = ('let me look <tool_call>{"name": "fox", "arguments": {"age": 3}}</tool_call>\n'
               '<tool_call>\n{"name": "dog", "arguments": {"q": "ä"}}\n</tool_call> done')


def test_hermes_blocks_become_calls_and_the_text_around_them_content():
    content, calls = hermes_calls(HERMES_TEXT)
    assert content == "let me look \n done"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("fox", {"age": 3}),
                                                                                     ("dog", {"q": "ä"})]
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("block", [
    '<tool_call>{"name": "fox", "arguments": {"age": </tool_call>',  # not JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>["fox"]</tool_call>',  # not an object
    '<tool_call>{"name": "fox", "arguments": {}}',  # never closed (cut off by max_tokens)
])
def test_a_malformed_block_stays_content_beside_a_good_one(block):
    content, calls = hermes_calls(f'<tool_call>{{"name": "dog", "arguments": {{}}}}</tool_call>a {block}')
    assert content == f"a {block}"
    assert [(c.function.name, c.function.arguments) for c in calls] == [("dog", "{}")]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_streamed_hermes_text_sends_content_as_it_comes_and_each_block_as_a_call_once_closed(size):
    """Pieces of any size give what the whole text gives; a `<tool` that never becomes a block
    and an unclosed one at the end are content. What cannot begin a block is sent at once."""
    assert HermesStream().feed("let me look <tool", False).content == "let me look "
    text = HERMES_TEXT + " <tool x <tool_call>{}"
    stream, content, calls = HermesStream(), "", []
    for start in range(0, len(text), size):
        delta = stream.feed(text[start:start + size], start + size >= len(text))
        content += delta.content or ""
        calls += delta.tool_calls or []
    whole_content, whole_calls = hermes_calls(text)
    assert content == whole_content
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (i, c.function.name, c.function.arguments) for i, c in enumerate(whole_calls)]


def test_text_without_blocks_is_all_content():
    assert hermes_calls("  just words ") == ("just words", [])
    assert hermes_calls("") == (None, [])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_streamed_required_array_gives_each_call_its_name_first_then_its_arguments(size):
    """Strings with brackets, quotes, escapes and a "name" key inside the parameters do not
    confuse the scan; pieces of any size join to the parameters' text."""
    calls = [{"name": "fox", "parameters": {"name": "a}\"{[", "age": 1, "ok": True}},
             {"name": "dog", "parameters": {"q": "\\\\"}}]
    text = " [ " + " , ".join(json.dumps(c) for c in calls) + " ] "
    stream, deltas = RequiredCallsStream(), []
    for start in range(0, len(text), size):
        deltas += stream.feed(text[start:start + size], start + size >= len(text)).tool_calls
    assert [(d.index, d.function.name) for d in deltas if d.id] == [(0, "fox"), (1, "dog")]
    arguments = defaultdict(str)
    for d in deltas:
        assert d.function.name is None or arguments[d.index] == ""  # the name comes before any argument
        arguments[d.index] += d.function.arguments
    assert [json.loads(arguments[i]) for i in (0, 1)] == [c["parameters"] for c in calls]


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"messages": USER, "tools": TOOLS, **kwargs})


@pytest.mark.parametrize("tool_choice", ["auto", None])  # no tool_choice with tools is auto, as vLLM reads it
def test_auto_is_a_400_where_the_chat_template_declares_no_tool_call_format(tool_choice):
    with pytest.raises(APIError) as error:
        tool_mode(request(tool_choice=tool_choice), ChatTemplate("{{ messages[0].content }}"))
    assert error.value.status == 400 and error.value.param == "tool_choice"
    assert "declares none" in error.value.message


def test_tools_and_a_conversation_with_calls_reach_the_template_as_transformers_gives_them():
    """An assistant's calls with their arguments as an object (what templates expect, as vLLM
    passes them), a tool result with its tool_call_id, and the tools as sent."""
    template = ChatTemplate("{{ messages | tojson }}\n{{ tools | tojson }}")
    call = {"id": "c1", "type": "function", "function": {"name": "dog", "arguments": '{"q": "a"}'}}
    body = request(messages=[*USER, {"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "woof"}])
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    text = OpenAIServingChat.render_chat(SimpleNamespace(chat_template=template), body.messages, True, {}, tools)
    messages, sent_tools = text.split("\n")
    assert json.loads(messages)[1:] == [
        {"role": "assistant", "tool_calls": [{**call, "function": {"name": "dog", "arguments": {"q": "a"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "woof"}]
    assert json.loads(sent_tools) == TOOLS


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):  # noqa: F811 - model_dir is the fixture
    (model_dir / "hermes.jinja").write_text(HERMES)
    with served(model_dir, "hermes.jinja", tmp_path_factory) as c:
        yield c


def ask(client, tool_choice, stream: bool, n: int = 1, messages=USER) -> list[tuple[list[dict], str]]:
    """Each choice's calls ({"id", "name", "arguments"}, the arguments parsed) and finish_reason;
    streamed, the calls are put together from their deltas."""
    response = client.chat.completions.create(messages=messages, tools=TOOLS, tool_choice=tool_choice, n=n,
                                              stream=stream, **{**SAMPLING, "max_tokens": None})
    if not stream:
        assert all(c.message.content is None for c in response.choices)
        return [([{"id": t.id, "name": t.function.name, "arguments": json.loads(t.function.arguments)}
                  for t in c.message.tool_calls], c.finish_reason) for c in response.choices]
    calls, finished = defaultdict(list), {}
    for chunk in response:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    assert delta.index == len(calls[choice.index]) and delta.type == "function"
                    calls[choice.index].append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                calls[choice.index][delta.index]["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    return [([{**c, "arguments": json.loads(c["arguments"])} for c in calls[k]], finished[k]) for k in range(n)]


def assert_valid(calls: list[dict]) -> None:
    for c in calls:
        assert c["id"].startswith("chatcmpl-tool-")
        jsonschema.validate(c["arguments"], PARAMETERS[c["name"]])


def without_ids(choices: list[tuple[list[dict], str]]) -> list:
    return [([{k: v for k, v in c.items() if k != "id"} for c in calls], reason) for calls, reason in choices]


def test_a_named_function_is_called_once_with_arguments_valid_against_its_parameters(client):
    """Streamed, the same seed puts together the same calls."""
    choices = ask(client, FOX, False, n=2)
    for calls, finish_reason in choices:
        assert [c["name"] for c in calls] == ["fox"] and finish_reason == "stop"  # vLLM's, for a named function
        assert_valid(calls)
    assert without_ids(ask(client, FOX, True, n=2)) == without_ids(choices)


def test_required_calls_one_or_more_tools_with_valid_arguments(client):
    choices = ask(client, "required", False, n=2)
    for calls, finish_reason in choices:
        assert calls and finish_reason == "tool_calls"
        assert_valid(calls)
    assert without_ids(ask(client, "required", True, n=2)) == without_ids(choices)


def test_a_conversation_with_a_call_and_its_result_is_accepted(client):
    [(calls, _)] = ask(client, FOX, False)
    call = {"id": calls[0]["id"], "type": "function",
            "function": {"name": "fox", "arguments": json.dumps(calls[0]["arguments"])}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "ok"}]
    [(again, _)] = ask(client, "required", False, messages=messages)
    assert_valid(again)


@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_auto_with_a_hermes_template_and_none_answer_with_whatever_the_model_wrote(client, tool_choice):
    """A random model writes no <tool_call>: its text is the content, streamed or not."""
    kwargs = dict(messages=USER, tools=TOOLS, tool_choice=tool_choice, **{**SAMPLING, "max_tokens": 8})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "length" and choice.message.content and choice.message.tool_calls == []
    chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == choice.message.content
    assert not any(c.delta.tool_calls for c in chunks) and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("kwargs, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "cat"}}), "tool_choice.function.name"),
    (dict(tools=[{"type": "retrieval"}]), "tools.0.type"),
    (dict(tools=[{"type": "function", "function": {"name": "fox", "parameters": {"type": 5}}}], tool_choice="required"),
     "tools.0.function.parameters"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=None, tool_choice="required"), "tool_choice"),
])
def test_a_tool_request_it_cannot_serve_is_a_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"messages": USER, "tools": TOOLS, **SAMPLING, **kwargs})
    assert error.value.body["param"] == param, error.value.body
