"""RequestGate: the ASGI checks that run before FastAPI parses anything (header size, API key,
body size, body read under timeouts), each refusal leaving as an OpenAI error body.

Routes open without the API key: /health always (probes); /metrics, /docs, /redoc and
/openapi.json unless `auth_all_routes` is set. Every /v1 route needs the key when one is set.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ernie_cluster.serving.errors import (
    AuthenticationError,
    HeadersTooLargeError,
    OpenAIError,
    PayloadTooLargeError,
    error_response,
)

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
