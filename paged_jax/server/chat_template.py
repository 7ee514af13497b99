"""Chat templates: messages -> prompt text, rendered as Hugging Face's `apply_chat_template`
renders them, so a checkpoint's chat format is the one its authors trained with.

The template comes from `--chat-template` (a file or the template itself), else the
checkpoint's `chat_template.jinja` (what transformers >= 4.50 writes), else
`chat_template` in its tokenizer_config.json (a string, or a list of named templates of which
"default" is used). Like Hugging Face: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, the loop-controls extension, `raise_exception`, `strftime_now`, a `tojson` that
does not escape HTML, and the special tokens (bos_token, eos_token, ...) as variables. The
rendered text already holds any BOS the template writes, so it is tokenized without special
tokens, as `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or it is broken): a client error."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    Hugging Face; rendering only needs its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.template = env.from_string(source)  # a syntax error shows at start-up, not per request
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The template sees what `apply_chat_template` gives it: a message's keys whose value is
        None left out (so OpenAI's `content: null` reads as no content, not the text "None"), and
        `tools` and `documents` set to None unless given (templates test `tools is not none`).
        Raises ChatTemplateError when the template refuses the messages (e.g. roles that do not
        alternate) or fails on them."""
        messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(f"the chat template refused the messages: {error}") from None
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as error:
            raise ChatTemplateError(f"the chat template failed on the messages: {type(error).__name__}: {error}") \
                from None


def load_chat_template(model_dir: str | Path, override: str | None = None) -> ChatTemplate | None:
    """The template to use, or None if neither the flag nor the checkpoint has one."""
    model_dir = Path(model_dir)
    settings = _read_json(model_dir / "tokenizer_config.json")
    if override is not None:
        path = Path(override)
        source = path.read_text() if _is_file(path) else override
    elif (model_dir / "chat_template.jinja").is_file():
        source = (model_dir / "chat_template.jinja").read_text()
    else:
        source = settings.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
    special = {}
    for name in SPECIAL_TOKENS:
        token = settings.get(name)
        if isinstance(token, dict):  # {"content": "</s>", ...}
            token = token.get("content")
        if isinstance(token, str):
            special[name] = token
    return ChatTemplate(source, special)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a template string too long to be a path
        return False


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
