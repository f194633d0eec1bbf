"""The FastAPI app: OpenAI routes as a table, API-key auth, body limits, OpenAI errors.

`build_http_app(serving)` is used as is by the Ray Serve ingress and by in-process servers
and tests. Every error, including validation and unknown routes, leaves as the OpenAI error
body; nothing here knows where the engine runs.

Routes open without the API key: /health always (probes); /metrics, /docs, /redoc and
/openapi.json unless `auth_all_routes` is set. Every /v1 route needs the key when one is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

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
    HeadersTooLargeError,
    OpenAIError,
    PayloadTooLargeError,
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
from ernie_cluster.serving.request_params import SESSION_HEADER, session_key
from ernie_cluster.serving.tokenize_api import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-ernie-replica"
DISCONNECT_POLL_S = 0.5
ERROR_RESPONSES = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 431, 500, 503)
}
BODY_READ_TIMEOUT_S = 60.0
"""Longest a client may take to send a whole request body."""
BODY_IDLE_TIMEOUT_S = 15.0
"""Longest a client may pause between two pieces of a request body."""
OPEN_PATHS = ("/health",)
"""Paths that never need the API key (Kubernetes probes)."""
KEYED_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")
"""Paths outside /v1 that need the API key as the /v1 routes do (vLLM's tokenizer routes)."""


class RequestTimeoutError(OpenAIError):
    status_code = 408
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        # NOTE: the body was not read to its end, so the connection cannot carry another
        # request: ask the server to close it.
        super().__init__(message, code="request_timeout", headers={"Connection": "close"})


class RequestGate:
    """Checks that run before FastAPI parses anything.

    1. The size of the request line and headers: 431 past `max_header_bytes`.
    2. The API key (so a bad body without a key is a 401, not a 400), with
       `WWW-Authenticate: Bearer` on the 401.
    3. The body size: 413 by Content-Length, or once a body without one passes the limit.
    4. The body read, buffered here under two timeouts: a client that declares 1000 bytes and
       sends 10 gets a 408 after `body_idle_timeout_s` instead of holding the connection
       (slowloris); a trickle of bytes gets one after `body_read_timeout_s`. A client that
       leaves mid-body gets nothing (the request counts as aborted).
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        api_key: str | None,
        auth_all_routes: bool = False,
        body_read_timeout_s: float = BODY_READ_TIMEOUT_S,
        body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
        max_header_bytes: int = 65536,
    ) -> None:
        if body_read_timeout_s <= 0 or body_idle_timeout_s <= 0:
            raise ValueError(
                f"body timeouts must be > 0, got read {body_read_timeout_s} s and idle "
                f"{body_idle_timeout_s} s"
            )
        self.app = app
        self.limit = limit
        self.api_key = api_key.encode() if api_key is not None else None
        self.auth_all_routes = auth_all_routes
        self.body_read_timeout_s = body_read_timeout_s
        self.body_idle_timeout_s = body_idle_timeout_s
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers") or []
        header_bytes = sum(len(k) + len(v) + 4 for k, v in raw_headers)
        header_bytes += len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if header_bytes > self.max_header_bytes:
            error = HeadersTooLargeError(
                f"the request line and headers are {header_bytes} bytes; this server accepts "
                f"at most {self.max_header_bytes} (--max-header-bytes)"
            )
            await _send_error(error, send)
            return
        headers = dict(raw_headers)
        if self._needs_key(scope.get("path", "")) and not self._authorized(headers):
            error = AuthenticationError(
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _send_error(error, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_error(self._too_large(), send)
            return
        if declared in (None, b"0") and b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body to wait for (GET /health...)
            return
        try:
            messages = await self._read_body(receive)
        except OpenAIError as error:
            await _send_error(error, send)
            return
        if messages[-1]["type"] == "http.disconnect":
            return  # the client left mid-body: nobody to answer, nothing to run

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _needs_key(self, path: str) -> bool:
        if self.api_key is None or path in OPEN_PATHS:
            return False
        return (
            self.auth_all_routes or path in KEYED_PATHS or path == "/v1" or path.startswith("/v1/")
        )

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        key = self.api_key or b""
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)

    async def _read_body(self, receive: Receive) -> list[Message]:
        """The request's messages up to its last body piece (or a disconnect)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_read_timeout_s
        messages: list[Message] = []
        size = 0
        while True:
            remaining = deadline - loop.time()
            wait_s = min(self.body_idle_timeout_s, remaining)
            try:
                if wait_s <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), wait_s)
            except asyncio.TimeoutError:
                raise RequestTimeoutError(self._timed_out(size, remaining)) from None
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.limit:
                raise self._too_large()
            if not message.get("more_body", False):
                return messages

    def _too_large(self) -> PayloadTooLargeError:
        # NOTE: the rest of the body is never read; closing spares reading it to reuse the
        # connection (a client may declare a gigabyte).
        return PayloadTooLargeError(
            f"request body exceeds the limit of {self.limit} bytes",
            headers={"Connection": "close"},
        )

    def _timed_out(self, size: int, remaining: float) -> str:
        if remaining <= self.body_idle_timeout_s:
            return (
                f"request body not received within {self.body_read_timeout_s:g} s "
                f"({size} bytes arrived)"
            )
        return (
            f"request body stalled: no data for {self.body_idle_timeout_s:g} s "
            f"({size} bytes arrived)"
        )


