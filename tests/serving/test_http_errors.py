"""Every error leaves as the OpenAI error body `{"error": {"message", "type", "param", "code"}}`
with the right status: bad parameters, over-long prompts, unknown models and routes, auth,
body size, malformed JSON and a full waiting queue."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from http_fixtures import openai_error, serve_local, serve_scripted_engine, wait_until

MODEL = "tiny"
API_KEY = "sk-test-key"
MAX_MODEL_LEN = 64
BODY_LIMIT = 4096
BURST_SIZE = 8
USER = [{"role": "user", "content": "hi"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint):
    """API key, a short context and a small body limit."""
    with serve_local(
        tiny_checkpoint,
        {"max_model_len": MAX_MODEL_LEN},
        api_key=API_KEY,
        max_request_body_bytes=BODY_LIMIT,
    ) as served:
        yield served


@pytest.fixture(scope="module")
def http(guarded):
    with guarded.http(timeout=30.0) as client:
        yield client


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


# ------------------------------------------------------------------------- 400 parameters
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(temperature=-0.5), "temperature"),
        ("/v1/completions", completion(temperature=-0.01), "temperature"),
        ("/v1/chat/completions", chat(top_p=0), "top_p"),
        ("/v1/chat/completions", chat(top_p=1.5), "top_p"),
        ("/v1/completions", completion(top_p=0), "top_p"),
        ("/v1/chat/completions", chat(n=0), "n"),
        ("/v1/completions", completion(n=0), "n"),
        ("/v1/chat/completions", chat(max_tokens=0), "max_tokens"),
        ("/v1/completions", completion(max_tokens=-1), "max_tokens"),
        (
            "/v1/chat/completions",
            chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "x"}}),
            "tool_choice",
        ),
        ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "hi"}]), None),
        ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
        ("/v1/chat/completions", chat(logprobs=False, top_logprobs=2), "top_logprobs"),
    ],
    ids=lambda value: json.dumps(value)[:60] if isinstance(value, dict) else str(value),
)
def test_bad_parameters_are_400(http, path, body, param):
    error = openai_error(http.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is None:  # the role of the first message
        assert error["param"].startswith("messages.0")
        assert "role" in error["param"] or "role" in error["message"]
    else:
        assert error["param"] == param, error


def test_bad_parameter_through_the_openai_client(guarded):
    with (
        guarded.openai() as client,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.chat.completions.create(model=MODEL, messages=USER, temperature=-1)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"


def test_prompt_longer_than_max_model_len_is_400_naming_both_numbers(http, guarded):
    num_prompt = MAX_MODEL_LEN + 36
    response = http.post("/v1/completions", json=completion(prompt=[5] * num_prompt))
    error = openai_error(response, 400)
    assert str(num_prompt) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    assert error["code"] == "context_length_exceeded"

    messages = [{"role": "user", "content": "long " * 40}]
    num_chat = len(guarded.tokenizer.encode(guarded.tokenizer.apply_chat_template(messages)))
    assert num_chat > MAX_MODEL_LEN
    error = openai_error(http.post("/v1/chat/completions", json=chat(messages=messages)), 400)
    assert str(num_chat) in error["message"] and str(MAX_MODEL_LEN) in error["message"]


def test_prompt_plus_max_tokens_over_max_model_len_is_400(http):
    response = http.post("/v1/completions", json=completion(prompt=[5] * 10, max_tokens=60))
    error = openai_error(response, 400)
    assert error["param"] == "max_tokens"
    assert all(str(n) in error["message"] for n in (10, 60, MAX_MODEL_LEN))


# ------------------------------------------------------------------------- 404 and 405
def test_unknown_model_is_404(http, guarded):
    for path, body in (
        ("/v1/chat/completions", chat(model="gpt-4")),
        ("/v1/completions", completion(model="gpt-4")),
    ):
        error = openai_error(http.post(path, json=body), 404)
        assert error["param"] == "model" and error["code"] == "model_not_found"
        assert "gpt-4" in error["message"]
    with guarded.openai() as client, pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing-here", 404),
        ("POST", "/v2/chat/completions", 404),
        ("GET", "/v1/chat/completions", 405),
    ],
)
def test_unknown_route_and_method_in_openai_shape(http, method, path, status):
    openai_error(http.request(method, path, json={}), status)


# ------------------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-key", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer"],
    ids=["missing", "wrong", "not-bearer", "longer", "empty"],
)
def test_missing_or_wrong_api_key_is_401(guarded, header):
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=guarded.base_url, timeout=30.0, headers=headers) as client:
        for response in (
            client.post("/v1/chat/completions", json=chat()),
            client.post("/v1/completions", json=completion()),
            client.get("/v1/models"),
        ):
            error = openai_error(response, 401)
            assert error["type"] == "authentication_error"
            assert error["code"] == "invalid_api_key"


def test_right_api_key_is_200(guarded):
    with guarded.openai(api_key=API_KEY) as client:
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
        assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices
        assert [m.id for m in client.models.list().data] == [MODEL]
    with guarded.openai(api_key="nope") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_auth_is_checked_before_the_body(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=30.0) as client:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    openai_error(response, 401)


def test_non_ascii_api_key_is_401(guarded):
    headers = {"Authorization": "Bearer é".encode()}
    with httpx.Client(base_url=guarded.base_url, timeout=30.0, headers=headers) as client:
        openai_error(client.get("/v1/models"), 401)


# -------------------------------------------------------------------------- body limits
def test_body_over_the_limit_is_413(http):
    body = completion(prompt="x" * (2 * BODY_LIMIT))
    error = openai_error(http.post("/v1/completions", json=body), 413)
    assert str(BODY_LIMIT) in error["message"]


def test_chunked_body_over_the_limit_is_413(http):
    payload = json.dumps(completion(prompt="x" * (2 * BODY_LIMIT))).encode()

    def chunks():
        for start in range(0, len(payload), 1024):
            yield payload[start : start + 1024]

    response = http.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    openai_error(response, 413)


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"model": "tiny", "prompt": ', b"[]", b"null", b"\xff\xfe"]
)
def test_malformed_json_is_400(http, content):
    response = http.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error"


def test_lone_surrogate_in_chat_is_400(http):
    message = b'{"role": "user", "content": "a\\ud800"}'
    content = b'{"model": "tiny", "max_tokens": 2, "messages": [' + message + b"]}"
    response = http.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    openai_error(response, 400)


def test_lone_surrogate_in_prompt_is_400(guarded):
    content = b'{"model": "tiny", "max_tokens": 2, "prompt": "a\\ud800"}'
    with guarded.http() as client:  # NOTE: not the shared client: a 500 drops its connection
        response = client.post(
            "/v1/completions", content=content, headers={"content-type": "application/json"}
        )
    openai_error(response, 400)


# ----------------------------------------------------------------------- 503 queue full
def assert_overloaded(response: httpx.Response) -> None:
    error = openai_error(response, 503)
    assert error["type"] == "server_overloaded" and error["code"] == "queue_full"
    assert int(response.headers["retry-after"]) >= 1


def first_event(response: httpx.Response) -> Iterator[str]:
    """Read the stream's first event; returns the line iterator, which must stay referenced
    (dropping it closes the connection)."""
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
    return lines


def burst_request(index: int) -> tuple[str, dict]:
    """Both routes, whole and streamed, in turn."""
    stream = index % 4 >= 2
    if index % 2:
        return "/v1/chat/completions", chat(stream=stream)
    return "/v1/completions", completion(stream=stream)


def test_burst_over_a_full_queue_is_503_with_retry_after(tiny_checkpoint):
    """A burst arrives while a step holds the engine lock (and the only running slot is
    taken): requests waiting to be added count as waiting, so exactly max_waiting_requests
    of the burst are admitted and every other one is turned away at once."""
    with (
        serve_scripted_engine(
            tiny_checkpoint,
            {"": "a b c d e f g h"},  # the empty marker matches every prompt
            engine_overrides={"max_num_seqs": 1},
            step_delay_s=0.1,
            max_waiting_requests=1,
        ) as served,
        served.http(timeout=60.0) as client,
        ThreadPoolExecutor(BURST_SIZE) as pool,
    ):
        engine = served.engine
        scheduler = engine.engine.scheduler
        # 300 steps of 0.1 s: the slot stays taken for the whole burst.
        slow = completion(prompt=[5, 6, 7], max_tokens=300, ignore_eos=True, stream=True)
        with client.stream("POST", "/v1/completions", json=slow) as running:
            _reader = first_event(running)  # keeps the connection open
            assert len(scheduler.running) == 1 and engine.num_waiting == 0
            burst = [
                pool.submit(client.post, path, json=body)
                for path, body in map(burst_request, range(BURST_SIZE))
            ]
            # All but one are rejected while the slow stream still runs.
            all_but_one = wait_until(lambda: sum(f.done() for f in burst) >= BURST_SIZE - 1, 10.0)
            assert all_but_one, [f.result().status_code for f in burst if f.done()]
            rejected = [f.result() for f in burst if f.done()]
            assert len(rejected) == BURST_SIZE - 1, [r.status_code for r in rejected]
            for response in rejected:
                assert_overloaded(response)
            (admitted,) = [f for f in burst if not f.done()]
            assert engine.num_waiting == 1
            # The admitted one gets past the engine lock and waits for the slot.
            assert wait_until(lambda: len(scheduler.waiting) == 1, 5.0)
            assert len(scheduler.running) == 1 and engine.num_waiting == 1
            assert not admitted.done()
        # The slow stream is closed (and aborted): the admitted request runs.
        response = admitted.result(timeout=60)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
        else:
            assert response.json()["choices"], response.text
        assert wait_until(
            lambda: (
                not engine.engine.has_unfinished_requests()
                and engine.engine.kv_cache.num_free_blocks == engine.engine.kv_cache.num_blocks
            ),
            timeout_s=5.0,
        )
