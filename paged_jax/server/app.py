"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (vLLM's `vllm serve` endpoints): the
FastAPI app that routes each endpoint to its serving object (serving_completion, serving_chat,
serving_tokenize) and answers every error with OpenAI's error object.

A client's mistake is a 4xx naming the field: pydantic's validation errors become a 400 with
the field's dotted path (a field the server does not implement: "suffix is not currently
supported", vLLM's words), an APIError raised by the serving code its own status; only a bug in
the server makes a 500. The body size limit and the API key are plain ASGI middlewares, so
they act before FastAPI reads or parses a body.
"""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.server.chat_template import ChatTemplate
from paged_jax.server.metrics import ServingMetrics
from paged_jax.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from paged_jax.server.serving import APIError, not_supported
from paged_jax.server.serving_chat import OpenAIServingChat
from paged_jax.server.serving_completion import OpenAIServingCompletion
from paged_jax.server.serving_tokenize import OpenAIServingTokenization

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 10 << 20  # 10 MiB: far more than any prompt max_model_len allows


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


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
    names = config.served_model_names
    completion = OpenAIServingCompletion(engine, names)
    chat = OpenAIServingChat(engine, names, chat_template)
    tokenization = OpenAIServingTokenization(engine, names, chat)
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
        return ModelList(data=[ModelCard(id=name, root=config.model_path, max_model_len=completion.max_model_len)
                               for name in config.served_model_names])

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        return tokenization.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        return tokenization.detokenize(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await completion.create_completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat.create_chat_completion(body, request)

    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyCheck, api_key=config.api_key)  # outermost: no body is read without the key
    return app


def describe_validation_error(errors: Sequence[dict]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's errors: param is the field's dotted path
    (`messages.0.role`), without the union members pydantic tried (`str`, `list[int]`). A
    field the request does not declare is one the server does not implement."""
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
    if error.get("type") == "extra_forbidden":
        return not_supported(param), param
    return f"{param}: {error.get('msg', 'invalid value')}", param


def _version() -> str:
    try:
        return importlib.metadata.version("paged-jax")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
