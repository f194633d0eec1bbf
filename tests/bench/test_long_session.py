"""The long-session benchmark end to end at a CPU-test size: two spawned one-process servers
(prefix caching on, off) on the tiny checkpoint, one conversation grown to 8K tokens.

It checks the mechanism that keeps TTFT flat, not TTFT itself (timings are reported, never
asserted): with caching each turn reuses the previous prompt up to the last whole cache block
before the part the chat template re-renders, so it computes about one turn's growth;
without caching nothing is reused and every turn computes its whole context.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import httpx
import pytest

from ernie_cluster.bench.long_session import LongSessionConfig, run_long_session
from ernie_cluster.bench.long_session_report import format_report
from ernie_cluster.distributed.process_group import free_port

MAX_CONTEXT = 8192
TURN_TOKENS = 1024
OUTPUT_LEN = 8
BLOCK_SIZE = 16  # the servers' default --block-size


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tmp_path_factory):
    config = LongSessionConfig(
        model=str(tiny_checkpoint),
        max_context=MAX_CONTEXT,
        turn_tokens=TURN_TOKENS,
        output_len=OUTPUT_LEN,
        dtype="float32",
        out_dir=str(tmp_path_factory.mktemp("long_session")),
        progress=False,
        startup_timeout_s=120,
        timeout_s=120,
    )
    return run_long_session(config)


@pytest.fixture(scope="module")
def regenerated_tail(tiny_checkpoint) -> int:
    """Tokens at the end of a prompt that the next turn's prompt does not repeat.

    A prompt ends with the generation prompt (`<|im_start|>assistant\\n<think>\\n`); once the
    reply is in the history the template renders that turn as `<|im_start|>assistant\\n
    <response>...`, so the next prompt shares everything but this tail. Derived by rendering
    one turn both ways rather than hard-coded, so a template change moves the bound with it.
    """
    from ernie_cluster.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    first = [{"role": "user", "content": "one"}]
    second = [*first, {"role": "assistant", "content": "two"}, {"role": "user", "content": "x"}]
    a = tokenizer.encode(tokenizer.apply_chat_template(first))
    b = tokenizer.encode(tokenizer.apply_chat_template(second))
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return len(a) - shared


def ok_turns(report, run):
    turns = report["runs"][run]["turns"]
    assert turns, report["runs"][run].get("error")
    assert all(t["ok"] for t in turns), [(t["turn"], t["status"], t["error"]) for t in turns]
    return turns


@pytest.mark.slow
def test_both_runs_grow_one_conversation_to_the_limit(report):
    assert report["failed"] == 0
    for run in ("cached", "uncached"):
        turns = ok_turns(report, run)
        prompts = [t["prompt_tokens"] for t in turns]
        assert len(turns) >= 5, prompts
        assert prompts == sorted(prompts) and len(set(prompts)) == len(prompts)
        assert all(t["output_tokens"] == OUTPUT_LEN for t in turns)
        # it stopped because one more turn would not fit, not earlier
        assert prompts[-1] + OUTPUT_LEN <= MAX_CONTEXT
        assert prompts[-1] + 2 * (TURN_TOKENS + 64) > MAX_CONTEXT, prompts
    # greedy replies and one seed: both servers saw exactly the same prompts
    comparison = report["comparison"]
    assert comparison["same_prompts"], comparison
    assert comparison["turns_compared"] == len(report["runs"]["cached"]["turns"])


@pytest.mark.slow
def test_with_caching_each_turn_computes_only_its_growth(report, regenerated_tail):
    turns = ok_turns(report, "cached")
    assert turns[0]["cached_tokens"] == 0  # a fresh server; the warm-up shares no whole block
    for prev, turn in itertools.pairwise(turns):
        reusable = prev["prompt_tokens"] - regenerated_tail
        # whole blocks of the shared prefix: at most one partial block is recomputed
        assert turn["cached_tokens"] % BLOCK_SIZE == 0
        assert reusable - BLOCK_SIZE < turn["cached_tokens"] <= reusable, (prev, turn)
        growth = turn["prompt_tokens"] - prev["prompt_tokens"]
        assert turn["computed_tokens"] < growth + regenerated_tail + BLOCK_SIZE
    summary = report["runs"]["cached"]["summary"]
    assert summary["caching_observed"]
    assert summary["total_computed_tokens"] < 2 * turns[-1]["prompt_tokens"]


@pytest.mark.slow
def test_without_caching_every_turn_computes_its_whole_context(report):
    turns = ok_turns(report, "uncached")
    assert all(t["cached_tokens"] == 0 for t in turns)
    assert all(t["computed_tokens"] == t["prompt_tokens"] for t in turns)
    assert not report["runs"]["uncached"]["summary"]["caching_observed"]


@pytest.mark.slow
def test_report_files_and_fields(report):
    with open(report["files"]["json"]) as f:
        data = json.load(f)
    assert data["comparison"] == report["comparison"]
    assert data["settings"]["max_context"] == MAX_CONTEXT
    for run in ("cached", "uncached"):
        summary = data["runs"][run]["summary"]
        for key in ("ttft_first_s", "ttft_last_s", "ttft_last_over_first", "last_context_tokens"):
            assert summary[key] is not None and summary[key] > 0, (run, key, summary)
        turn = data["runs"][run]["turns"][-1]
        assert {"prompt_tokens", "cached_tokens", "computed_tokens", "ttft_s", "e2el_s"} <= set(
            turn
        )
        assert ("--no-prefix-caching" in data["runs"][run]["server_args"]) == (run == "uncached")
    assert data["comparison"]["uncached_over_cached_last_ttft"] > 0
    with open(report["files"]["png"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_report(report)
    assert "uncached/cached TTFT" in table and "NOTE" not in table


@pytest.mark.slow
def test_spawned_servers_are_stopped(report):
    for run in ("cached", "uncached"):
        with pytest.raises(httpx.ConnectError):
            httpx.get(report["runs"][run]["base_url"] + "/health", timeout=5)


def test_an_unreachable_server_fails_before_any_run(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = LongSessionConfig(base_url_uncached=closed, out_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=f"cannot reach {closed}"):
        run_long_session(config)
    assert not (tmp_path / "long_session.json").exists()


def test_config_rejects_a_context_too_short_for_two_turns():
    with pytest.raises(ValueError, match="max_context 3000"):
        LongSessionConfig(max_context=3000, turn_tokens=2048)
    with pytest.raises(ValueError, match="turn_tokens must be >= 1, got 0"):
        LongSessionConfig(turn_tokens=0)


@pytest.mark.slow  # a child process that imports torch: 3-5 s
def test_cli_help_lists_the_flags():
    out = subprocess.run(
        [sys.executable, "-m", "ernie_cluster.cli.main", "bench", "long-session", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in ("--max-context", "--turn-tokens", "--base-url-cached", "--base-url-uncached"):
        assert flag in out


SESSIONS, SESSION_CONTEXT, SESSION_TURN_TOKENS = 3, 2048, 256
DEVICE_BLOCKS = 160  # 2560 tokens: the three sessions' 6K overflow it


@pytest.fixture(scope="module")
def sessions_report(tiny_checkpoint, tmp_path_factory):
    config = LongSessionConfig(
        model=str(tiny_checkpoint),
        max_context=SESSION_CONTEXT,
        turn_tokens=SESSION_TURN_TOKENS,
        output_len=OUTPUT_LEN,
        dtype="float32",
        sessions=SESSIONS,
        kv_offload_gb=0.05,
        server_args=["--num-kv-blocks", str(DEVICE_BLOCKS)],
        out_dir=str(tmp_path_factory.mktemp("long_session_sessions")),
        progress=False,
        startup_timeout_s=120,
        timeout_s=120,
    )
    return run_long_session(config)


@pytest.mark.slow
def test_sessions_return_from_the_host_tier_not_recompute(sessions_report, regenerated_tail):
    """Round-robin sessions overflow the device pool: with the host tier every returning turn
    still reuses its whole previous prompt (copied back); without it, later returning turns
    find their prefix evicted and recompute it. Both servers saw the same prompts."""
    report = sessions_report
    assert report["failed"] == 0, report["runs"]
    on, off = ok_turns(report, "tier-on"), ok_turns(report, "tier-off")
    assert [(t["session"], t["prompt_digest"]) for t in on] == [
        (t["session"], t["prompt_digest"]) for t in off
    ]
    previous: dict[int, dict] = {}
    evicted = 0
    for turn_on, turn_off in zip(on, off, strict=True):
        prev = previous.get(turn_on["session"])
        previous[turn_on["session"]] = turn_on
        if prev is None:
            continue
        reusable = prev["prompt_tokens"] - regenerated_tail
        assert reusable - BLOCK_SIZE < turn_on["cached_tokens"] <= reusable, (prev, turn_on)
        evicted += turn_off["cached_tokens"] <= reusable - SESSION_TURN_TOKENS
        # the sibling turn found the same history on the device
        assert turn_on["device_hit_cached_tokens"] >= turn_on["cached_tokens"] - BLOCK_SIZE
    assert evicted >= SESSIONS  # the tier-off server lost prefixes the tier-on one kept
    host = report["host_tier"]
    assert host["ernie_host_kv_blocks_loaded_total"] > 0
    assert host["ernie_host_kv_hit_tokens_total"] > 0
    assert host["blocks_moved"] > 0 and host["host_bytes_used"] > 0
    assert not any(report["runs"]["tier-off"]["host_tier"].values())
    assert "--kv-offload-gb" in report["runs"]["tier-on"]["server_args"]
    assert "--kv-offload-gb" not in report["runs"]["tier-off"]["server_args"]


@pytest.mark.slow
def test_sessions_report_table_and_files(sessions_report):
    rows = [row for row in sessions_report["buckets"] if row["sessions"]]
    assert rows, sessions_report["buckets"]
    for row in rows:
        for key in ("ttft_tier_off_s", "ttft_tier_on_s", "ttft_device_hit_s", "off_over_on"):
            assert row[key] is not None and row[key] > 0, (key, row)
    table = format_report(sessions_report)
    assert "device hit ms" in table and "host tier:" in table
    with open(sessions_report["files"]["png"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sessions_cannot_attach_to_running_servers():
    with pytest.raises(ValueError, match="--sessions 2 spawns its two servers"):
        LongSessionConfig(sessions=2, base_url_cached="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="sessions must be >= 1, got 0"):
        LongSessionConfig(sessions=0)
