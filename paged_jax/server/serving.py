"""What the completions, chat and tokenizer endpoints share: the checks every request passes,
one request's life in the engine, and its Server-Sent Events.

Handlers validate, tokenize, add their requests to the engine and turn its cumulative outputs
into OpenAI responses or Server-Sent Events; they never call the engine's step. A client's
mistake is an APIError, a 4xx with OpenAI's error object naming the field; nothing a client
sends makes a 500. A client that goes away (a closed stream, or a dropped connection while a
non-streamed request runs) has its requests aborted, which frees their blocks before the next
step.

Streamed text: a request's text can shrink when a stop string completes across two pieces
(the engine cuts the text at the stop string), so while a request with stop strings runs,
its last len(longest stop) - 1 characters are held back; the pieces then always join to the
final text.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from paged_jax.engine.async_llm_engine import AsyncLLMEngine, RequestFailedError, RequestStream
from paged_jax.outputs import CompletionOutput, Logprob, RequestOutput
from paged_jax.sampling_params import SamplingParams
from paged_jax.server.protocol import ErrorInfo, ErrorResponse, SamplingFields, UsageInfo
from paged_jax.tokenizer import Tokenizer

MIN_TEMPERATURE = 1e-2  # vLLM's floor for a non-zero temperature


class APIError(Exception):
    """A request that cannot be served, with the status and OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def not_supported(field: str) -> str:
    """The 400's message for a request field the server does not implement: vLLM's for `suffix`."""
    return f"{field} is not currently supported"


class ResponseType(Protocol):
    """A response class of completions or chat, whole or streamed: they share these fields, so
    one function fills them."""

    def __call__(self, *, id: str, created: int, model: str, choices: list,
                 usage: UsageInfo | None = None) -> BaseModel: ...


@dataclass
class Prompt:
    text: str | None  # None: sent as token ids (and not decoded, unless echoed)
    token_ids: list[int]


@dataclass
class Job:
    """One HTTP request's engine requests (one per prompt) and their streams."""

    request_id: str
    prompts: list[Prompt]
    params: SamplingParams
    streams: list[RequestStream] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0  # of the choices finished so far

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                         total_tokens=prompt_tokens + self.completion_tokens)


@dataclass
class ChoiceDelta:
    """What one streamed choice has to send now."""

    prompt: int  # which of the job's prompts
    output: CompletionOutput
    text: str  # the text not sent before
    first_token: int  # the first token not sent before
    first: bool  # nothing was sent for this choice before
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # the request's (RequestOutput's)

    @classmethod
    def whole(cls, prompt: int, output: RequestOutput, choice: CompletionOutput) -> ChoiceDelta:
        """A finished choice sent at once (a response that is not streamed)."""
        return cls(prompt, choice, choice.text, 0, True, output.prompt_logprobs)


@dataclass
class _ChoiceState:
    """What a streamed choice has sent so far."""

    chars: int = 0
    tokens: int = 0
    started: bool = False  # a chunk was sent (with echo, the first carries the prompt)
    finished: bool = False


