"""The autoscaling load test: its load shape, step collapsing, /metrics parsing and CLI
mapping against hand-computed values, and (slow) the whole test in deploy mode on the tiny
checkpoint: replicas 1 -> 2 -> 1, zero failed requests, JSON and PNG written, app deleted."""

from __future__ import annotations

import json
import time

import pytest

from ernie_cluster.bench.autoscale import (
    AutoscaleTestConfig,
    format_summary,
    run_autoscale_test,
    scaling_events,
)
from ernie_cluster.bench.autoscale_target import start_serve
from ernie_cluster.bench.autoscale_timeline import (
    ClientLoad,
    LoadProfile,
    collapse_runs,
    engine_queues,
)
from ernie_cluster.bench.client import RequestResult
from ernie_cluster.bench.datasets import BenchRequest, SingleRequest
from ernie_cluster.bench.runner import schedule_done


# ---------------------------------------------------------------------------- load shape
def test_fixed_profile_shape():
    profile = LoadProfile(peak_concurrency=5, ramp_up_s=4, hold_s=10, ramp_down_s=5)
    # ramp-up: 1 + floor(4 t / 4) = 1 + floor(t)
    assert [profile(t) for t in (0, 0.99, 1, 2.5, 3.99)] == [1, 1, 2, 3, 4]
    assert [profile(t) for t in (4, 9, 13.99)] == [5, 5, 5]
    # ramp-down from 14 to 19: ceil(5 (1 - (t - 14) / 5)), at least 1
    assert [profile(t) for t in (14, 15, 16.5, 18.99)] == [5, 4, 3, 1]
    assert profile.end_s == 19
    assert [profile(t) for t in (-1, 19, 100)] == [0, 0, 0]


def test_profile_steps_are_monotone_and_reach_the_peak():
    profile = LoadProfile(peak_concurrency=8, ramp_up_s=10, hold_s=20, ramp_down_s=10)
    up = [profile(t / 10) for t in range(100)]
    down = [profile(30 + t / 10) for t in range(100)]
    assert up == sorted(up) and up[0] == 1 and profile(10) == 8
    assert down == sorted(down, reverse=True) and down[-1] == 1 and profile(40) == 0


def test_hold_waits_for_the_scale_up_within_bounds():
    profile = LoadProfile(8, ramp_up_s=10, hold_s=20, ramp_down_s=10, scale_up_wait_s=60)
    # Not scaled up yet: the hold runs to the latest start (10 + 60) plus the hold.
    assert profile.ramp_down_start_s == 90 and profile(89) == 8
    profile.mark_scaled_up(25)
    profile.mark_scaled_up(30)  # only the first counts
    assert (profile.hold_start_s, profile.ramp_down_start_s, profile.end_s) == (25, 45, 55)
    early = LoadProfile(8, 10, 20, 10, scale_up_wait_s=60)
    early.mark_scaled_up(4)  # during the ramp-up: the hold still starts at its end
    assert early.hold_start_s == 10
    late = LoadProfile(8, 10, 20, 10, scale_up_wait_s=60)
    late.mark_scaled_up(200)  # after the latest start: no change
    assert late.hold_start_s == 70


def test_tail_lasts_until_scaled_down_within_bounds():
    profile = LoadProfile(8, 10, 20, 10, tail_concurrency=2, tail_max_s=100)
    assert profile.ramp_down_end_s == 40
    assert profile(39.9) >= 2 and profile(40) == 2 and profile(139) == 2 and profile(140) == 0
    profile.mark_scaled_down(30)  # before the ramp-down ended: ignored
    assert profile.end_s == 140
    profile.mark_scaled_down(52)
    assert profile.end_s == 52 and profile(51.9) == 2 and profile(52) == 0


def test_runner_sees_the_profile_end():
    profile = LoadProfile(2, 1, 1, 1)
    t0 = time.perf_counter() - 3.5
    assert profile(3.5) == 0 and schedule_done(profile, t0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peak_concurrency": 0}, "peak concurrency must be >= 1, got 0"),
        ({"hold_s": -1}, "hold_s must be >= 0, got -1"),
        ({"tail_concurrency": 9}, r"tail concurrency must be in \[0, peak 8\], got 9"),
    ],
)
def test_profile_rejects_bad_numbers(kwargs, message):
    base = {"peak_concurrency": 8, "ramp_up_s": 1, "hold_s": 1, "ramp_down_s": 1}
    with pytest.raises(ValueError, match=message):
        LoadProfile(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas, got 3 and 2"),
        ({"peak_concurrency": 4, "target_ongoing_requests": 4}, "peak concurrency 4 never"),
        ({"cool_down_s": 0}, "cool_down_s must be > 0, got 0"),
    ],
)
def test_config_rejects_bad_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoscaleTestConfig(**kwargs)


def test_config_modes_and_app_names():
    assert (AutoscaleTestConfig().mode, AutoscaleTestConfig().app) == ("deploy", "ernie-autoscale")
    attach = AutoscaleTestConfig(base_url="http://127.0.0.1:8000")
    assert (attach.mode, attach.app) == ("attach", "ernie")
    scaling = AutoscaleTestConfig(target_ongoing_requests=3).serve_app_config().autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
        1,
        2,
        3,
    )


