"""Serving without Ray Serve: the engine and the HTTP app in one process (uvicorn).

Used by tests, benchmarks and `ernie-cluster serve --no-ray-serve` (smallest footprint); the
HTTP behaviour is the same app the Ray Serve ingress runs. `make_server` adds what uvicorn
lacks against slow clients: a connection must deliver its request line and headers within
`header_timeout_s` (the app's RequestGate then times the body).
"""

from __future__ import annotations

import asyncio
import json
import socket

import uvicorn

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.engine.async_engine import AsyncLLMEngine
from ernie_cluster.engine.llm_engine import LLMEngine
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.errors import HeadersTooLargeError
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.limits import DEFAULT_MAX_BODY_BYTES, RequestLimits
from ernie_cluster.serving.local_engine_client import LocalEngineClient
from ernie_cluster.serving.settings import ServingSettings

HEADER_TIMEOUT_S = 15.0
"""Longest a connection may take to send a request's line and headers."""
KEEP_ALIVE_TIMEOUT_S = 5
"""Longest an idle keep-alive connection stays open between requests (uvicorn's default)."""


def settings_for_engine(
    engine: LLMEngine,
    served_model_names: list[str] | None = None,
    reasoning_parser: str | None = None,
    tool_call_parser: str | None = None,
    api_key: str | None = None,
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    limits: RequestLimits | None = None,
) -> ServingSettings:
    return ServingSettings(
        served_model_names or [engine.config.model],
        engine.facts,
        engine.tokenizer,
        reasoning_parser=reasoning_parser,
        tool_call_parser=tool_call_parser,
        api_key=api_key,
        max_request_body_bytes=max_request_body_bytes,
        limits=limits or RequestLimits(),
    )


def build_local_app(
    engine_config: EngineConfig,
    max_waiting_requests: int | None = None,
    auth_all_routes: bool = False,
    **settings_kwargs,
):
    """(FastAPI app, AsyncLLMEngine) serving `engine_config` in this process."""
    engine = AsyncLLMEngine.from_config(engine_config)
    settings = settings_for_engine(engine.engine, **settings_kwargs)
    client = LocalEngineClient(engine, max_waiting_requests)
    app = build_http_app(OpenAIServing(client, settings), auth_all_routes=auth_all_routes)
    return app, engine


def header_timeout_protocol(
    timeout_s: float, max_header_bytes: int = 65536
) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing a connection whose request line and headers do
    not arrive within `timeout_s` of it opening (or of its previous request starting), and
    answering 431 once they pass `max_header_bytes` (before buffering any more of them).

    NOTE: uvicorn times out only idle keep-alive connections; one that connects and sends
    nothing, or half a header, stays open for good (slowloris). httptools buffers a header
    until it ends, so without the byte bound two 48 MB headers cost ~290 MB.
    """
    if timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be > 0, got {timeout_s}")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    refusal = HeadersTooLargeError(
        f"the request line and headers exceed {max_header_bytes} bytes (--max-header-bytes)"
    ).body()
    body = json.dumps(refusal).encode()
    too_large = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def data_received(self, data: bytes) -> None:
            # NOTE: the timer is armed exactly while a request's headers are arriving, so
            # bytes are counted only then; a piece that completes the headers resets the
            # count (on_headers_complete), however much body it also carries.
            if self._header_timer is not None:
                self._header_bytes += len(data)
            super().data_received(data)
            if self._header_timer is not None and self._header_bytes > max_header_bytes:
                self._cancel_header_timer()
                if not self.transport.is_closing():
                    self.transport.write(too_large)
                    self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            self._header_bytes = 0
            super().on_headers_complete()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._on_header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def make_server(
    app,
    sock: socket.socket,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    log_level: str = "warning",
    max_header_bytes: int = 65536,
) -> uvicorn.Server:
    """A uvicorn server for `app` on an already bound `sock` (run it with
    `server.run(sockets=[sock])`), with the header timeout and byte bound when httptools is
    installed."""
    try:
        import httptools  # noqa: F401

        http: str | type[asyncio.Protocol] = header_timeout_protocol(
            header_timeout_s, max_header_bytes
        )
    except ImportError:  # h11 only: uvicorn's own timeouts
        http = "auto"
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http,
        log_level=log_level,
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT_S,
        h11_max_incomplete_event_size=max_header_bytes,
    )
    return uvicorn.Server(config)
