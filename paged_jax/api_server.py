"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (vLLM's `vllm serve` endpoints).

Handlers validate, tokenize, add their requests to the engine and turn its cumulative outputs
into OpenAI responses or Server-Sent Events; they never call the engine's step. A client's
mistake is a 4xx with OpenAI's error object naming the field; nothing a client sends makes a
500. A client that goes away (a closed stream, or a dropped connection while a non-streamed
request runs) has its requests aborted, which frees their blocks before the next step.

Streamed text: a request's text can shrink when a stop string completes across two pieces
(the engine cuts the text at the stop string), so while a request with stop strings runs,
its last len(longest stop) - 1 characters are held back; the pieces then always join to the
final text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from paged_jax.async_engine import AsyncLLMEngine, RequestFailedError, RequestStream
from paged_jax.chat_template import ChatTemplate, ChatTemplateError
from paged_jax.metrics import ServingMetrics
from paged_jax.outputs import CompletionOutput, Logprob, RequestOutput
from paged_jax.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse,
                                ChatCompletionStreamResponse, ChatLogprob, ChatLogprobs, ChatMessage, ChatStreamChoice,
                                CompletionChoice, CompletionLogProbs, CompletionRequest, CompletionResponse,
                                CompletionStreamResponse, DeltaMessage, DetokenizeRequest, DetokenizeResponse, ErrorInfo,
                                ErrorResponse, ModelCard, ModelList, ResponseMessage, SamplingFields, TokenizeRequest,
                                TokenizeResponse, TopLogprob, UsageInfo, VersionResponse)
from paged_jax.sampling import SamplingParams
from paged_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-2  # vLLM's floor for a non-zero temperature
DEFAULT_MAX_BODY_BYTES = 10 << 20  # 10 MiB: far more than any prompt max_model_len allows


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class APIError(Exception):
    """A request that cannot be served, with the status and OpenAI error fields to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


# -- middleware (plain ASGI: they see the raw body and headers, before FastAPI parses anything) ----


class BodySizeLimit:
    """A body over max_bytes is a 413 before it is parsed: by its Content-Length when it has
    one, else as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises an HTTPException raised while reading
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def _refuse(self, scope, receive, send):
        await error_response(413, self._message(), code="request_too_large")(scope, receive, send)


