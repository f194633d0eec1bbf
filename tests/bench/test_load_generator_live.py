"""`ernie-cluster bench serve` for about 20 s against a live tiny server (a child process
running `serve --no-ray-serve`). The server's own Prometheus counters are the oracle for
what the load generator says it sent and received."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ernie_cluster.bench.server_process import ServerProcess
from ernie_cluster.cli.main import main

SUMMARY_FIELDS = {
    "duration_s",
    "num_requests_sent",
    "completed",
    "failed",
    "errors_by_status",
    "total_input_tokens",
    "total_cached_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2el_ms",
    "goodput",
    "requests_by_replica",
}
STAT_FIELDS = {"mean", "min", "max", "p50", "p90", "p99"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    args = ["--model", str(tiny_checkpoint), "--served-model-name", "tiny", "--dtype", "float32"]
    with ServerProcess([*args, "--reasoning-parser", "ernie_x1"]) as server:
        yield server


def server_counters(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ernie_requests_total":
                values[f"requests_{sample.labels['status']}"] = sample.value
            elif sample.name in ("ernie_generation_tokens_total", "ernie_prompt_tokens_total"):
                values[sample.name] = sample.value
    return values


def settled_counters(base_url: str, sent: int, before: dict[str, float]) -> dict[str, float]:
    """The counters once every request the client finished is also finished server-side (the
    server counts a request after its last byte went out)."""
    deadline = time.monotonic() + 10
    while True:
        now = server_counters(base_url)
        finished = sum(v - before.get(k, 0) for k, v in now.items() if k.startswith("requests_"))
        if finished >= sent or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def bench(base_url, out, label, *extra):
    code = main(
        [
            "bench",
            "serve",
            "--base-url",
            base_url,
            "--out",
            str(out),
            "--label",
            label,
            "--no-progress",
            "--save-requests",
            *extra,
        ]
    )
    report = json.loads((out / f"{label}.json").read_text())
    return code, report


@pytest.mark.slow
def test_load_generator_against_live_server(server, tmp_path):
    before = server_counters(server.base_url)
    code, report = bench(
        server.base_url,
        tmp_path,
        "poisson",
        "--dataset",
        "random",
        "--request-rate",
        "4",
        "--duration",
        "14",
        "--input-len",
        "64",
        "--range-ratio",
        "0.5",
        "--output-len",
        "16",
        "--ignore-eos",
        "--goodput",
        "ttft:60000",
        "e2el:60000",
    )
    s = report["summary"]
    assert code == 0
    assert set(s) >= SUMMARY_FIELDS
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(s[key]) == STAT_FIELDS and s[key]["p50"] <= s[key]["p99"]
    sent = s["num_requests_sent"]
    assert sent >= 20  # ~56 expected at 4/s for 14 s
    assert s["completed"] == sent == len(report["requests"])
    assert s["failed"] == 0 and s["errors_by_status"] == {}
    assert s["goodput"]["good_requests"] == sent
    assert all(r["ok"] and r["output_tokens"] == r["max_tokens"] for r in report["requests"])
    assert {r["max_tokens"] for r in report["requests"]} <= set(range(8, 25))
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in report["requests"])
    assert sum(row["started"] for row in report["timeline"]) == sent
    assert report["settings"]["model"] == "tiny" and report["settings"]["request_rate"] == 4
    after = settled_counters(server.base_url, sent, before)
    assert after["requests_success"] - before.get("requests_success", 0) == sent
    assert (
        after["ernie_generation_tokens_total"] - before["ernie_generation_tokens_total"]
        == (s["total_output_tokens"])
    )
    assert (
        after["ernie_prompt_tokens_total"] - before["ernie_prompt_tokens_total"]
        == (s["total_input_tokens"])
    )
    for name in ("poisson_latency.png", "poisson_throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_multi_turn_sessions_reuse_their_prefix(server, tmp_path):
    code, report = bench(
        server.base_url,
        tmp_path,
        "sessions",
        "--dataset",
        "multi-turn",
        "--max-concurrency",
        "3",
        "--duration",
        "6",
        "--turns",
        "3",
        "--input-len",
        "48",
        "--system-prompt-len",
        "64",
        "--output-len",
        "8",
    )
    s, requests = report["summary"], report["requests"]
    assert code == 0 and s["failed"] == 0 and s["completed"] == s["num_requests_sent"]
    by_session = {}
    for r in requests:
        by_session.setdefault(r["session_id"], []).append(r)
    later_turns = [r for r in requests if r["turn"] > 0]
    assert later_turns, "no session got past its first turn"
    for turns in by_session.values():
        assert [r["turn"] for r in turns] == list(range(len(turns)))
        # each turn's prompt holds the previous one, and the server served it from cache
        for prev, cur in itertools.pairwise(turns):
            assert cur["prompt_tokens"] > prev["prompt_tokens"]
            assert cur["cached_tokens"] >= prev["prompt_tokens"] - 16 - 8
    assert s["total_cached_tokens"] > 0
