"""/v1/completions: one engine request per prompt (a string, token ids, or a list of either),
its n choices numbered prompt * n + choice as OpenAI numbers them. `suffix` (the text after
the completion, to fill in the middle) is refused as vLLM refuses it, "suffix is not currently
supported", as every field the server does not implement is (protocol).

With echo, each choice's text starts with its prompt's text (decoded from the ids when the
prompt came as ids); with logprobs too, its logprobs start with the prompt's tokens, which
the engine scores (SamplingParams.prompt_logprobs; the first token's logprob is null, as
nothing predicts it). Echo with max_tokens 0 returns the prompt alone: how a loglikelihood
client (lm-eval's local-completions) scores a text. vLLM allows it, generating one token that
is not shown (and counted in the usage). Streamed, the prompt rides in each choice's first
chunk.

text_offset counts the characters of the tokens' texts as `tokens` shows them (vLLM's
convention), from the start of the choice's text, echoed prompt included; a streamed
choice's chunks go on from where the one before ended, so they join to the offsets of the
response that is not streamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from paged_jax.outputs import Logprob
from paged_jax.server.constraints import constrained
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
        params = self.sampling_params(body, 1 if _prompt_alone(body) else body.max_tokens, body.logprobs, {})
        params = await constrained(body, params, self.vocab_size)
        if body.echo and body.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        prompts = self.completion_prompts(body.prompt)
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt, params, i if len(prompts) > 1 else None)
        if body.echo:
            for prompt in prompts:
                if prompt.text is None and self.tokenizer is not None:
                    prompt.text = self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        job = await self.start(f"cmpl-{uuid.uuid4().hex}", prompts, params, arrival)
        if body.stream:
            return self.stream(job, body, CompletionStreamResponse, self._streamed_choices(job, body))
        outputs = await self.finals(job, request)
        choices = [self._choice(job, body, ChoiceDelta.whole(i, output, c), 0) for i, output in enumerate(outputs)
                   for c in output.outputs]
        return JSONResponse(self.response(CompletionResponse, job, choices, job.usage()).model_dump())

    async def _streamed_choices(self, job: Job, body: CompletionRequest) -> AsyncIterator[CompletionChoice]:
        """Each choice's chunks, their text offsets going on from the choice's chunk before."""
        offsets: dict[tuple[int, int], int] = {}  # (prompt, choice) -> the next token's text offset
        async with contextlib.aclosing(self.deltas(job, body.logprobs is not None, body.echo)) as deltas:
            async for delta in deltas:
                key = (delta.prompt, delta.output.index)
                choice = self._choice(job, body, delta, offsets.get(key, 0))
                if choice.logprobs is not None and choice.logprobs.tokens:
                    offsets[key] = choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1])
                yield choice

    def completion_logprobs(self, tokens: list[tuple[int, dict[int, Logprob] | None]], num: int,
                            offset: int) -> CompletionLogProbs:
        """OpenAI's completions logprobs of tokens, each with the engine's logprobs at its
        position (None for a prompt's first token: nothing predicts it) and its top `num`;
        text offsets from offset on."""
        result = CompletionLogProbs()
        for token, entry in tokens:
            own, top = None, None
            if entry is not None:
                own, top = entry.get(token), {}
                for t, lp in ranked(entry, num, token):  # two tokens with one text: the likelier shows
                    top.setdefault(self.token_text(t, lp), lp.logprob)
            piece = self.token_text(token, own)
            result.tokens.append(piece)
            result.token_logprobs.append(own.logprob if own else None)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(piece)
        return result

    def _choice(self, job: Job, body: CompletionRequest, delta: ChoiceDelta, offset: int) -> CompletionChoice:
        """A choice, or a streamed one's next chunk; with logprobs, its text offsets from offset."""
        c = delta.output
        echo = job.prompts[delta.prompt] if body.echo and delta.first else None
        shown = not _prompt_alone(body)
        text = ((echo.text or "") if echo is not None else "") + (delta.text if shown else "")
        logprobs = None
        if body.logprobs is not None:
            tokens = list(zip(echo.token_ids, delta.prompt_logprobs)) if echo is not None else []
            if shown:
                tokens += zip(c.token_ids[delta.first_token :], c.logprobs[delta.first_token :])
            logprobs = self.completion_logprobs(tokens, body.logprobs, offset)
        return CompletionChoice(index=delta.prompt * job.params.n + c.index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)


def _prompt_alone(body: CompletionRequest) -> bool:
    """Echo with max_tokens 0: the prompt is returned (and scored), nothing generated shown."""
    return body.echo and body.max_tokens == 0
