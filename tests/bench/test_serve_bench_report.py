"""What `bench serve` shows: figures that carry the report's own p50/p99, the bucket size and
the run's settings; a summary in sentences; a progress bar without per-request log lines."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ernie_cluster.bench import plots
from ernie_cluster.bench.client import RequestResult
from ernie_cluster.bench.metrics import parse_slos, summarize, timeline
from ernie_cluster.bench.run_files import fresh_label
from ernie_cluster.bench.serve_bench import ServeBenchConfig, format_summary, run_title


def make_results(count: int = 41, seed: int = 7) -> list[RequestResult]:
    rng = random.Random(seed)
    results = []
    for i in range(count):
        start = i * 0.1
        ttft = rng.uniform(0.01, 0.5)
        itls = [rng.uniform(0.005, 0.05) for _ in range(rng.randint(1, 9))]
        results.append(
            RequestResult(
                session_id=None,
                turn=0,
                start=start,
                ok=True,
                status="200",
                ttft=ttft,
                end=start + ttft + sum(itls),
                itls=itls,
                prompt_tokens=10,
                output_tokens=len(itls) + 1,
            )
        )
    results.append(RequestResult(None, 0, 4.2, ok=False, status="503", error="queue\n full"))
    return results


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions would save."""
    captured = []

    def keep(fig, path):
        captured.append(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", keep)
    yield captured
    for fig in captured:
        plots.pyplot().close(fig)


def test_latency_figure_marks_the_reports_percentiles(figures, tmp_path):
    results = make_results()
    summary = summarize(results, duration_s=5.0)
    plots.plot_latencies(results, summary, tmp_path / "latency.png", "title")
    (fig,) = figures
    for ax, key in zip(fig.axes, ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"), strict=True):
        marks = {line.get_label().split()[0]: line.get_xdata()[0] for line in ax.get_lines()}
        assert marks == {"p50": summary[key]["p50"], "p99": summary[key]["p99"]}, key
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels == [f"p50 {summary[key]['p50']:.1f}", f"p99 {summary[key]['p99']:.1f}"]
    assert fig._suptitle.get_text() == "title"


def test_throughput_figure_names_its_bucket(figures, tmp_path):
    rows = timeline(make_results(), bucket_s=0.5)
    plots.plot_throughput(rows, tmp_path / "throughput.png", "a\nb", bucket_s=0.5)
    (fig,) = figures
    top, bottom = fig.axes
    assert "per 0.5 s bucket" in top.get_ylabel()
    assert bottom.get_ylabel() == "requests per 0.5 s bucket"
    assert fig._suptitle.get_text() == "a\nb"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"num_requests": 200, "request_rate": 4.0, "range_ratio": 0.5},
            "4 req/s (Poisson), 200 requests; random prompts of 256 ±50% tokens, up to 64",
        ),
        (
            {"duration_s": 60.0, "max_concurrency": 32, "dataset": "multi-turn", "turns": 8},
            "closed loop of 32 users, 60 s; multi-turn: 8 turns, 256-token system prompt",
        ),
        (
            {"num_requests": 5, "request_rate": 2.0, "burstiness": 0.5, "ignore_eos": True},
            "2 req/s (gamma, burstiness 0.5), 5 requests; random prompts of 256 tokens, exactly",
        ),
    ],
)
def test_titles_carry_the_run_settings(overrides, expected):
    config = ServeBenchConfig(base_url="http://127.0.0.1:8000", **overrides)
    first, second = run_title(config, "tiny").split("\n")
    assert first == "tiny @ http://127.0.0.1:8000 (chat)"
    assert expected in second and "seed 0" in second


def test_summary_speaks_in_sentences():
    results = make_results()
    summary = summarize(results, duration_s=5.0, slos=parse_slos(["ttft:250", "e2el:1000"]))
    good = summary["goodput"]["good_requests"]
    text = format_summary({"summary": summary, "files": {}})
    assert "{" not in text and "}" not in text
    assert f": {good} of 42 requests ({good / 42:.1%}) met TTFT <= 250 ms and E2EL <= 1000 ms" in (
        text
    )
    assert "failed 1 (by status 503: 1)" in text
    assert "example 503 error: queue full" in text


def test_results_directory_is_gitignored():
    from ernie_cluster.cli.main import build_parser

    args = build_parser().parse_args(["bench", "serve", "--num-prompts", "1"])
    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", f"{args.out}/serve_bench.json"], cwd=repo, check=False
    )
    assert ignored.returncode == 0, f"{args.out}/ is not in .gitignore"


@pytest.mark.slow  # a child process: about 8 s
def test_bench_serve_prints_no_request_log_lines(tiny_checkpoint, tmp_path):
    """A real `ernie-cluster bench serve` process (progress bar on, default INFO logging)
    against a scripted server: no httpx line per request, and a report whose numbers match
    the JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
    from http_fixtures import serve_scripted_client

    with serve_scripted_client(tiny_checkpoint, {"": "hello there"}, default="") as served:
        command = [
            *(sys.executable, "-m", "ernie_cluster.cli.main", "bench", "serve"),
            *("--base-url", served.base_url, "--model", "tiny", "--tokenizer"),
            *(str(tiny_checkpoint), "--num-prompts", "12", "--input-len", "16"),
            *("--output-len", "4", "--out", str(tmp_path), "--goodput", "ttft:60000"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HTTP Request" not in done.stderr + done.stdout
    report = json.loads((tmp_path / "serve_bench.json").read_text())
    ttft = report["summary"]["ttft_ms"]
    assert f"p50 {ttft['p50']:9.2f}" in done.stdout
    assert "goodput" in done.stdout and "12 of 12 requests (100.0%) met TTFT <= 60000 ms" in (
        done.stdout
    )
    for name in ("serve_bench_latency.png", "serve_bench_throughput.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(report["summary"]["request_throughput"])


def test_title_counts_the_requests_really_sent():
    """A duration can end a run before `--num-prompts` requests went out: the figure says how
    many were sent, not how many were planned."""
    config = ServeBenchConfig(base_url="http://127.0.0.1:8000", num_requests=200, duration_s=30.0)
    assert "90 of 200 requests sent" in run_title(config, "demo", num_sent=90)
    assert ", 200 requests" not in run_title(config, "demo", num_sent=90)
    assert ", 200 requests" in run_title(config, "demo", num_sent=200)


def test_long_title_lines_wrap_instead_of_clipping(figures, tmp_path):
    title = "demo @ http://127.0.0.1:8000 (chat)\n" + ", ".join(["closed loop of 32 users"] * 8)
    plots.plot_throughput(timeline(make_results(), bucket_s=0.5), tmp_path / "t.png", title)
    (fig,) = figures
    lines = fig._suptitle.get_text().split("\n")
    assert lines[0] == "demo @ http://127.0.0.1:8000 (chat)"
    assert len(lines) > 2 and all(len(line) <= plots.TITLE_CHARS for line in lines)
    assert " ".join(lines[1:]) == ", ".join(["closed loop of 32 users"] * 8)


def test_a_second_run_keeps_the_first_runs_files(tmp_path):
    (tmp_path / "serve_bench.json").write_text("{}")
    assert fresh_label(tmp_path, "serve_bench", (".json", "_latency.png")) == "serve_bench-2"
    (tmp_path / "serve_bench-2_latency.png").write_bytes(b"")
    assert fresh_label(tmp_path, "serve_bench", (".json", "_latency.png")) == "serve_bench-3"
    assert fresh_label(tmp_path, "other", (".json",)) == "other"