async def _send_error(error: OpenAIError, send: Send) -> None:
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


# ------------------------------------------------------------------------ validation errors
CONTENT_PART_PARAM_HINT = "this model takes text only"
JSON_KINDS = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


def _body_path(error: dict, body: Any) -> list[str | int]:
    """Where a validation error sits in the request body. Pydantic's locations also name the
    union member that was tried ('str', 'list[TextPart]'...); only steps the body has are
    kept, plus the name of a missing field."""
    loc = tuple(error.get("loc", ()))
    steps = loc[1:] if loc[:1] == ("body",) else loc
    path: list[str | int] = []
    node = body
    for index, step in enumerate(steps):
        in_dict = isinstance(node, dict) and isinstance(step, str) and step in node
        in_list = isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        if in_dict or in_list:
            node = node[step]
        elif error.get("type") == "missing" and index == len(steps) - 1:
            node = None
        else:
            continue
        path.append(step)
    return path


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(step) for step in path)


def _non_text_part(body: Any, errors: list[dict]) -> tuple[str, str] | None:
    """(param, part type) of a non-text content part that failed validation, if any."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    for error in errors:
        path = _body_path(error, body)
        if len(path) < 3 or path[0] != "messages" or path[2] != "content":
            continue
        message = body["messages"][path[1]] if isinstance(path[1], int) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                return f"messages.{path[1]}.content.{index}", kind
    return None


def _content_type_problem(request: Request) -> str | None:
    value = request.headers.get("content-type")
    if not value:
        return "the request has no Content-Type header: send the JSON body with 'Content-Type: application/json'"
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        return f"Content-Type {value!r} is not JSON: send the body with 'Content-Type: application/json'"
    return None


def body_parse_problem(exc: StarletteHTTPException) -> str | None:
    """What FastAPI's bare "error parsing the body" (a 400 it raises from the exception that
    stopped the JSON decoder) was about, or None for any other HTTP error."""
    if exc.status_code != 400 or exc.__cause__ is None:
        return None
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not UTF-8 (byte {cause.start}): send JSON in UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to parse"
    return f"the request body could not be parsed as JSON ({type(cause).__name__})"


def validation_error(exc: RequestValidationError, request: Request) -> BadRequestError:
    """One OpenAI-style 400 for a request FastAPI could not validate, in the order a client
    fixes things: the JSON itself, the Content-Type, a non-text content part, unknown
    arguments, then the first remaining error."""
    errors = list(exc.errors())
    body = getattr(exc, "body", None)
    for error in errors:
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", None))[-1]
            reason = (error.get("ctx") or {}).get("error", "JSON decode error")
            where = f" at character {position}" if isinstance(position, int) else ""
            return BadRequestError(f"the request body is not valid JSON: {reason}{where}")
    if any(tuple(error.get("loc", ())) == ("body",) for error in errors):
        problem = _content_type_problem(request)
        if problem is not None:
            return BadRequestError(problem)
        if body in (None, b"", ""):
            return BadRequestError("the request body is empty: send a JSON object")
        if not isinstance(body, dict):
            kind = JSON_KINDS.get(type(body), type(body).__name__)
            return BadRequestError(f"the request body must be a JSON object, not {kind}")
    part = _non_text_part(body, errors)
    if part is not None:
        param, kind = part
        return BadRequestError(
            f"{param}: {CONTENT_PART_PARAM_HINT}; content parts of type {kind!r} are not "
            "supported (send text, or text parts)",
            param=param,
        )
    unknown = [
        _dotted(_body_path(error, body))
        for error in errors
        if error.get("type") == "extra_forbidden"
    ]
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        return BadRequestError(
            f"Unrecognized request {noun} supplied: {', '.join(unknown)}", param=unknown[0]
        )
    first = errors[0] if errors else {}
    param = _dotted(_body_path(first, body))
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    return BadRequestError(message, param=param or None)


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
        serving.check_model(body.model)
        key = session_key(request.headers.get(SESSION_HEADER), body.user, body)
        work = serving.chat.create(body, key, len(await request.body()))
        result, replica = await until_disconnected(request, work)
        return _respond(result, replica)

    async def completions(body: CompletionRequest, request: Request) -> Response:
        serving.check_model(body.model)
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
