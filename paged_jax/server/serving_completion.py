"""/v1/completions: one engine request per prompt (a string, token ids, or a list of either),
its n choices numbered prompt * n + choice as OpenAI numbers them.

With echo, each choice's text starts with its prompt's text (decoded from the ids when the
prompt came as ids), and its logprobs with the prompt's tokens, whose logprob is null: the
engine computes none for them. Streamed, the prompt rides in each choice's first chunk.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from paged_jax.outputs import CompletionOutput
from paged_jax.server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from paged_jax.server.serving import APIError, ChoiceDelta, Job, OpenAIServing, Prompt, ranked


class OpenAIServingCompletion(OpenAIServing):
    def completion_prompts(self, prompt) -> list[Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append(Prompt(p, self.need_tokenizer("a text prompt").encode(p)))
            else:
                prompts.append(Prompt(None, list(p)))
        return prompts

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        arrival = time.time()
        self.check_model(body.model)
        params = self.sampling_params(body, body.max_tokens, body.logprobs, {})
        prompts = self.completion_prompts(body.prompt)
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt, params, i if len(prompts) > 1 else None)
        if body.echo:
            for prompt in prompts:
                if prompt.text is None and self.tokenizer is not None:
                    prompt.text = self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        job = await self.start(f"cmpl-{uuid.uuid4().hex}", prompts, params, arrival)
        if body.stream:
            deltas = self.deltas(job, body.logprobs is not None, body.echo)
            return self.stream(job, body, CompletionStreamResponse, (self._choice(job, body, d) async for d in deltas))
        outputs = await self.finals(job, request)
        choices = [self._choice(job, body, ChoiceDelta.whole(i, c)) for i, output in enumerate(outputs)
                   for c in output.outputs]
        return JSONResponse(self.response(CompletionResponse, job, choices, job.usage()).model_dump())

    def completion_logprobs(self, c: CompletionOutput, start: int, stop: int, num: int, echo: Prompt | None,
                            offset: int) -> CompletionLogProbs:
        """Logprobs of tokens [start, stop) of a completion, in OpenAI's completions format;
        with echo, the prompt's tokens first (logprob null: the engine computes none for them)."""
        result = CompletionLogProbs()
        if echo is not None:
            for token in echo.token_ids:
                piece = self.token_text(token)
                result.tokens.append(piece)
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                result.text_offset.append(offset)
                offset += len(piece)
        for token, entry in zip(c.token_ids[start:stop], (c.logprobs or [])[start:stop]):
            sampled = entry.get(token)
            piece = self.token_text(token, sampled)
            result.tokens.append(piece)
            result.token_logprobs.append(sampled.logprob if sampled else None)
            top: dict[str, float] = {}
            for t, lp in ranked(entry, num, token):  # two tokens with one text: the likelier shows
                top.setdefault(self.token_text(t, lp), lp.logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(piece)
        return result

    def _choice(self, job: Job, body: CompletionRequest, delta: ChoiceDelta) -> CompletionChoice:
        c = delta.output
        echo = job.prompts[delta.prompt] if body.echo and delta.first else None
        text = ((echo.text or "") if echo is not None else "") + delta.text
        logprobs = self.completion_logprobs(c, delta.first_token, len(c.token_ids), body.logprobs, echo,
                                            delta.offset) if body.logprobs is not None else None
        return CompletionChoice(index=delta.prompt * job.params.n + c.index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)
