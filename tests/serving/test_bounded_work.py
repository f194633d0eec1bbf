"""Every request's work is bounded (issue 20): each hostile request of the probe gets a worded
400 (or runs off the event loop), and meanwhile /health and a small request from another client
stay within a generous ratio of their quiet latency, with no 5xx."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from http_fixtures import openai_error, serve_local, serve_scripted_engine, wait_until
from latency_watch import LatencyWatch

from ernie_cluster.distributed.process_group import free_port
from ernie_cluster.serving.limits import RequestLimits

MODEL = "tiny"
SMALL_COMPLETION = ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2})
SMALL_CHAT = (
    "/v1/chat/completions",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
)


@pytest.fixture(scope="module")
def scripted(tiny_checkpoint):
    with serve_scripted_engine(
        tiny_checkpoint, {"": "a b c"}, engine_overrides={"max_num_seqs": 64}
    ) as served:
        yield served


def post_raw(served, path: str, body: bytes, times: int = 1) -> list[httpx.Response]:
    """Send a pre-encoded body (so encoding it costs the server process nothing)."""
    headers = {"content-type": "application/json"}
    with served.http(timeout=120) as http:
        return [http.post(path, content=body, headers=headers) for _ in range(times)]


def post_small(http: httpx.Client) -> httpx.Response:
    path, body = SMALL_COMPLETION
    return http.post(path, json=body)


def chat_body(**fields) -> bytes:
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def watch(served, small=SMALL_COMPLETION) -> tuple[LatencyWatch, httpx.Client]:
    client = served.http()
    return LatencyWatch(client, small), client


# ------------------------------------------------------------ 2. constraints off the loop
def test_a_huge_guided_choice_is_refused_without_stalling_others(scripted):
    choices = [f"option number {i}" for i in range(300_000)]  # ~6 MB
    body = chat_body(guided_choice=choices, max_tokens=4)
    latency, client = watch(scripted, SMALL_CHAT)
    with client:
        responses = latency.during(lambda: post_raw(scripted, "/v1/chat/completions", body, 3))
    for response in responses:
        error = openai_error(response, 400)
        assert "300000 alternatives" in error["message"] and "--max-choices" in error["message"]
        assert error["param"] == "guided_choice"


def test_a_huge_tool_schema_is_refused_before_the_template(scripted):
    properties = {f"field_{i}": {"type": "string"} for i in range(9_000)}
    tool = {
        "type": "function",
        "function": {
            "name": "wide",
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties),
            },
        },
    }
    body = chat_body(tools=[tool], tool_choice={"type": "function", "function": {"name": "wide"}})
    latency, client = watch(scripted, SMALL_CHAT)
    with client:
        responses = latency.during(lambda: post_raw(scripted, "/v1/chat/completions", body, 3))
    for response in responses:
        error = openai_error(response, 400)
        assert error["param"] == "tools[0].function.parameters"
        assert "--max-schema-bytes" in error["message"]


def test_too_many_tools_and_enum_values_are_refused(scripted):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    error = openai_error(
        post_raw(scripted, "/v1/chat/completions", chat_body(tools=[tool] * 129))[0], 400
    )
    assert "129 tools" in error["message"] and error["param"] == "tools"
    schema = {"type": "string", "enum": [f"v{i}" for i in range(3_000)]}
    error = openai_error(
        post_raw(
            scripted,
            "/v1/chat/completions",
            chat_body(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                }
            ),
        )[0],
        400,
    )
    assert "3000 alternatives" in error["message"]


def test_token_id_prompts_are_planned_off_the_loop(scripted):
    """256 prompts of 1,000 ids: id checks and detokenizing them run on a worker thread."""
    prompts = [[5 + (i + j) % 400 for j in range(1_000)] for i in range(256)]
    body = json.dumps({"model": MODEL, "prompt": prompts, "max_tokens": 1}).encode()
    latency, client = watch(scripted)
    with client:
        responses = latency.during(lambda: post_raw(scripted, "/v1/completions", body, 2))
    for response in responses:
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == 256


# ------------------------------------------------------------------- 3. stop strings
def test_stop_strings_are_capped(scripted):
    many = [f"stop-{i}" for i in range(100_000)]
    body = json.dumps({**SMALL_COMPLETION[1], "stop": many, "n": 16}).encode()
    latency, client = watch(scripted)
    with client:
        responses = latency.during(lambda: post_raw(scripted, "/v1/completions", body, 3))
    for response in responses:
        error = openai_error(response, 400)
        assert "100000 strings" in error["message"] and error["param"] == "stop"
    long = json.dumps({**SMALL_COMPLETION[1], "stop": ["x" * 3000, "y" * 3000]}).encode()
    error = openai_error(post_raw(scripted, "/v1/completions", long)[0], 400)
    assert "6000 characters" in error["message"]


def test_the_most_stop_strings_allowed_run_next_to_others(tiny_checkpoint):
    """The real model: 64 stop strings (the default cap) x n=16 for 48 tokens, three at once."""
    limits = RequestLimits()
    stops = [f"{i:02d}" * 32 for i in range(limits.max_stop_strings)]
    assert sum(map(len, stops)) <= limits.max_stop_chars
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "tell me",
            "stop": stops,
            "n": 16,
            "max_tokens": 48,
            "ignore_eos": True,
        }
    ).encode()
    with serve_local(tiny_checkpoint, engine_overrides={"max_num_seqs": 64}) as served:
        latency, client = watch(served)
        with client:
            responses = latency.during(lambda: post_raw(served, "/v1/completions", body, 2))
    for response in responses:
        assert response.status_code == 200
        assert len(response.json()["choices"]) == 16


# ---------------------------------------------------------------- 6. admission counts n
def test_admission_counts_sequences_not_requests(tiny_checkpoint):
    with (
        serve_scripted_engine(
            tiny_checkpoint,
            {"": "a b c d"},
            engine_overrides={"max_num_seqs": 6},
            step_delay_s=0.05,
            max_waiting_requests=2,
        ) as served,
        served.http(timeout=60) as http,
    ):
        engine = served.engine
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        latency = LatencyWatch(http, SMALL_COMPLETION)
        refused = latency.during(lambda: http.post("/v1/completions", json={**body, "n": 9}))
        error = openai_error(refused, 400)
        assert "9 sequences" in error["message"] and "at most 8" in error["message"]
        # Three long streams hold 3 of the 6 slots: 3 free + 2 queue = room for 5 sequences.
        long = {
            "model": MODEL,
            "prompt": "y",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        streams = [
            http.send(http.build_request("POST", "/v1/completions", json=long), stream=True)
            for _ in range(3)
        ]
        try:
            assert wait_until(lambda: len(engine.engine.scheduler.running) == 3, 30)
            full = openai_error(http.post("/v1/completions", json={**body, "n": 6}), 503)
            assert full["code"] == "queue_full" and "6 sequences" not in full["message"]
            assert http.post("/v1/completions", json={**body, "n": 5}).status_code == 200
            assert http.post("/v1/completions", json=body).status_code == 200
        finally:
            for stream in streams:
                stream.close()


def test_sequences_per_request_are_capped(scripted):
    body = {"model": MODEL, "prompt": [[5, 6]] * 40, "n": 8, "max_tokens": 1}
    with scripted.http() as http:
        error = openai_error(http.post("/v1/completions", json=body), 400)
    assert "320 sequences" in error["message"] and "--max-sequences" in error["message"]


# --------------------------------------------------------------- 7. dead and hung workers
class HungWorkerError(RuntimeError):
    pass


def test_a_hung_worker_makes_health_503_not_requests_slow(tiny_checkpoint):
    """The executor's probe hangs (a SIGSTOP'd worker): requests never wait on it (liveness is
    a flag), /health answers 503 with Retry-After; then a step fails and requests get 503."""
    with serve_scripted_engine(tiny_checkpoint, {"": "a b"}) as served, served.http() as http:
        executor = served.engine.engine.executor

        def hung_probe() -> None:
            time.sleep(2.0)
            raise HungWorkerError("a shard worker is not responding")

        executor.check_health = hung_probe
        started = time.perf_counter()
        assert post_small(http).status_code == 200
        request_s = time.perf_counter() - started
        started = time.perf_counter()
        health = http.get("/health")
        health_s = time.perf_counter() - started
        assert health.status_code == 503 and int(health.headers["retry-after"]) >= 1
        assert request_s < health_s  # the request did not ping the workers

        def dead_step(scheduler_output):
            raise HungWorkerError("a shard worker failed its step")

        executor.execute_model = dead_step
        for _ in range(2):  # the failing step, then a dead engine
            response = post_small(http)
            error = openai_error(response, 503)
            assert error["code"] == "engine_unavailable"
            assert int(response.headers["retry-after"]) >= 1


def test_a_worker_failure_in_a_replica_is_a_503():
    """A replica sends its shard workers' or engine's death back as a 503 (data, so the
    ingress never unpickles an engine type); a bug in its code is a 500, a bad input a 400.
    A replica that died or cannot be reached is a 503 at the ingress."""
    from ray.exceptions import RayActorError, RayTaskError

    from ernie_cluster.engine.async_engine import EngineDeadError
    from ernie_cluster.executor.ray_executor import WorkerDiedError
    from ernie_cluster.serving.errors import EngineUnavailableError
    from ernie_cluster.serving.ray_serve.ingress import replica_failure
    from ernie_cluster.serving.ray_serve.model_server import remote_error

    for failure in (WorkerDiedError("rank 1 is gone"), EngineDeadError("engine step failed")):
        error = remote_error(failure).to_exception()
        assert isinstance(error, EngineUnavailableError)
        assert str(failure) in error.message
    bug = remote_error(KeyError("x")).to_exception()
    assert bug.status_code == 500 and "KeyError" in bug.message
    assert remote_error(ValueError("n must be >= 1")).to_exception().status_code == 400
    crashed = RayTaskError("generate", "traceback", KeyError("x"))
    assert replica_failure(crashed).status_code == 500
    assert isinstance(replica_failure(RayActorError()), EngineUnavailableError)


# ------------------------------------------------------------------------ 8. header bytes
def send_and_leave(port: int, data: bytes) -> None:
    """Send `data` on a fresh connection, then close it without reading."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)


