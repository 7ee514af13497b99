"""Chat templates in the style each supported family ships render exactly as transformers'
`apply_chat_template` renders them, from the same checkpoint files.

Each template below is written for these tests in its family's style, with the constructs the
real ones use: Llama 3's headers, `trim` and today's date from `strftime_now`; Qwen3's (and
Qwen3-MoE's) ChatML turns, `namespace`, `is string` tests, `tojson` tools and `enable_thinking`;
Mistral's (and Mixtral's) `[INST]` turns with an alternation check and `tools is not none`;
Gemma's (2 and 3) `<start_of_turn>` turns, "model" for the assistant and the system prompt folded
into the first user turn; Phi-3's `<|user|>`/`<|end|>`; and the OpenAssistant format of chat
fine-tunes of GPT-NeoX/Pythia (whose base checkpoints have no template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace

import jinja2
import pytest
import transformers.utils.chat_template_utils
from hf_checkpoints import save_tokenizer
from transformers import AutoTokenizer

from paged_jax.server import chat_template
from paged_jax.server.chat_template import ChatTemplateError, load_chat_template
from paged_jax.server.protocol import ChatCompletionRequest
from paged_jax.server.serving_chat import OpenAIServingChat

LLAMA3 = """\
{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_prompt = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_prompt = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + date_string + '\\n\\n' + system_prompt + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- 'You may call these functions:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' and message.content is string %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

MISTRAL = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_prompt = messages[0]['content'] %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set turns = messages %}
{%- endif %}
{%- set questions = turns | selectattr('role', 'equalto', 'user') | list %}
{{- bos_token }}
{%- for message in turns %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if tools is not none and message == questions[-1] %}
            {{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}
        {%- endif %}
        {%- if system_prompt is defined and message == questions[-1] %}
            {{- '[INST] ' + system_prompt + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported after the system prompt') }}
    {%- endif %}
{%- endfor %}
"""

# Written without whitespace control, as Gemma's and Phi-3's are: the layout relies on
# trim_blocks and lstrip_blocks.
GEMMA = """\
{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {% set preamble = messages[0]['content'] | trim + '\\n\\n' %}
    {% set turns = messages[1:] %}
{% else %}
    {% set preamble = '' %}
    {% set turns = messages %}
{% endif %}
{% for message in turns %}
    {% if (message['role'] == 'user') != (loop.index0 is even) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<start_of_turn>{{ role }}
{{ (preamble if loop.first else '') + message['content'] | trim }}<end_of_turn>
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}
"""

PHI3 = """\
{% for message in messages %}
    {% if message['role'] in ['system', 'user', 'assistant'] %}
<|{{ message['role'] }}|>
{{ message['content'] }}<|end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% else %}
{{ eos_token }}
{%- endif %}
"""

GPT_NEOX = """\
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        <|prompter|>
    {%- else -%}
        <|{{ message['role'] }}|>
    {%- endif -%}
    {{ message['content'] + eos_token }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    <|assistant|>
{%- endif -%}
"""


@dataclass(frozen=True)
class Family:
    template: str
    special_tokens: dict[str, str]  # as the family's tokenizer_config.json names them


FAMILIES = {
    "llama3": Family(LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen3": Family(QWEN3, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "mistral": Family(MISTRAL, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "gemma": Family(GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}),
    "phi3": Family(PHI3, {"bos_token": "<s>", "eos_token": "<|endoftext|>"}),
    "gpt_neox": Family(GPT_NEOX, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}),
}

THINKING = "<think>\nThe capital of France is Paris.\n</think>\n\n"
CONVERSATIONS = {
    "system prompt and two turns": [
        {"role": "system", "content": "  You answer in one word.\n"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": THINKING + "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    "a finished exchange": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": THINKING + "Paris. "},
    ],
    "a single question": [{"role": "user", "content": '\n Is <b>"é" & ü</b> HTML?  '}],
}
NOT_ALTERNATING = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi."},
    {"role": "user", "content": "Hello?"},
]
WITHOUT_CONTENT = [
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": None},
    {"role": "user", "content": "Hello?"},
]
TOOLS = [{"type": "function", "function": {"name": "capital", "description": "The capital of <country>",
                                           "parameters": {"type": "object",
                                                          "properties": {"country": {"type": "string"}}}}}]


def checkpoint(directory, family: str):
    """transformers' tokenizer and our template, loaded from the same checkpoint files."""
    directory.mkdir(exist_ok=True)
    save_tokenizer(directory)
    settings = {**FAMILIES[family].special_tokens, "chat_template": FAMILIES[family].template}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return AutoTokenizer.from_pretrained(directory), load_chat_template(directory)


def outcome(render, messages) -> str | None:
    """The rendered text, or None where the template refused the messages."""
    try:
        return render(messages, add_generation_prompt=True)
    except (jinja2.TemplateError, ChatTemplateError):
        return None


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_renders_as_transformers_renders_it(tmp_path, family, conversation, add_generation_prompt):
    hf, ours = checkpoint(tmp_path, family)
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render(messages, add_generation_prompt) == expected


def test_the_family_formats_are_the_ones_their_checkpoints_use(tmp_path):
    """A guard on the templates above: the oracle is only as good as what it is asked."""
    messages = CONVERSATIONS["system prompt and two turns"]
    rendered = {family: checkpoint(tmp_path / family, family)[1].render(messages) for family in FAMILIES}
    assert rendered["llama3"].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert rendered["llama3"].endswith("And of Italy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendered["qwen3"] == ("<|im_start|>system\n  You answer in one word.\n<|im_end|>\n"
                                 "<|im_start|>user\nCapital of France?<|im_end|>\n"
                                 "<|im_start|>assistant\nParis.<|im_end|>\n"
                                 "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered["mistral"] == ("<s>[INST] Capital of France?[/INST] " + THINKING + "Paris.</s>"
                                   "[INST]   You answer in one word.\n\n\nAnd of Italy?[/INST]")
    assert rendered["gemma"] == ("<bos><start_of_turn>user\nYou answer in one word.\n\n"
                                 "Capital of France?<end_of_turn>\n"
                                 "<start_of_turn>model\n" + THINKING.strip() + "\n\nParis.<end_of_turn>\n"
                                 "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n")
    assert rendered["phi3"].startswith("<|system|>\n  You answer in one word.\n<|end|>\n<|user|>\n")
    assert rendered["phi3"].endswith("<|user|>\nAnd of Italy?<|end|>\n<|assistant|>\n")
    assert rendered["gpt_neox"].endswith("<|prompter|>And of Italy?<|endoftext|><|assistant|>")


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_roles_that_do_not_alternate_are_refused(tmp_path, family):
    hf, ours = checkpoint(tmp_path, family)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf.apply_chat_template(NOT_ALTERNATING, tokenize=False)
    with pytest.raises(ChatTemplateError, match="must alternate"):
        ours.render(NOT_ALTERNATING)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_message_without_content_is_rendered_or_refused_as_transformers_does(tmp_path, family):
    """transformers drops a message's keys whose value is None (OpenAI's `content: null`), so the
    template sees no content rather than the text "None"."""
    hf, ours = checkpoint(tmp_path, family)
    expected = outcome(lambda *a, **k: hf.apply_chat_template(*a, tokenize=False, **k), WITHOUT_CONTENT)
    assert outcome(ours.render, WITHOUT_CONTENT) == expected


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_enable_thinking_switches_the_empty_think_block(tmp_path, enable_thinking):
    hf, ours = checkpoint(tmp_path, "qwen3")
    messages = CONVERSATIONS["system prompt and two turns"]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=enable_thinking)
    assert ours.render(messages, True, enable_thinking=enable_thinking) == expected
    assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") != enable_thinking


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_tools_reach_the_template_as_transformers_passes_them(tmp_path, family):
    hf, ours = checkpoint(tmp_path, family)
    messages = CONVERSATIONS["system prompt and two turns"]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.render(messages, True, tools=TOOLS) == expected
    assert json.dumps(TOOLS[0]) in expected  # as JSON, its "<" unescaped


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 12, 0)


def test_llama3_dates_the_system_turn_today_unless_told_a_date(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.utils.chat_template_utils, "datetime", FrozenClock)
    monkeypatch.setattr(chat_template, "datetime", FrozenClock)
    hf, ours = checkpoint(tmp_path, "llama3")
    messages = CONVERSATIONS["a single question"]
    today = ours.render(messages)
    assert today == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Today Date: 26 Jul 2024\n\n" in today
    told = ours.render(messages, date_string="01 Jan 2025")
    assert told == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025\n\n" in told


def test_a_chat_request_hands_its_chat_template_kwargs_and_messages_to_the_template(tmp_path):
    hf, ours = checkpoint(tmp_path, "qwen3")
    body = ChatCompletionRequest.model_validate({
        "model": "qwen3", "chat_template_kwargs": {"enable_thinking": False},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital "},
                                                  {"type": "text", "text": "of France?"}]},
                     {"role": "assistant", "content": None},
                     {"role": "user", "content": "Well?"}]})
    serving = SimpleNamespace(chat_template=ours)  # rendering needs the template, not an engine
    text = OpenAIServingChat.render_chat(serving, body.messages, body.add_generation_prompt, body.chat_template_kwargs)
    expected = hf.apply_chat_template([{"role": "user", "content": "Capital of France?"},
                                       {"role": "assistant", "content": None}, {"role": "user", "content": "Well?"}],
                                      tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == expected
    assert text.endswith("<think>\n\n</think>\n\n")