class APIKeyCheck:
    """vLLM's --api-key: every /v1 request needs `Authorization: Bearer KEY`; /health,
    /metrics and the rest stay open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# -- the app ------------------------------------------------------------------------------------------


def build_app(engine: AsyncLLMEngine, config: ServerConfig, metrics: ServingMetrics,
              chat_template: ChatTemplate | None) -> FastAPI:
    api = OpenAIServing(engine, config, chat_template)
    app = FastAPI(title="paged-jax", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        message, param = describe_validation_error(error.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code)
        return error_response(error.status_code, str(error.detail), code=code)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.type, error.code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(500, f"internal server error: {type(error).__name__}", type="server_error")

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version", response_model=VersionResponse)
    async def version():
        return VersionResponse(version=_version())

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=name, root=config.model_path, max_model_len=api.max_model_len)
                               for name in config.served_model_names])

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        return api.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        return api.detokenize(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await api.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.api_key)  # outermost: no body is read without the key
    return app


def describe_validation_error(errors: Sequence[dict]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's errors: param is the field's dotted path
    (`messages.0.role`), without the union members pydantic tried (`str`, `list[int]`)."""
    if not errors:
        return "invalid request", None
    error = errors[0]
    loc = [part for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the body is not valid JSON: {detail}".rstrip(": "), None
    if not loc:
        return f"the body must be a JSON object ({error.get('msg', 'invalid')})", None
    path = []
    for part in loc:
        if isinstance(part, str) and (re.search(r"[\[\(]", part) or part in ("str", "int", "float", "bool")):
            break  # pydantic names the union member it tried here
        path.append(str(part))
    param = ".".join(path) or None
    return f"{param}: {error.get('msg', 'invalid value')}", param


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _ChoiceState:
    """What a streamed choice has sent so far."""

    chars: int = 0
    tokens: int = 0
    started: bool = False  # a chunk was sent (with echo, the first carries the prompt)
    finished: bool = False


@dataclass
class _Request:
    """One HTTP request's engine requests (one per prompt) and their streams."""

    request_id: str
    prompts: list[_Prompt]
    params: SamplingParams
    streams: list[RequestStream] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig, chat_template: ChatTemplate | None):
        self.engine = engine
        self.config = config
        self.chat_template = chat_template
        self.tokenizer: Tokenizer | None = engine.engine.tokenizer
        self.max_model_len: int = engine.engine.max_model_len
        self.vocab_size: int = engine.engine.model.config.vocab_size
        self.max_num_seqs: int = min(engine.engine.args.max_num_seqs, engine.engine.max_num_batched_tokens)

    # -- shared ---------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise APIError(404, f"the model `{model}` does not exist; this server serves "
                                f"{', '.join(self.config.served_model_names)}", "model", code="model_not_found")

    def need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, f"{what} needs a tokenizer and the model has none (send token ids)", "prompt")
        return self.tokenizer

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        renames: dict[str, str]) -> SamplingParams:
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

    def check_prompt(self, prompt: _Prompt, params: SamplingParams, index: int | None) -> None:
        where = "prompt" if index is None else f"prompt.{index}"
        if not prompt.token_ids:
            raise APIError(400, f"{where} is empty", where)
        bad = [t for t in prompt.token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{where}: token id {bad[0]} is not in [0, {self.vocab_size})", where)
        length = len(prompt.token_ids)
        if length + (params.max_tokens or 1) > self.max_model_len:
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {length} and max_tokens asks for {params.max_tokens or 1} more: shorten the "
                                f"prompt or lower max_tokens", where if length >= self.max_model_len else "max_tokens")

    async def start(self, request_id: str, prompts: list[_Prompt], params: SamplingParams,
                    arrival_time: float) -> _Request:
        """Add one engine request per prompt; if one is refused, abort the others and raise a 400."""
        job = _Request(request_id, prompts, params)
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

    def abort(self, job: _Request) -> None:
        for stream in job.streams:
            if not stream.finished:
                self.engine.abort_nowait(stream.request_id)

    async def finals(self, job: _Request, request: Request) -> list[RequestOutput]:
        """Every prompt's finished output; if the client disconnects first, abort them all."""
        async def last(stream: RequestStream) -> RequestOutput:
            output = None
            async for output in stream:
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
            return work.result()
        except RequestFailedError as error:
            raise APIError(500, str(error), type="server_error") from None

    # -- tokenizer endpoints -----------------------------------------------------------------------

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.need_tokenizer("tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send either prompt or messages", "prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            text = self.render_chat(body.messages, body.add_generation_prompt, {})
            ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokenizer = self.need_tokenizer("detokenize")
        bad = [t for t in body.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is not in [0, {self.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    # -- completions ---------------------------------------------------------------------------------

    def completion_prompts(self, prompt) -> list[_Prompt]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append(_Prompt(p, self.need_tokenizer("a text prompt").encode(p)))
            else:
                prompts.append(_Prompt(None, list(p)))
        return prompts

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
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
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._ended(job, self._stream_completion(job, body, include_usage)))
        outputs = await self.finals(job, request)
        choices, completion_tokens = [], 0
        for i, (prompt, output) in enumerate(zip(prompts, outputs)):
            for c in output.outputs:
                completion_tokens += len(c.token_ids)
                text = ((prompt.text or "") if body.echo else "") + c.text
                logprobs = self.completion_logprobs(c, 0, len(c.token_ids), body.logprobs, prompt if body.echo else None,
                                                    0) if body.logprobs is not None else None
                choices.append(CompletionChoice(index=i * params.n + c.index, text=text, logprobs=logprobs,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return JSONResponse(CompletionResponse(
            id=job.request_id, created=job.created, model=self.config.model_name, choices=choices,
            usage=_usage(prompts, completion_tokens)).model_dump())

    def completion_logprobs(self, c: CompletionOutput, start: int, stop: int, num: int, echo: _Prompt | None,
                            offset: int) -> CompletionLogProbs:
        """Logprobs of tokens [start, stop) of a completion, in OpenAI's completions format;
        with echo, the prompt's tokens first (logprob null: the engine computes none for them)."""
        result = CompletionLogProbs()
        if echo is not None:
            for token in echo.token_ids:
                piece = self._token_text(token)
                result.tokens.append(piece)
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                result.text_offset.append(offset)
                offset += len(piece)
        for token, entry in zip(c.token_ids[start:stop], (c.logprobs or [])[start:stop]):
            sampled = entry.get(token)
            piece = sampled.decoded_token if sampled and sampled.decoded_token is not None else self._token_text(token)
            result.tokens.append(piece)
            result.token_logprobs.append(sampled.logprob if sampled else None)
            top: dict[str, float] = {}
            for t, lp in _ranked(entry, num, token):  # two tokens with one text: the likelier shows
                top.setdefault(_decoded(t, lp, self), lp.logprob)
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(piece)
        return result

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else f"<{token}>"

    async def _ended(self, job: _Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Every stream's end: a failed request's error event, the abort that frees a dropped
        client's blocks (a no-op for a finished stream), then [DONE]."""
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield event
        except RequestFailedError as error:
            yield _event(ErrorResponse(error=ErrorInfo(message=str(error), type="server_error")))
        finally:
            self.abort(job)
        yield "data: [DONE]\n\n"

    async def _stream_completion(self, job: _Request, body: CompletionRequest,
                                 include_usage: bool) -> AsyncIterator[str]:
        n = job.params.n
        states = {(i, k): _ChoiceState() for i in range(len(job.prompts)) for k in range(n)}
        holdback = max((len(s) for s in job.params.stop_strings), default=1) - 1
        completion_tokens = 0
        async for i, output in _merge(job.streams):
            for c in output.outputs:
                state = states[(i, c.index)]
                if state.finished:
                    continue
                text, start = _new_text(c, state, holdback)
                new_tokens = len(c.token_ids) - state.tokens
                echo = job.prompts[i] if body.echo and not state.started else None
                if not (text or c.finish_reason or echo or (new_tokens and body.logprobs is not None)):
                    continue
                state.started = True
                if echo is not None:
                    text = (echo.text or "") + text
                logprobs = self.completion_logprobs(c, state.tokens, len(c.token_ids), body.logprobs, echo, start) \
                    if body.logprobs is not None else None
                state.tokens, state.finished = len(c.token_ids), c.finish_reason is not None
                if state.finished:
                    completion_tokens += len(c.token_ids)
                choice = CompletionChoice(index=i * n + c.index, text=text, logprobs=logprobs,
                                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                yield _event(CompletionStreamResponse(id=job.request_id, created=job.created,
                                                      model=self.config.model_name, choices=[choice]))
        if include_usage:
            yield _event(CompletionStreamResponse(id=job.request_id, created=job.created,
                                                  model=self.config.model_name, choices=[],
                                                  usage=_usage(job.prompts, completion_tokens)))

    # -- chat ------------------------------------------------------------------------------------------

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, kwargs: dict) -> str:
        if self.chat_template is None:
            raise APIError(400, "the model has no chat template: start the server with --chat-template",
                           "messages")
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

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.time()
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        renames = {"logprobs": "top_logprobs",
                   "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"}
        params = self.sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None, renames)
        text = self.render_chat(body.messages, body.add_generation_prompt, body.chat_template_kwargs or {})
        prompt = _Prompt(text, self.need_tokenizer("chat").encode(text, add_special_tokens=False))
        if len(prompt.token_ids) >= self.max_model_len:
            raise APIError(400, f"the messages are {len(prompt.token_ids)} tokens; this model's maximum context "
                                f"length is {self.max_model_len}", "messages")
        if params.max_tokens is not None:
            self.check_prompt(prompt, params, None)
        job = await self.start(f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, arrival)
        top = body.top_logprobs or 0
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(self._ended(job, self._stream_chat(job, body.logprobs, top, include_usage)))
        output = (await self.finals(job, request))[0]
        choices = [ChatChoice(index=c.index, message=ResponseMessage(content=c.text),
                              logprobs=self.chat_logprobs(c, 0, top) if body.logprobs else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in output.outputs]
        return JSONResponse(ChatCompletionResponse(
            id=job.request_id, created=job.created, model=self.config.model_name, choices=choices,
            usage=_usage([prompt], sum(len(c.token_ids) for c in output.outputs))).model_dump())

    def chat_logprobs(self, c: CompletionOutput, start: int, top: int) -> ChatLogprobs:
        content = []
        for token, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            sampled = entry.get(token)
            piece = _decoded(token, sampled, self) if sampled else self._token_text(token)
            content.append(ChatLogprob(
                token=piece, logprob=sampled.logprob if sampled else float("-inf"), bytes=list(piece.encode()),
                top_logprobs=[TopLogprob(token=(s := _decoded(t, lp, self)), logprob=lp.logprob, bytes=list(s.encode()))
                              for t, lp in _ranked(entry, top, None)]))
        return ChatLogprobs(content=content)

    async def _stream_chat(self, job: _Request, logprobs: bool, top: int, include_usage: bool) -> AsyncIterator[str]:
        states = {k: _ChoiceState() for k in range(job.params.n)}
        holdback = max((len(s) for s in job.params.stop_strings), default=1) - 1
        completion_tokens = 0

        def chunk(choice: ChatStreamChoice) -> str:
            return _event(ChatCompletionStreamResponse(id=job.request_id, created=job.created,
                                                       model=self.config.model_name, choices=[choice]))

        for k in range(job.params.n):  # the role first, as OpenAI sends it
            yield chunk(ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content="")))
        async for _, output in _merge(job.streams):
            for c in output.outputs:
                state = states[c.index]
                if state.finished:
                    continue
                text, _ = _new_text(c, state, holdback)
                new_tokens = len(c.token_ids) - state.tokens
                if not text and not c.finish_reason and not (logprobs and new_tokens):
                    continue
                lp = self.chat_logprobs(c, state.tokens, top) if logprobs else None
                state.tokens, state.finished = len(c.token_ids), c.finish_reason is not None
                if state.finished:
                    completion_tokens += len(c.token_ids)
                yield chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=text), logprobs=lp,
                                             finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        if include_usage:
            yield _event(ChatCompletionStreamResponse(id=job.request_id, created=job.created,
                                                      model=self.config.model_name, choices=[],
                                                      usage=_usage(job.prompts, completion_tokens)))


# -- helpers ---------------------------------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("paged-jax")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read by now, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come."""
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


def _new_text(c: CompletionOutput, state: _ChoiceState, holdback: int) -> tuple[str, int]:
    """The text not yet sent (all of it once the choice is finished; otherwise without the
    last `holdback` characters, which a stop string could still cut) and where it starts."""
    end = len(c.text) if c.finish_reason is not None else max(state.chars, len(c.text) - holdback)
    start = state.chars
    state.chars = max(state.chars, end)
    return c.text[start:end], start


def _ranked(entry: dict[int, Logprob], num: int, sampled: int | None) -> list[tuple[int, Logprob]]:
    """The top `num` tokens, most likely first (and, for completions, the sampled one, as vLLM
    returns it)."""
    chosen = [(t, lp) for t, lp in entry.items() if (lp.rank is not None and lp.rank <= num) or t == sampled]
    return sorted(chosen, key=lambda item: item[1].rank if item[1].rank is not None else num + 1)


def _decoded(token: int, logprob: Logprob, api: OpenAIServing) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else api._token_text(token)


def _usage(prompts: list[_Prompt], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _event(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

