"""The load generator's parts against independent oracles: arrival statistics against the
gamma distribution's moments, percentiles against order statistics, goodput by hand, datasets
against the tokenizer, and the SSE client against a scripted ASGI server."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics

import httpx
import pytest

from ernie_cluster.bench.arrivals import arrival_gaps
from ernie_cluster.bench.client import RequestResult, RequestSettings, send_request
from ernie_cluster.bench.datasets import (
    BenchRequest,
    Conversation,
    JsonlDataset,
    MultiTurnDataset,
    RandomDataset,
    Reply,
    TextSampler,
    sample_length,
)
from ernie_cluster.bench.metrics import latency_stats, parse_slos, summarize, timeline
from ernie_cluster.bench.runner import LoadSpec, run_load


# ------------------------------------------------------------------------------ arrivals
@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_match_gamma_moments(burstiness):
    rate = 8.0
    gaps = list(itertools.islice(arrival_gaps(rate, burstiness, seed=1), 20000))
    # gamma(k, θ = 1/(rate k)): mean 1/rate, coefficient of variation 1/sqrt(k)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrival_gaps_infinite_rate_and_bad_input():
    assert list(itertools.islice(arrival_gaps(math.inf), 3)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"rate must be > 0.*-1"):
        next(arrival_gaps(-1))
    with pytest.raises(ValueError, match=r"burstiness must be > 0.*0"):
        next(arrival_gaps(1.0, 0))


# ------------------------------------------------------------------------------- metrics
def result(start, ttft, end, out_tokens, ok=True, status="200", itls=()):
    return RequestResult(
        session_id=None,
        turn=0,
        start=start,
        ok=ok,
        status=status,
        ttft=ttft,
        end=end,
        itls=list(itls),
        prompt_tokens=10,
        output_tokens=out_tokens,
    )


def test_latency_stats_match_order_statistics():
    rng = random.Random(3)
    values = [rng.random() for _ in range(101)]
    assert len(set(values)) == 101  # distinct: mixing up two statistics changes the answer
    stats = latency_stats(values)
    ordered = sorted(v * 1e3 for v in values)
    # With 101 values the p-th percentile (linear interpolation) is the p-th order statistic.
    assert [stats["p50"], stats["p90"], stats["p99"]] == pytest.approx(
        [ordered[50], ordered[90], ordered[99]]
    )
    assert (stats["min"], stats["max"]) == pytest.approx((ordered[0], ordered[-1]))
    assert stats["mean"] == pytest.approx(statistics.fmean(ordered))
    # Between order statistics it interpolates: rank p / 100 * (n - 1), by hand for n = 4.
    small = latency_stats([4.0, 1.0, 3.0, 2.0])
    assert [small["p50"], small["p90"], small["p99"]] == pytest.approx([2500, 3700, 3970])
    assert latency_stats([]) == dict.fromkeys(["mean", "min", "max", "p50", "p90", "p99"])


def test_summary_goodput_and_errors():
    results = [
        result(0.0, 0.1, 1.0, 10),  # tpot 0.1 s: breaks a 50 ms TPOT objective
        result(0.5, 0.05, 0.95, 10),  # tpot 0.044 s
        result(1.0, 0.6, 1.2, 1),  # one token: no TPOT, TTFT 600 ms breaks ttft:500
        result(1.5, None, 1.6, 0, ok=False, status="503"),
        result(1.6, None, 1.7, 0, ok=False, status="503"),
        result(1.7, None, 9.0, 0, ok=False, status="timeout"),
    ]
    summary = summarize(results, duration_s=2.0, slos=parse_slos(["ttft:500", "tpot:50"]))
    assert summary["num_requests_sent"] == 6
    assert (summary["completed"], summary["failed"]) == (3, 3)
    assert summary["errors_by_status"] == {"503": 2, "timeout": 1}
    assert summary["total_output_tokens"] == 21
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(10.5)
    assert summary["total_token_throughput"] == pytest.approx((30 + 21) / 2)
    assert summary["goodput"]["good_requests"] == 1
    assert summary["goodput"]["request_throughput"] == pytest.approx(0.5)
    assert summary["tpot_ms"]["max"] == pytest.approx(100.0)
    assert summary["ttft_ms"]["max"] == pytest.approx(600.0)


def test_timeline_buckets():
    rows = timeline(
        [result(0.2, 0.1, 1.5, 4), result(0.4, 0.1, 2.5, 6), result(2.1, None, 2.2, 0, ok=False)]
    )
    assert [row["started"] for row in rows] == [2, 0, 1]
    assert [row["output_tokens"] for row in rows] == [0, 4, 6]
    assert [row["failed"] for row in rows] == [0, 0, 1]
    assert [row["in_flight"] for row in rows] == [2, 1, 0]  # sampled mid-bucket


@pytest.mark.parametrize(
    "spec, match",
    [
        ("ttft", "METRIC:MS"),
        ("latency:5", "METRIC:MS"),
        ("ttft:x", "not a number"),
        ("e2el:0", "> 0"),
    ],
)
def test_bad_slos(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_slos([spec])


# ------------------------------------------------------------------------------ datasets
@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from ernie_cluster.tokenizer import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


def test_random_dataset_lengths(tokenizer):
    sampler = TextSampler(tokenizer, random.Random(0))
    sessions = list(
        itertools.islice(RandomDataset(sampler, 100, 20, 0.5, chat=False).sessions(), 200)
    )
    requests = [s.next_request(None) for s in sessions]
    assert all(s.next_request(None) is None for s in sessions)  # one turn each
    lengths = [len(r.prompt) for r in requests]
    assert min(lengths) >= 50 and max(lengths) <= 150 and len(set(lengths)) > 20
    assert all(10 <= r.max_tokens <= 30 for r in requests)
    special = tokenizer.all_special_ids
    assert not any(i in special for r in requests for i in r.prompt)
    # chat prompts are text that re-tokenizes to about the drawn length
    chat = next(RandomDataset(sampler, 100, 20, chat=True).sessions()).next_request(None)
    assert 60 <= len(tokenizer.encode(chat.messages[0]["content"])) <= 140


def test_sample_length_bounds():
    rng = random.Random(0)
    assert {sample_length(rng, 10, 0.0) for _ in range(50)} == {10}
    with pytest.raises(ValueError, match=r"range ratio.*1\.5"):
        sample_length(rng, 10, 1.5)


def test_conversation_carries_replies_and_stops_at_context():
    chat = Conversation(
        "s",
        "sys",
        ["u1", "u2", "u3", "u4"],
        max_tokens=8,
        max_context_tokens=100,
        user_message_tokens=10,
    )
    first = chat.next_request(None)
    assert first.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
    ]
    second = chat.next_request(Reply("a1", prompt_tokens=20, output_tokens=8))
    assert second.messages[-2:] == [
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert second.session_id == "s" and second.turn == 1
    # 80 + 8 + 10 + 8 > 100: the next prompt could pass the context limit
    assert chat.next_request(Reply("a2", prompt_tokens=80, output_tokens=8)) is None
    failed = Conversation("t", "", ["u1", "u2"], max_tokens=8)
    assert failed.next_request(None).messages == [{"role": "user", "content": "u1"}]
    assert failed.next_request(None) is None  # a failed turn ends the session


def test_multi_turn_sessions_share_system_prompt(tokenizer):
    sampler = TextSampler(tokenizer, random.Random(0))
    a, b = itertools.islice(MultiTurnDataset(sampler, 3, 64, 32, 8).sessions(), 2)
    ra, rb = a.next_request(None), b.next_request(None)
    assert ra.messages[0] == rb.messages[0] and ra.messages[0]["role"] == "system"
    assert ra.messages[1] != rb.messages[1] and ra.session_id != rb.session_id


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "hello", "max_tokens": 5})
        + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    data = JsonlDataset(path, default_max_tokens=7, chat=True)
    requests = [s.next_request(None) for s in data.sessions()]
    assert [r.max_tokens for r in requests] == [5, 7]
    assert requests[0].messages == [{"role": "user", "content": "hello"}]
    cycled = JsonlDataset(path, 7, chat=True, cycle=True).sessions()
    assert len(list(itertools.islice(cycled, 5))) == 5
    with pytest.raises(ValueError, match="needs a prompt"):
        JsonlDataset(path, 7, chat=False)
    path.write_text('{"prompt": "x"}\n{"prompt": "y", "max_tokens": 0}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: max_tokens must be a positive int, got 0"):
        JsonlDataset(path, 7)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: not JSON"):
        JsonlDataset(path, 7)


# ----------------------------------------------------------------- client and runner (ASGI)
def sse(*chunks) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def scripted_app(status_for):
    """An ASGI OpenAI stand-in: three streamed tokens and a usage chunk, or an error."""

    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        status = status_for(request)
        if status != 200:
            payload = json.dumps({"error": {"message": f"nope {status}", "type": "x"}}).encode()
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": payload})
            return
        delta = [
            {"index": 0, "delta": {"reasoning_content": "hm"}},
            {"index": 0, "delta": {"content": "a"}},
        ]
        chunks = [{"choices": [d]} for d in delta] + [
            {"choices": [{"index": 0, "delta": {"content": "b"}}]}
        ]
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 4},
        }
        chunks.append({"choices": [], "usage": usage})
        headers = [(b"content-type", b"text/event-stream"), (b"x-ernie-replica", b"r1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": sse(*chunks)})

    return app


def run_client(app, request, settings):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            return await send_request(http, request, settings, t0=0.0)

    return asyncio.run(go())


def test_client_reads_stream_usage_and_errors():
    settings = RequestSettings(base_url="http://test", model="m", ignore_eos=True)
    request = BenchRequest(
        max_tokens=3, messages=[{"role": "user", "content": "q"}], session_id="s1"
    )
    seen = {}

    def status_for(body):
        seen.update(body)
        return 200

    ok = run_client(scripted_app(status_for), request, settings)
    assert ok.ok and ok.status == "200" and ok.replica == "r1"
    assert (ok.prompt_tokens, ok.output_tokens, ok.cached_tokens) == (7, 3, 4)
    assert ok.text == "ab" and ok.reasoning == "hm" and len(ok.itls) == 2
    assert ok.tpot == pytest.approx((ok.e2el - ok.ttft) / 2)
    assert seen["stream"] is True and seen["ignore_eos"] is True
    assert seen["stream_options"] == {"include_usage": True} and seen["max_tokens"] == 3

    bad = run_client(scripted_app(lambda body: 429), request, settings)
    assert not bad.ok and bad.status == "429" and bad.error == "nope 429"


def test_runner_budget_and_open_loop_counts():
    settings = RequestSettings(base_url="http://test", model="m")
    statuses = itertools.cycle([200, 200, 503])
    app = scripted_app(lambda body: next(statuses))

    def sessions():
        for i in itertools.count():
            yield Conversation(f"s{i}", "", ["a", "b"], max_tokens=3)

    spec = LoadSpec(request_rate=200, num_requests=12)
    transport = httpx.ASGITransport(app=app)
    run = asyncio.run(run_load(sessions(), settings, spec, progress=False, transport=transport))
    assert len(run.results) == 12
    assert sum(not r.ok for r in run.results) == 4
    assert {r.status for r in run.results if not r.ok} == {"503"}


class Schedule:
    """Three users for the first 0.5 s, then one, then none at 1 s."""

    end_s = 1.0

    def __call__(self, t: float) -> int:
        return 3 if t < 0.5 else (1 if t < self.end_s else 0)


def test_closed_loop_follows_the_schedule():
    in_flight, log = [0], []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        in_flight[0] += 1
        headers = dict(scope["headers"])
        log.append((asyncio.get_running_loop().time(), in_flight[0], headers[b"x-session-id"]))
        await asyncio.sleep(0.05)
        in_flight[0] -= 1
        chunk = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": sse(chunk, usage)})

    def sessions():
        for i in itertools.count():
            yield Conversation(f"s{i}", "", ["a"], max_tokens=1)

    settings = RequestSettings(base_url="http://test", model="m")
    spec = LoadSpec(concurrency=Schedule())
    transport = httpx.ASGITransport(app=app)
    run = asyncio.run(run_load(sessions(), settings, spec, progress=False, transport=transport))
    start = log[0][0]
    assert max(depth for _, depth, _ in log) == 3
    assert all(depth == 1 for t, depth, _ in log if t - start > 0.7)
    assert all(r.ok for r in run.results) and len(run.results) == len(log)
    assert len({sid for _, _, sid in log}) == len(log)  # one session per request here


@pytest.mark.parametrize(
    "body, status",
    [
        (b'data: {"error": "engine died"}\n\n', "stream_error"),
        (b'data: {"error": {"message": "boom"}}\n\n', "stream_error"),
        (b'data: {"choices": [\n\n', "bad_response"),
        (b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n', "incomplete"),
        (b"data: [DONE]\n\n", "no_output"),
    ],
)
def test_client_records_broken_streams(body, status):
    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    settings = RequestSettings(base_url="http://test", model="m")
    request = BenchRequest(max_tokens=3, messages=[{"role": "user", "content": "q"}])
    got = run_client(app, request, settings)
    assert not got.ok and got.status == status and got.error


def test_tokens_without_text_still_count():
    """A random model may emit only special tokens: no visible delta, but usage counts them."""
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": sse(finish, usage)})

    settings = RequestSettings(base_url="http://test", model="m")
    request = BenchRequest(max_tokens=3, messages=[{"role": "user", "content": "q"}])
    got = run_client(app, request, settings)
    assert got.ok and got.output_tokens == 3 and got.ttft is not None and got.itls == []