def send_huge_headers(port: int, size: int) -> tuple[bytes, int]:
    """Send a request whose two headers hold `size` bytes each, in pieces, reading as soon as
    the server answers. Returns (the reply, bytes sent before it came)."""
    import select

    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * size
    head += b"\r\nX-Pad-2: " + b"b" * size + b"\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        while sent < len(head):
            try:
                sent += sock.send(head[sent : sent + 16384])
            except OSError:  # the server closed on us: its reply is already readable
                break
            if select.select([sock], [], [], 0.005)[0]:
                break
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    return reply, sent


def test_header_bytes_are_bounded_by_the_one_process_server(tiny_checkpoint):
    """The one-process server (the CLI's make_server): two 4 MB headers are cut off at the
    limit with a 431 before they are buffered, while others keep their latency."""
    import threading

    from ernie_cluster.serving.local_server import make_server

    with serve_scripted_engine(tiny_checkpoint, {"": "a"}) as served:
        port = free_port()
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))
        server = make_server(served.server.app, sock, max_header_bytes=65536)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: server.started, 30)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            latency = LatencyWatch(client, SMALL_COMPLETION)
            with client:
                replies = latency.during(
                    lambda: [send_huge_headers(port, 4 << 20) for _ in range(3)]
                )
            for reply, sent in replies:
                assert reply.startswith(b"HTTP/1.1 431"), reply[:80]
                assert b"--max-header-bytes" in reply
                assert sent < 1 << 20  # cut off near the limit, not after 8 MB
            # A large body is not a large header, even when it comes in one piece with them.
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                body = {**SMALL_COMPLETION[1], "prompt": "hello " * 100_000, "max_tokens": 1}
                assert http.post("/v1/completions", json=body).status_code in (200, 400)
                big_ids = {**SMALL_COMPLETION[1], "prompt": [[5] * 3] * 200, "stop": ["x"] * 60}
                assert http.post("/v1/completions", json=big_ids).status_code == 200
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()


