"""Hostile and careless clients against the HTTP app: a body that stalls or trickles (408
after the body timeouts, connection closed), the API key (401 with `WWW-Authenticate`, which
routes stay open), and validation errors worded for the client (malformed JSON, no
Content-Type, a non-text content part, unknown arguments)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from fastapi import Request
from http_fixtures import (
    HOST,
    ScriptedClient,
    openai_error,
    script_by_marker,
    serve_app,
    settings_for,
)
from pydantic import BaseModel, ConfigDict

from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.tokenizer import load_tokenizer

MODEL = "tiny"
API_KEY = "sk-hardening"
IDLE_TIMEOUT_S = 0.4
READ_TIMEOUT_S = 1.2
SOCKET_TIMEOUT_S = 10.0
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class StrictBody(BaseModel):
    """A request model with extra="forbid", as protocol.py's request models will have."""

    model_config = ConfigDict(extra="forbid")
    model: str
    items: list[Inner] = []


def make_app(checkpoint, api_key=None, **http_kwargs):
    tokenizer = load_tokenizer(checkpoint)
    client = ScriptedClient(tokenizer, script_by_marker(tokenizer, {"": "hello"}))
    settings = settings_for(tokenizer, api_key=api_key)
    app = build_http_app(OpenAIServing(client, settings), **http_kwargs)

    async def strict(body: StrictBody, request: Request) -> dict:
        return {"ok": True}

    app.add_api_route("/v1/strict", strict, methods=["POST"])
    return app, tokenizer


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    app, tokenizer = make_app(
        tiny_checkpoint, body_idle_timeout_s=IDLE_TIMEOUT_S, body_read_timeout_s=READ_TIMEOUT_S
    )
    with serve_app(app, None, tokenizer) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    app, tokenizer = make_app(tiny_checkpoint, api_key=API_KEY)
    with serve_app(app, None, tokenizer, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def guarded_all(tiny_checkpoint):
    app, tokenizer = make_app(tiny_checkpoint, api_key=API_KEY, auth_all_routes=True)
    with serve_app(app, None, tokenizer, api_key=API_KEY) as server:
        yield server


# ------------------------------------------------------------------------ body timeouts
def read_response(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection (or the socket times out):
    (bytes, closed)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return received, False
        if not chunk:
            return received, True
        received += chunk


def open_request(port: int, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=SOCKET_TIMEOUT_S)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def test_stalled_body_is_408_after_the_idle_timeout_and_closed(served):
    """A client that declares 1000 bytes and sends 10 (slowloris) no longer holds the
    connection: 408 once the body has stalled for the idle timeout, then the server closes."""
    start = time.monotonic()
    with open_request(served.server.port, 1000, b'{"model": ') as sock:
        received, closed = read_response(sock)
    elapsed = time.monotonic() - start
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 408 Request Timeout", received
    assert b"request body stalled" in received and b"10 bytes arrived" in received
    assert closed, "the server kept the connection open after the 408"
    assert IDLE_TIMEOUT_S <= elapsed < IDLE_TIMEOUT_S + 3.0


def test_trickled_body_is_408_after_the_read_timeout(served):
    """Bytes that keep coming, each within the idle timeout, still end at the read timeout."""
    start = time.monotonic()
    with open_request(served.server.port, 1000, b"{") as sock:
        sent = 1
        while time.monotonic() - start < READ_TIMEOUT_S + 3.0:
            time.sleep(IDLE_TIMEOUT_S / 4)
            try:
                sock.sendall(b" ")
            except OSError:  # the server answered and closed
                break
            sent += 1
        received, _ = read_response(sock)
    elapsed = time.monotonic() - start
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"not received within" in received
    assert sent > READ_TIMEOUT_S / IDLE_TIMEOUT_S  # it did trickle past several idle periods
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 4.0


def test_declared_oversize_body_is_413_and_closed_at_once(served):
    start = time.monotonic()
    with open_request(served.server.port, 10**9, b"{") as sock:
        received, closed = read_response(sock)
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert closed and time.monotonic() - start < 3.0


def test_bodies_in_time_are_served_and_the_connection_is_reused(served):
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/health").status_code == 200


def test_body_timeouts_must_be_positive(tiny_checkpoint):
    app, _ = make_app(tiny_checkpoint, body_idle_timeout_s=0)
    with pytest.raises(ValueError, match="body timeouts must be > 0"):
        app.build_middleware_stack()


# ------------------------------------------------------------------------------ API key
def test_401_says_how_to_authenticate(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=30.0) as client:
        for response in (
            client.post("/v1/chat/completions", json=CHAT),
            client.get("/v1/models"),
            client.get("/v1/models", headers={"Authorization": "Bearer wrong"}),
        ):
            openai_error(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/docs", "/openapi.json"])
def test_routes_open_without_the_key_by_default(guarded, path):
    with httpx.Client(base_url=guarded.base_url, timeout=30.0) as client:
        assert client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_auth_all_routes_guards_metrics_and_docs(guarded_all, path):
    with httpx.Client(base_url=guarded_all.base_url, timeout=30.0) as client:
        response = client.get(path)
        openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        authorized = client.get(path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert authorized.status_code == 200


def test_auth_all_routes_leaves_health_open(guarded_all):
    with httpx.Client(base_url=guarded_all.base_url, timeout=30.0) as client:
        assert client.get("/health").status_code == 200


# -------------------------------------------------------------------- validation errors
def post(served, path: str, content: bytes, content_type: str | None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type is not None else {}
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        request = client.build_request("POST", path, content=content, headers=headers)
        if content_type is None:
            request.headers.pop("content-type", None)
        return client.send(request)


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"model": "tiny", "messages": [', b'{"a": 1}}']
)
def test_malformed_json_names_no_param(served, content):
    error = openai_error(post(served, "/v1/chat/completions", content, "application/json"), 400)
    assert error["message"].startswith("the request body is not valid JSON: ")
    assert "at character" in error["message"]
    assert error["param"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"model": "\xff\xfe"}', "the request body is not UTF-8 (byte 11)"),
        (b'{"model": "tiny", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ],
    ids=["not-utf8", "nested-5000-deep"],
)
def test_unparsable_body_says_why(served, content, message):
    error = openai_error(post(served, "/v1/chat/completions", content, "application/json"), 400)
    assert message in error["message"]


def test_missing_content_type_says_so(served):
    response = post(served, "/v1/chat/completions", b'{"model": "tiny"}', None)
    assert "content-type" not in response.request.headers
    error = openai_error(response, 400)
    assert "no Content-Type header" in error["message"]
    assert "application/json" in error["message"] and error["param"] is None


def test_form_content_type_says_so(served):
    """What `curl -d '{...}'` sends without -H."""
    response = post(
        served, "/v1/chat/completions", b'{"model": "tiny"}', "application/x-www-form-urlencoded"
    )
    error = openai_error(response, 400)
    assert "'application/x-www-form-urlencoded' is not JSON" in error["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "the request body is empty"), (b"[1, 2]", "must be a JSON object, not an array")],
)
def test_body_that_is_not_an_object(served, content, message):
    response = post(served, "/v1/chat/completions", content, "application/json")
    assert message in openai_error(response, 400)["message"]


@pytest.mark.parametrize("kind", ["image_url", "input_audio"])
def test_non_text_content_part_says_text_only(served, kind):
    part = {"type": kind, kind: {"url": "https://example.com/cat.png"}}
    content = [{"type": "text", "text": "what is this?"}, part]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert "this model takes text only" in error["message"]
    assert repr(kind) in error["message"]
    assert error["param"] == "messages.0.content.1"


def test_text_parts_still_work(served):
    content = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    body = {**CHAT, "messages": [{"role": "user", "content": content}]}
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_union_member_names_stay_out_of_param(served):
    body = {**CHAT, "messages": [{"role": "user", "content": 42}]}
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        error = openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0.content"


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (
            {"model": "m", "colour": "red"},
            "Unrecognized request argument supplied: colour",
            "colour",
        ),
        (
            {"model": "m", "items": [{"name": "a"}, {"name": "b", "size": 3}]},
            "Unrecognized request argument supplied: items.1.size",
            "items.1.size",
        ),
        (
            {"model": "m", "a": 1, "b": 2},
            "Unrecognized request arguments supplied: a, b",
            "a",
        ),
    ],
    ids=["top-level", "nested", "two"],
)
def test_unknown_arguments_in_openai_wording(served, body, message, param):
    """extra="forbid" models (protocol.py's request models will be) reject unknown fields the
    way OpenAI does."""
    with httpx.Client(base_url=served.base_url, timeout=30.0) as client:
        error = openai_error(client.post("/v1/strict", json=body), 400)
    assert error["message"] == message
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


# ------------------------------------------------- the one-process server's header timeout
HEADER_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint):
    """`make_server` (what `serve --no-ray-serve` runs) with a short header timeout."""
    import asyncio
    import threading

    from ernie_cluster.cli.ports import bind_exclusive
    from ernie_cluster.distributed.process_group import free_port
    from ernie_cluster.serving.local_server import make_server

    app, _ = make_app(tiny_checkpoint)
    sock = bind_exclusive(HOST, free_port(HOST))
    server = make_server(app, sock, header_timeout_s=HEADER_TIMEOUT_S)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "the server did not start"
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"])
def test_connection_without_headers_is_closed(one_process, sent):
    """Connect and send nothing, or half the headers: closed after the header timeout."""
    start = time.monotonic()
    with socket.create_connection((HOST, one_process), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(sent)
        received, closed = read_response(sock)
    assert closed and received == b""
    assert HEADER_TIMEOUT_S <= time.monotonic() - start < HEADER_TIMEOUT_S + 3.0


def test_idle_keep_alive_connection_outlives_the_header_timeout(one_process):
    """The timer covers a request's line and headers only: a kept-alive connection idle for
    longer than it (within uvicorn's keep-alive timeout) still serves the next request."""
    request = f"GET /health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    with socket.create_connection((HOST, one_process), timeout=SOCKET_TIMEOUT_S) as sock:
        for _ in range(2):
            sock.sendall(request)
            response = b""
            while b'"ok"}' not in response:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed; got {response!r}"
                response += chunk
            assert response.startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_TIMEOUT_S * 2)
