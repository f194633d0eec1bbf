"""The FastAPI app: the OpenAI routes as a table, and the exception handlers that turn every
error into an OpenAI error body.

`build_http_app(serving)` is used as is by the Ray Serve ingress and by in-process servers
and tests; nothing here knows where the engine runs. The checks before parsing (size, API
key, body timeouts) are request_gate.py's; the 400s for unreadable or invalid bodies are
validation_errors.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import ernie_cluster
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.errors import (
    BadRequestError,
    EngineUnavailableError,
    OpenAIError,
    error_response,
)
from ernie_cluster.serving.metrics import with_request_counter
from ernie_cluster.serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from ernie_cluster.serving.request_gate import (
    BODY_IDLE_TIMEOUT_S,
    BODY_READ_TIMEOUT_S,
    RequestGate,
)
from ernie_cluster.serving.request_params import SESSION_HEADER, session_key
from ernie_cluster.serving.tokenize_api import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from ernie_cluster.serving.validation_errors import body_parse_problem, validation_error

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-ernie-replica"
DISCONNECT_POLL_S = 0.5
ERROR_RESPONSES = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 431, 500, 503)
}


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


def build_http_app(
    serving: OpenAIServing,
    auth_all_routes: bool | None = None,
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S,
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
) -> FastAPI:
    """The app in front of `serving`. `auth_all_routes` (default: the settings') puts /metrics
    and the API docs behind the API key too (only /health stays open); the timeouts bound how
    long a request body may take to arrive. Requests refused before a handler takes them are
    counted in the serving metrics."""
    settings = serving.settings
    if auth_all_routes is None:
        auth_all_routes = settings.auth_all_routes
    app = FastAPI(
        title="ernie-cluster",
        version=ernie_cluster.__version__,
        description="OpenAI-compatible API for ERNIE-4.5 mixture-of-experts models",
    )

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.model = serving.served_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        work = serving.chat.create(body, key, len(await request.body()))
        result, replica = await until_disconnected(request, work)
        return _respond(result, replica)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.model = serving.served_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        work = serving.completions.create(body, key, len(await request.body()))
        result, replica = await until_disconnected(request, work)
        return _respond(result, replica)

    async def models(request: Request) -> ModelList:
        return serving.models()

    async def model(model_id: str) -> ModelCard:
        return serving.model(model_id)

    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        if body.model is not None:
            serving.check_model(body.model)
        return await serving.tokenizer_routes.tokenize(body, len(await request.body()))

    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        if body.model is not None:
            serving.check_model(body.model)
        return await serving.tokenizer_routes.detokenize(body, len(await request.body()))

    async def tokenizer_info() -> Response:
        return JSONResponse(serving.tokenizer_routes.tokenizer_info())

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
        ("/v1/models/{model_id:path}", model, ["GET"], ModelCard, {}),
        ("/tokenize", tokenize, ["POST"], TokenizeResponse, {}),
        ("/detokenize", detokenize, ["POST"], DetokenizeResponse, {}),
        ("/tokenizer_info", tokenizer_info, ["GET"], None, {}),
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
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc, request))

    @app.exception_handler(ValueError)
    async def on_value_error(_: Request, exc: ValueError) -> JSONResponse:
        return error_response(BadRequestError(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        unreadable = body_parse_problem(exc)
        if unreadable is not None:
            return error_response(BadRequestError(unreadable))
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

    app.add_middleware(
        RequestGate,
        limit=settings.max_request_body_bytes,
        api_key=settings.api_key,
        auth_all_routes=auth_all_routes,
        body_read_timeout_s=body_read_timeout_s,
        body_idle_timeout_s=body_idle_timeout_s,
        max_header_bytes=settings.limits.max_header_bytes,
    )
    # NOTE: added last, so it wraps the gate and counts its 401/408/413 refusals too.
    return with_request_counter(app, serving.metrics)