def test_header_bytes_are_bounded_by_the_app(scripted):
    """The app's own gate (what runs behind Ray Serve's proxy): 431 in the OpenAI schema."""
    with scripted.http() as http:
        response = http.get("/health", headers={"x-pad": "a" * 70_000})
    error = openai_error(response, 431)
    assert error["code"] == "headers_too_large"


# ------------------------------------------------------------------------ 9. the rest
def test_tool_names_follow_openai_rules(scripted):
    tool = {"type": "function", "function": {"name": "get</tool_call>", "parameters": {}}}
    with scripted.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=chat_body(tools=[tool]),
            headers={"content-type": "application/json"},
        )
    error = openai_error(response, 400)
    assert "tools.0.function.name" in (error["param"] or "") or "name" in error["message"]


def test_an_external_ref_is_refused(scripted):
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}
    body = chat_body(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    error = openai_error(post_raw(scripted, "/v1/chat/completions", body)[0], 400)
    assert "$ref" in error["message"] and "https://example.com/s.json" in error["message"]
    local = {
        "$defs": {"s": {"type": "string"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/s"}},
    }
    body = chat_body(
        max_tokens=2,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": local}},
    )
    assert post_raw(scripted, "/v1/chat/completions", body)[0].status_code == 200


def test_priority_is_for_operators(tiny_checkpoint, scripted):
    body = {**SMALL_COMPLETION[1], "priority": -5}
    with scripted.http() as http:
        error = openai_error(http.post("/v1/completions", json=body), 400)
        assert error["param"] == "priority" and "--scheduling-policy" in error["message"]
        assert http.post("/v1/completions", json={**body, "priority": 0}).status_code == 200
        huge = openai_error(http.post("/v1/completions", json={**body, "priority": 2**40}), 400)
        assert huge["param"] == "priority"
    limits = RequestLimits(scheduling_policy="priority")
    with (
        serve_scripted_engine(tiny_checkpoint, {"": "a"}, limits=limits) as served,
        served.http() as http,
    ):
        assert http.post("/v1/completions", json=body).status_code == 200


def test_booleans_are_not_token_ids_and_nan_is_not_finite(scripted):
    with scripted.http() as http:
        for prompt in ([True, 5], [[5, False]]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
            openai_error(http.post("/v1/completions", json=body), 400)
        body = {**SMALL_COMPLETION[1], "stop_token_ids": [True]}
        openai_error(http.post("/v1/completions", json=body), 400)
        nan = b'{"model": "tiny", "prompt": "x", "temperature": NaN}'
        response = http.post(
            "/v1/completions", content=nan, headers={"content-type": "application/json"}
        )
    error = openai_error(response, 400)
    assert "finite" in error["message"] and error["param"] == "temperature"


def requests_total(http: httpx.Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ernie_requests_total":
                totals[sample.labels["status"]] = sample.value
    return totals


def test_a_client_leaving_mid_body_counts_as_aborted(scripted):
    port = int(scripted.base_url.rsplit(":", 1)[1])
    with scripted.http() as http:
        before = requests_total(http)
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n"
        )
        send_and_leave(port, head + b'{"model": "ti')
        assert wait_until(
            lambda: requests_total(http).get("aborted", 0) == before.get("aborted", 0) + 1, 10
        )
        after = requests_total(http)
    assert after.get("error", 0) == before.get("error", 0)


# ------------------------------------------------------------------ 4. grammar compiles
@pytest.mark.slow
def test_a_full_compile_queue_is_a_503_and_others_keep_their_latency(tiny_checkpoint):
    """One compile thread, held by a 20,000-choice grammar, and one queued compile: a third new
    grammar is a 503 with Retry-After at once, and small unconstrained requests meanwhile keep
    their latency (the compile thread is not the event loop)."""
    limits = RequestLimits(max_choices=20_000, max_schema_bytes=1 << 20)
    grammar = {
        "grammar_compile_threads": 1,
        "grammar_max_pending_compiles": 1,
        "grammar_compile_timeout_s": 300.0,  # a loaded machine must not turn this into a 400
    }

    def body(grammar_id: int, num_choices: int) -> bytes:
        choices = [f"choice {k} of grammar {grammar_id}" for k in range(num_choices)]
        fields = {**SMALL_COMPLETION[1], "max_tokens": 12, "guided_choice": choices}
        return json.dumps(fields).encode()

    with serve_local(tiny_checkpoint, engine_overrides=grammar, limits=limits) as served:
        structured = served.engine.engine.structured

        def compiles_queued() -> int:
            return structured.compiler.num_pending if structured._compiler else -1

        def attack() -> list[httpx.Response]:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                big = pool.submit(post_raw, served, "/v1/completions", body(0, 20_000))
                assert wait_until(lambda: compiles_queued() == 0, 60)  # it runs
                queued = pool.submit(post_raw, served, "/v1/completions", body(1, 500))
                assert wait_until(lambda: compiles_queued() == 1, 60)
                refused = post_raw(served, "/v1/completions", body(2, 500))[0]
                return [big.result()[0], queued.result()[0], refused]

        latency, client = watch(served)
        with client:
            responses = latency.during(attack)
    assert [r.status_code for r in responses[:2]] == [200, 200], [r.text for r in responses]
    error = openai_error(responses[2], 503)
    assert error["code"] == "queue_full" and int(responses[2].headers["retry-after"]) >= 1
