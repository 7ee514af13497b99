"""/v1/chat/completions: the messages rendered with the model's chat template into one prompt,
its n choices answered as assistant messages.

Messages carry text only (a list of content parts is joined when every part is text); the
template's own variables come from vLLM's `chat_template_kwargs`. Streamed, each choice's
first chunk carries only the role, as OpenAI sends it; logprobs are OpenAI's chat format
(a sampled token the engine has no entry for reads -inf).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.outputs import CompletionOutput
from paged_jax.server.chat_template import ChatTemplate, ChatTemplateError
from paged_jax.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    ResponseMessage,
    TopLogprob,
)
from paged_jax.server.serving import APIError, Job, OpenAIServing, Prompt, ranked


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str], chat_template: ChatTemplate | None):
        super().__init__(engine, served_model_names)
        self.chat_template = chat_template

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, kwargs: dict) -> str:
        """The prompt text of `messages`; a message it cannot take is a 400 naming it."""
        if self.chat_template is None:
            raise APIError(400, "the model has no chat template: start the server with --chat-template", "messages")
        plain = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, f"messages.{i}.content: only text parts are supported", f"messages.{i}.content")
                content = "".join(part.text for part in content)
            message = {"role": m.role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            plain.append(message)
        reserved = {"messages", "add_generation_prompt"}
        try:
            return self.chat_template.render(plain, add_generation_prompt,
                                             **{k: v for k, v in kwargs.items() if k not in reserved})
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
        text = self.render_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs or {})
        prompt = Prompt(text, self.need_tokenizer("chat").encode(text, add_special_tokens=False))
        if len(prompt.token_ids) >= self.max_model_len:
            raise APIError(400, f"the messages are {len(prompt.token_ids)} tokens; this model's maximum context "
                                f"length is {self.max_model_len}", "messages")
        if params.max_tokens is not None:
            self.check_prompt(prompt, params, None)
        job = await self.start(f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, arrival)
        top = body.top_logprobs or 0
        if body.stream:
            return self.stream(job, body, ChatCompletionStreamResponse, self._choices(job, body.logprobs, top))
        output = (await self.finals(job, request))[0]
        choices = [ChatChoice(index=c.index, message=ResponseMessage(content=c.text),
                              logprobs=self.chat_logprobs(c, 0, top) if body.logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in output.outputs]
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

    async def _choices(self, job: Job, logprobs: bool, top: int) -> AsyncIterator[ChatStreamChoice]:
        for k in range(job.params.n):  # the role first, as OpenAI sends it
            yield ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))
        async for delta in self.deltas(job, logprobs):
            c = delta.output
            yield ChatStreamChoice(index=c.index, delta=DeltaMessage(content=delta.text),
                                   logprobs=self.chat_logprobs(c, delta.first_token, top) if logprobs else None,
                                   finish_reason=c.finish_reason, stop_reason=c.stop_reason)
