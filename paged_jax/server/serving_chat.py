"""/v1/chat/completions: the messages rendered with the model's chat template into one prompt,
its n choices answered as assistant messages.

Messages carry text only (a list of content parts is joined when every part is text, with
nothing beside it), and an assistant's tool calls or a tool's result, so a client can send a
conversation with tools back; the template's own variables come from vLLM's
`chat_template_kwargs`, and `tools` from the request (tool_calls.py: what tool_choice makes of
the output). Streamed, each choice's first chunk carries only the role, as OpenAI sends it;
logprobs are OpenAI's chat format (a sampled token the engine has no entry for reads -inf).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.outputs import CompletionOutput
from paged_jax.server.chat_template import ChatTemplate, ChatTemplateError
from paged_jax.server.constraints import constrained
from paged_jax.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    ContentPart,
    DeltaMessage,
    ResponseMessage,
    ToolCall,
    TopLogprob,
)
from paged_jax.server.serving import APIError, Job, OpenAIServing, Prompt, not_supported, ranked
from paged_jax.server.tool_calls import ToolMode, call_stream, finish_reason, tool_calls, tool_grammar, tool_mode


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], chat_template: ChatTemplate | None):
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, kwargs: dict,
                    tools: list[dict] | None = None) -> str:
        """The prompt text of `messages` (and `tools`, as the client sent them); a message it
        cannot take is a 400 naming it."""
        if self.chat_template is None:
            raise APIError(400, "the model has no chat template: start the server with --chat-template", "messages")
        plain = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                content = "".join(_text(part, f"messages.{i}.content.{j}") for j, part in enumerate(content))
            message = {"role": m.role, "content": content, "name": m.name, "tool_call_id": m.tool_call_id}
            if m.tool_calls is not None:
                message["tool_calls"] = [_template_call(c, f"messages.{i}.tool_calls.{j}")
                                         for j, c in enumerate(m.tool_calls)]
            plain.append(message)
        variables = {k: v for k, v in kwargs.items() if k not in ("messages", "add_generation_prompt")}
        if tools is not None:
            variables["tools"] = tools
        try:
            return self.chat_template.render(plain, add_generation_prompt, **variables)
        except ChatTemplateError as error:
            raise APIError(400, str(error), "messages") from None

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.time()
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        renames = {"logprobs": "top_logprobs",
                   "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"}
        params = self.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, renames)
        mode = tool_mode(body, self.chat_template)
        params = await constrained(body, params, self.vocab_size, await tool_grammar(body, mode))
        tools = None if body.tools is None else [t.model_dump(exclude_none=True) for t in body.tools]
        text = self.render_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs or {}, tools)
        prompt = Prompt(text, self.need_tokenizer("chat").encode(text, add_special_tokens=False))
        if len(prompt.token_ids) >= self.max_model_len:
            raise APIError(400, f"the messages are {len(prompt.token_ids)} tokens; this model's maximum context "
                                f"length is {self.max_model_len}", "messages")
        if params.max_tokens is not None:
            self.check_prompt(prompt, params, None)
        job = await self.start(f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, arrival)
        top = body.top_logprobs or 0
        if body.stream:
            return self.stream(job, body, ChatCompletionStreamResponse, self._choices(job, body.logprobs, top, mode))
        output = (await self.finals(job, request))[0]
        choices = []
        for c in output.outputs:
            content, calls = tool_calls(mode, c.text)
            choices.append(ChatChoice(index=c.index, message=ResponseMessage(content=content, tool_calls=calls),
                                      logprobs=self.chat_logprobs(c, 0, top) if body.logprobs else None,
                                      finish_reason=finish_reason(mode, c, bool(calls)), stop_reason=c.stop_reason))
        return JSONResponse(self.response(ChatCompletionResponse, job, choices, job.usage()).model_dump())

    def chat_logprobs(self, c: CompletionOutput, start: int, top: int) -> ChatLogprobs:
        content = []
        for token, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            sampled = entry.get(token)
            piece = self.token_text(token, sampled)
            content.append(ChatLogprob(
                token=piece, logprob=sampled.logprob if sampled else float("-inf"), bytes=list(piece.encode()),
                top_logprobs=[TopLogprob(token=(s := self.token_text(t, lp)), logprob=lp.logprob,
                                         bytes=list(s.encode())) for t, lp in ranked(entry, top, None)]))
        return ChatLogprobs(content=content)

    async def _choices(self, job: Job, logprobs: bool, top: int, mode: ToolMode) -> AsyncIterator[ChatStreamChoice]:
        """Each choice's text as content, or, when tool_choice constrains it, as pieces of its
        tool calls."""
        calls = [call_stream(mode) for _ in range(job.params.n)]
        for k in range(job.params.n):  # the role first, as OpenAI sends it
            yield ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
        async for delta in self.deltas(job, logprobs):
            c = delta.output
            stream = calls[c.index]
            message = DeltaMessage(content=delta.text) if stream is None else stream.feed(
                delta.text, c.finish_reason is not None)
            if not (message.content or message.tool_calls or c.finish_reason or logprobs):
                continue  # a tool-call stream holds what it has so far
            yield ChatStreamChoice(index=c.index, delta=message,
                                   logprobs=self.chat_logprobs(c, delta.first_token, top) if logprobs else None,
                                   finish_reason=finish_reason(mode, c, bool(stream and stream.calls)),
                                   stop_reason=c.stop_reason)


def _text(part: ContentPart, where: str) -> str:
    """A text part's text; any other part, or a field beside the text, is a 400 naming it."""
    if part.type != "text" or part.text is None:
        raise APIError(400, f"{where}: only text parts are supported", where)
    if part.model_extra:
        field = f"{where}.{next(iter(part.model_extra))}"
        raise APIError(400, not_supported(field), field)
    return part.text


def _template_call(c: ToolCall, where: str) -> dict:
    """An assistant's tool call as templates read it (as vLLM gives it to them): the arguments
    an object, not the JSON text the client sent."""
    try:
        arguments = json.loads(c.function.arguments)
    except json.JSONDecodeError:
        raise APIError(400, f"{where}.function.arguments is not JSON", f"{where}.function.arguments") from None
    return {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": arguments}}