class OpenAIServing:
    """The base of each endpoint family's serving class (completion, chat, tokenization), all
    over one engine and answering to the same model names."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: Sequence[str]):
        self.engine = engine
        self.served_model_names = tuple(served_model_names)
        self.model_name = self.served_model_names[0]
        self.tokenizer: Tokenizer | None = engine.engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len
        self.vocab_size: int = engine.engine.vocab_size
        self.max_num_seqs: int = min(engine.engine.args.max_num_seqs, engine.engine.max_num_batched_tokens)

    # -- checks ---------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(404, f"the model `{model}` does not exist; this server serves "
                                f"{', '.join(self.served_model_names)}", "model", code="model_not_found")

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and the model has none (send token ids)", "prompt")
        return self.tokenizer

    def check_token_ids(self, token_ids: list[int], where: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{where}: token id {bad[0]} is not in [0, {self.vocab_size})", where)

    @staticmethod
    def check_best_of(body: SamplingFields) -> None:
        """best_of asks for best_of candidates of which the n with the highest cumulative logprob
        come back. It is refused, as vLLM's v1 engine refuses it: the best are known only once
        every candidate has finished, so such a request cannot stream, and the candidates thrown
        away take the batch's sequences for nothing; a client that wants it asks for n choices
        with logprobs and ranks them itself. best_of equal to n (or 1) picks nothing, so it passes."""
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, f"best_of {body.best_of} is not supported: this server samples no candidates to "
                                f"choose from (best_of must be n, {body.n}, or 1)", "best_of")

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        renames: dict[str, str]) -> SamplingParams:
        self.check_best_of(body)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", renames.get("max_tokens", "max_tokens"))
        temperature = 1.0 if body.temperature is None else body.temperature
        if 0 < temperature < MIN_TEMPERATURE:  # as vLLM: logits / 1e-30 overflow to inf
            temperature = MIN_TEMPERATURE
        try:
            params = SamplingParams(
                n=body.n, temperature=temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                min_p=body.min_p or 0.0, seed=body.seed, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                stop=body.stop, stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos,
                max_tokens=max_tokens, min_tokens=body.min_tokens, logprobs=logprobs,
                skip_special_tokens=body.skip_special_tokens,
                include_stop_str_in_output=body.include_stop_str_in_output)
        except ValueError as error:
            match = re.match(r"SamplingParams\.(\w+) ", str(error))
            name = match.group(1) if match else None
            param = renames.get(name, name)
            message = str(error).replace(f"SamplingParams.{name}", param) if name else str(error)
            raise APIError(400, message, param) from None
        if params.n > self.max_num_seqs:
            raise APIError(400, f"n must be at most {self.max_num_seqs} (the sequences a step can hold), "
                                f"got {params.n}", "n")
        return params

    def check_prompt(self, prompt: Prompt, params: SamplingParams, index: int | None) -> None:
        where = "prompt" if index is None else f"prompt.{index}"
        if not prompt.token_ids:
            raise APIError(400, f"{where} is empty", where)
        self.check_token_ids(prompt.token_ids, where)
        length = len(prompt.token_ids)
        if length + (params.max_tokens or 1) > self.max_model_len:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {length} and max_tokens asks for {params.max_tokens or 1} more: shorten the "
                                f"prompt or lower max_tokens", where if length >= self.max_model_len else "max_tokens")

    # -- a request's life in the engine ---------------------------------------------------------

    async def start(self, request_id: str, prompts: list[Prompt], params: SamplingParams,
                    arrival_time: float) -> Job:
        """Add one engine request per prompt; if one is refused, abort the others and raise a 400."""
        job = Job(request_id, prompts, params)
        try:
            for i, prompt in enumerate(prompts):
                engine_prompt = {"prompt": prompt.text, "prompt_token_ids": prompt.token_ids}
                job.streams.append(await self.engine.add_request(f"{request_id}-{i}", engine_prompt, params,
                                                                 arrival_time))
        except ValueError as error:
            self.abort(job)
            message = re.sub(r"^request '[^']*': ", "", str(error))
            raise APIError(400, message, "prompt" if "prompt" in message else None) from None
        except BaseException:
            self.abort(job)
            raise
        return job

    def abort(self, job: Job) -> None:
        for stream in job.streams:
            if not stream.finished:
                self.engine.abort_nowait(stream.request_id)

    async def finals(self, job: Job, request: Request) -> list[RequestOutput]:
        """Every prompt's finished output (their tokens counted in job.completion_tokens); if the
        client disconnects first, abort them all."""
        async def last(stream: RequestStream) -> RequestOutput:
            output = None
            async for output in stream:  # noqa: B007 - the last output is the one kept
                pass
            return output

        work = asyncio.ensure_future(asyncio.gather(*(last(s) for s in job.streams)))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.abort(job)
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        try:
            outputs = work.result()
        except RequestFailedError as error:
            raise APIError(500, str(error), type="server_error") from None
        job.completion_tokens = sum(len(c.token_ids) for output in outputs for c in output.outputs)
        return outputs

    # -- responses and streams ------------------------------------------------------------------

    def response(self, kind: ResponseType, job: Job, choices: list, usage: UsageInfo | None = None) -> BaseModel:
        return kind(id=job.request_id, created=job.created, model=self.model_name, choices=choices, usage=usage)

    async def deltas(self, job: Job, logprobs: bool, echo: bool = False) -> AsyncIterator[ChoiceDelta]:
        """Each choice's news as its streams bring it: new text (less the held-back tail), a
        finish, new tokens when logprobs are asked for, or (with echo) its first chunk. A
        finished choice's tokens count in job.completion_tokens."""
        states = {(i, k): _ChoiceState() for i in range(len(job.prompts)) for k in range(job.params.n)}
        holdback = max((len(s) for s in job.params.stop_strings), default=1) - 1
        async with contextlib.aclosing(_merge(job.streams)) as outputs:
            async for i, output in outputs:
                for c in output.outputs:
                    state = states[(i, c.index)]
                    if state.finished:
                        continue
                    text = _new_text(c, state, holdback)
                    new_tokens = len(c.token_ids) - state.tokens
                    if not (text or c.finish_reason or (echo and not state.started) or (logprobs and new_tokens)):
                        continue
                    delta = ChoiceDelta(i, c, text, state.tokens, not state.started, output.prompt_logprobs)
                    state.started, state.tokens, state.finished = True, len(c.token_ids), c.finish_reason is not None
                    if state.finished:
                        job.completion_tokens += len(c.token_ids)
                    yield delta

    def stream(self, job: Job, body: SamplingFields, kind: ResponseType,
               choices: AsyncIterator[BaseModel]) -> StreamingResponse:
        """The job's choices as Server-Sent Events, one chunk of type `kind` each, then the usage
        if the body asks for it."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self._events(job, kind, choices, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, job: Job, kind: ResponseType, choices: AsyncIterator[BaseModel],
                      include_usage: bool) -> AsyncIterator[str]:
        """Every stream's end: a failed request's error event, the abort that frees a dropped
        client's blocks (a no-op for a finished stream), then [DONE]."""
        try:
            async with contextlib.aclosing(choices):
                async for choice in choices:
                    yield _event(self.response(kind, job, [choice]))
                if include_usage:
                    yield _event(self.response(kind, job, [], job.usage()))
        except RequestFailedError as error:
            yield _event(ErrorResponse(error=ErrorInfo(message=str(error), type="server_error")))
        finally:
            self.abort(job)
        yield "data: [DONE]\n\n"

    # -- logprobs -------------------------------------------------------------------------------

    def token_text(self, token: int, logprob: Logprob | None = None) -> str:
        """A token's text: as the engine decoded it with its logprob if it did, else alone."""
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else f"<{token}>"


def ranked(entry: dict[int, Logprob], num: int, sampled: int | None) -> list[tuple[int, Logprob]]:
    """The top `num` tokens, most likely first (and, for completions, the sampled one, as vLLM
    returns it)."""
    chosen = [(t, lp) for t, lp in entry.items() if (lp.rank is not None and lp.rank <= num) or t == sampled]
    return sorted(chosen, key=lambda item: item[1].rank if item[1].rank is not None else num + 1)


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by now, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come. One stream (one prompt, the
    usual request) is read directly: a task per output would cost more than the output."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    pending = {asyncio.ensure_future(s.get()): i for i, s in enumerate(streams) if not s.finished}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                output = task.result()
                if not streams[i].finished:
                    pending[asyncio.ensure_future(streams[i].get())] = i
                yield i, output
    finally:
        for task in pending:
            task.cancel()


def _new_text(c: CompletionOutput, state: _ChoiceState, holdback: int) -> str:
    """The text not yet sent (all of it once the choice is finished; otherwise without the
    last `holdback` characters, which a stop string could still cut)."""
    end = len(c.text) if c.finish_reason is not None else max(state.chars, len(c.text) - holdback)
    start = state.chars
    state.chars = max(state.chars, end)
    return c.text[start:end]


def _event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