# ------------------------------------------------------------------------ observations
def test_collapse_runs():
    assert collapse_runs([1, 1, None, 1, 2, 2, None, 2, 1, 1]) == [1, 2, 1]
    assert collapse_runs([None, None]) == []
    assert collapse_runs([2, 1, 2, 1]) == [2, 1, 2, 1]


def test_scaling_events():
    samples = [
        {"t": t, "running_replicas": r} for t, r in [(0, 1), (5, 1), (9, 2), (30, 2), (41, 1)]
    ]
    assert scaling_events(samples, 1, 2) == {
        "first_scale_up_s": 9,
        "reached_max_s": 9,
        "back_to_min_s": 41,
    }
    flat = [{"t": 0, "running_replicas": 1}]
    assert scaling_events(flat, 1, 2) == dict.fromkeys(
        ("first_scale_up_s", "reached_max_s", "back_to_min_s")
    )


def test_engine_queues_sum_over_replicas():
    text = (
        "# HELP ernie_num_requests_waiting Requests waiting to be scheduled\n"
        "# TYPE ernie_num_requests_waiting gauge\n"
        'ernie_num_requests_waiting{replica="a"} 3.0\n'
        'ernie_num_requests_waiting{replica="b"} 1.0\n'
        "# TYPE ernie_num_requests_running gauge\n"
        'ernie_num_requests_running{replica="a"} 5.0\n'
        "# TYPE ernie_requests_total counter\n"
        'ernie_requests_total{status="success"} 9.0\n'
    )
    assert engine_queues(text) == (4.0, 5.0)
    assert engine_queues("") == (0.0, 0.0)


def test_client_load_counts_started_finished_and_recent():
    load = ClientLoad()
    sessions = [
        load.count(SingleRequest(BenchRequest(max_tokens=1, prompt="x"), session_id=str(i)))
        for i in range(3)
    ]
    for session in sessions:
        assert session.next_request(None) is not None
        assert session.next_request(None) is None  # a finished session starts nothing
    assert (load.started, load.in_flight) == (3, 3)
    for end, ok in ((1.0, True), (2.0, False), (3.0, True)):
        load.on_result(RequestResult(session_id=None, turn=0, start=0.0, ok=ok, end=end))
    assert (load.in_flight, load.failed) == (0, 1)
    assert [r.end for r in load.recent(2.0)] == [3.0, 2.0]


def test_start_serve_connects_again_after_a_proxy_restart(monkeypatch):
    from ray import serve
    from ray.exceptions import RayActorError

    calls = []

    def start(http_options):
        calls.append(http_options)
        if len(calls) == 1:
            raise RayActorError()  # the proxy it waited on was killed and restarted

    monkeypatch.setattr(serve, "start", start)
    start_serve(1234)
    assert calls == [{"host": "127.0.0.1", "port": 1234}] * 2


# ----------------------------------------------------------------------------------- CLI
def test_cli_flags_map_to_the_config():
    from ernie_cluster.cli.bench_autoscale import config_from_args
    from ernie_cluster.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "bench",
            "autoscale",
            "--max-replicas",
            "3",
            "--ramp-up",
            "5",
            "--cool-down",
            "60",
            "--tail-concurrency",
            "0",
            "--no-ignore-eos",
            "--base-url",
            "http://127.0.0.1:9",
            "--out",
            "somewhere",
        ]
    )
    config = config_from_args(args)
    assert (config.max_replicas, config.ramp_up_s, config.cool_down_s) == (3, 5.0, 60.0)
    assert (config.tail_concurrency, config.ignore_eos, config.mode) == (0, False, "attach")
    assert config.out_dir == "somewhere" and config.hold_s == AutoscaleTestConfig.hold_s


# ------------------------------------------------------------------------ the real test
@pytest.mark.slow
def test_autoscale_cycle_on_cpu(ray_cluster, tiny_checkpoint, tmp_path):
    """The CPU-sized setup end to end. Every wait inside is bounded (scale-up wait, cool-down,
    readiness), none is a pass/fail threshold: the checks are on what happened."""
    from ray import serve

    config = AutoscaleTestConfig(
        model=str(tiny_checkpoint), dtype="float32", out_dir=str(tmp_path), progress=False
    )
    report = run_autoscale_test(config)
    print(format_summary(report))

    written = json.loads((tmp_path / "autoscale.json").read_text())
    assert written["checks"] == report["checks"]
    assert report["replica_sequence"] == [1, 2, 1], report["events"]
    assert report["checks"] == {
        "scaled_up": True,
        "scaled_down": True,
        "no_failed_requests": True,
    }, report["summary"]["error_examples"]
    summary = report["summary"]
    assert summary["failed"] == 0 and summary["completed"] == summary["num_requests_sent"] > 0
    # Both replicas answered requests (the x-ernie-replica header).
    assert len(summary["requests_by_replica"]) == 2
    assert report["samples"] and report["samples"][0]["running_replicas"] == 1
    png = (tmp_path / "autoscale_timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert config.app not in serve.status().applications
