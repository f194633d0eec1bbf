"""The FastAPI app: OpenAI routes as a table, API-key auth, body-size limit, OpenAI errors.

`build_http_app(serving)` is used as is by the Ray Serve ingress and by in-process servers
and tests. Every error, including validation and unknown routes, leaves as the OpenAI error
body; nothing here knows where the engine runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
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
DISCONNECT_POLL_S = 0.5
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}


class RequestGate:
    """Checks that run before FastAPI parses anything: the API key on /v1 routes (so a bad
    body without a key is a 401, not a 400), then the body size (413 by Content-Length, or
    after buffering a chunked body, which FastAPI would otherwise report as a parse error)."""

    def __init__(self, app: ASGIApp, limit: int, api_key: str | None) -> None:
        self.app = app
        self.limit = limit
        self.api_key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("path", "").startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token, self.api_key):
                error = AuthenticationError(
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await self._send_error(error, send)
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                await self._send_error(PayloadTooLargeError(self._message()), send)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:  # no Content-Length: read (up to the limit) before deciding
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._send_error(PayloadTooLargeError(self._message()), send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _message(self) -> str:
        return f"request body exceeds the limit of {self.limit} bytes"

    async def _send_error(self, error: OpenAIError, send: Send) -> None:
        await error_response(error)({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


def _respond(result, replica: str | None) -> Response:
    headers = {REPLICA_HEADER: replica} if replica else {}
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)
    body = result.model_dump(exclude_none=True)
    for choice in body.get("choices", ()):
        if "message" in choice:  # OpenAI sends content: null (e.g. beside tool calls)
            choice["message"].setdefault("content", None)
    return JSONResponse(body, headers=headers)


async def until_disconnected(request: Request, work: Awaitable):
    """Run `work`; cancel it (aborting its engine requests) if the client goes away first.
    Streams need no watcher: the server cancels them on disconnect."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientDisconnected()


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def build_http_app(serving: OpenAIServing) -> FastAPI:
    settings = serving.settings
    app = FastAPI(
        title="ernie-cluster",
        version=ernie_cluster.__version__,
        description="OpenAI-compatible API for ERNIE-4.5 mixture-of-experts models",
    )

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        serving.check_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        result, replica = await until_disconnected(request, serving.chat.create(body, key))
        return _respond(result, replica)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        serving.check_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        result, replica = await until_disconnected(request, serving.completions.create(body, key))
        return _respond(result, replica)

    async def models(request: Request) -> ModelList:
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

    sse_or_json = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}
    prometheus = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
    routes = [
        ("/v1/chat/completions", chat_completions, ["POST"], ChatCompletionResponse, sse_or_json),
        ("/v1/completions", completions, ["POST"], CompletionResponse, sse_or_json),
        ("/v1/models", models, ["GET"], ModelList, {}),
        ("/health", health, ["GET"], None, {}),
        ("/metrics", metrics, ["GET"], None, prometheus),
    ]
    for path, endpoint, methods, model, extra in routes:
        app.add_api_route(
            path,
            endpoint,
            methods=methods,
            response_model=model,
            responses={**ERROR_RESPONSES, **extra},
            response_class=PlainTextResponse if path == "/metrics" else JSONResponse,
        )

    @app.exception_handler(ClientDisconnected)
    async def on_disconnect(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

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

    app.add_middleware(RequestGate, limit=settings.max_request_body_bytes, api_key=settings.api_key)
    return app
