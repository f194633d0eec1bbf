"""The FastAPI app: OpenAI routes as a table, API-key auth, body-size limit, OpenAI errors.

`build_http_app(serving)` is used as is by the Ray Serve ingress and by in-process servers
and tests. Every error, including validation and unknown routes, leaves as the OpenAI error
body; nothing here knows where the engine runs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import ernie_cluster
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.errors import (
    AuthenticationError,
    BadRequestError,
    EngineUnavailableError,
    OpenAIError,
    PayloadTooLargeError,
)
from ernie_cluster.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)
from ernie_cluster.serving.request_params import SESSION_HEADER, session_key

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-ernie-replica"
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


class BodySizeLimit:
    """Rejects request bodies over `limit` bytes (by Content-Length or as they stream in)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLargeError(self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except PayloadTooLargeError:
            await self._reject(send)

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.limit} bytes"

    async def _reject(self, send: Send) -> None:
        response = error_response(PayloadTooLargeError(self._message()))
        await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _respond(result, replica: str | None) -> Response:
    headers = {REPLICA_HEADER: replica} if replica else {}
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)
    return JSONResponse(result.model_dump(exclude_none=True), headers=headers)


def build_http_app(serving: OpenAIServing) -> FastAPI:
    settings = serving.settings
    app = FastAPI(
        title="ernie-cluster",
        version=ernie_cluster.__version__,
        description="OpenAI-compatible API for ERNIE-4.5 mixture-of-experts models",
    )

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token, settings.api_key):
            raise AuthenticationError(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        authorize(request)
        serving.check_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        result, replica = await serving.chat.create(body, key)
        return _respond(result, replica)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        authorize(request)
        serving.check_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        result, replica = await serving.completions.create(body, key)
        return _respond(result, replica)

    async def models(request: Request) -> ModelList:
        authorize(request)
        return serving.models()

    async def health() -> Response:
        try:
            await serving.client.check_health()
        except OpenAIError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok"})

    async def metrics() -> Response:
        return Response(
            await serving.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    routes = [
        ("/v1/chat/completions", chat_completions, ["POST"], ChatCompletionResponse),
        ("/v1/completions", completions, ["POST"], CompletionResponse),
        ("/v1/models", models, ["GET"], ModelList),
        ("/health", health, ["GET"], None),
        ("/metrics", metrics, ["GET"], None),
    ]
    for path, endpoint, methods, model in routes:
        app.add_api_route(
            path, endpoint, methods=methods, response_model=model, responses=ERROR_RESPONSES
        )

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(BadRequestError(message, param=".".join(location) or None))

    @app.exception_handler(ValueError)
    async def on_value_error(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(BadRequestError(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = OpenAIError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(error)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, EngineUnavailableError):
            return error_response(exc)
        logger.exception("unhandled error")
        return error_response(OpenAIError(f"internal error: {type(exc).__name__}"))

    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_bytes)
    return app
