"""A client that goes away mid-stream aborts its request: its KV blocks are free again within
two seconds, nothing is logged as a server error, and the engine keeps serving."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging

import pytest
from http_fixtures import HOST, serve_local, wait_until

MODEL = "tiny"
NUM_STREAMS = 8
MAX_TOKENS = 3000
FREED_WITHIN_S = 2.0
ROUTES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "talk long"}]}),
    "completions": ("/v1/completions", {"prompt": [5] * 40}),
}


@pytest.fixture
def served(tiny_checkpoint):
    # NOTE: one server per test: a test that fails leaves requests running in its engine.
    with serve_local(tiny_checkpoint) as served:
        yield served


def is_idle(engine) -> bool:
    kv = engine.kv_cache
    return not engine.has_unfinished_requests() and kv.num_free_blocks == kv.num_blocks


def open_and_drop_streams(served, route: str, num_streams: int) -> None:
    """Open streaming requests, read one event of each, then close them all."""
    path, body = ROUTES[route]
    body = dict(body, model=MODEL, stream=True, max_tokens=MAX_TOKENS, ignore_eos=True)
    readers = []  # NOTE: a dropped line iterator closes its connection: keep them all
    with served.http() as client, contextlib.ExitStack() as streams:
        for _ in range(num_streams):
            response = streams.enter_context(client.stream("POST", path, json=body))
            assert response.status_code == 200
            readers.append(response.iter_lines())
            first = next(line for line in readers[-1] if line.startswith("data: "))
            assert first != "data: [DONE]"
        stats = served.engine.get_stats()
        assert stats.num_running + stats.num_waiting == num_streams
        assert stats.kv_blocks_used > 0


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_dropped_streams_free_their_kv_blocks(served, route):
    engine = served.engine.engine
    assert is_idle(engine)
    open_and_drop_streams(served, route, NUM_STREAMS)
    assert wait_until(lambda: is_idle(engine), FREED_WITHIN_S), served.engine.get_stats()

    with served.openai() as client:
        reply = client.completions.create(model=MODEL, prompt="still there?", max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert is_idle(engine)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_dropped_stream_logs_no_server_error(served, route, caplog):
    caplog.set_level(logging.ERROR)
    open_and_drop_streams(served, route, 2)
    # Give the server time to notice the disconnect and run the request's cleanup.
    wait_until(lambda: is_idle(served.engine.engine), FREED_WITHIN_S)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_dropped_whole_request_frees_its_kv_blocks(served, caplog):
    """A non-streaming request whose client closes the connection before the answer is
    cancelled: its engine request is aborted long before max_tokens."""
    caplog.set_level(logging.ERROR)
    engine = served.engine.engine
    assert is_idle(engine)
    path, body = ROUTES["chat"]
    body = dict(body, model=MODEL, max_tokens=MAX_TOKENS, ignore_eos=True)
    connection = http.client.HTTPConnection(HOST, served.server.port, timeout=30.0)
    try:
        headers = {"content-type": "application/json"}
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        assert wait_until(lambda: served.engine.get_stats().kv_blocks_used > 0, 10.0)
        assert engine.has_unfinished_requests()
    finally:
        connection.close()  # before any response: the client is gone
    assert wait_until(lambda: is_idle(engine), FREED_WITHIN_S), served.engine.get_stats()
    assert served.engine.get_stats().num_generated_tokens < MAX_TOKENS
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]

    with served.openai() as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=ROUTES["chat"][1]["messages"], max_tokens=3
        )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert is_idle(engine)
