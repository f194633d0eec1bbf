"""PNG figures of the benchmarks (matplotlib, headless)."""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ernie_cluster.bench.client import RequestResult
from ernie_cluster.bench.metrics import TIMELINE_BUCKET_S, latency_series


def check_plotting() -> None:
    """Fail before a run, not after it, when the figures cannot be drawn."""
    pyplot()


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'ernie-cluster[bench]' (or pass --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TITLE_CHARS = 100
"""Longest title line an 11-inch-wide figure shows unclipped at the default font size."""


def wrapped(title: str) -> str:
    """`title` with every line longer than TITLE_CHARS broken at spaces."""
    return "\n".join(
        "\n".join(textwrap.wrap(line, TITLE_CHARS)) or line for line in title.split("\n")
    )


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


LATENCY_TITLES = {
    "ttft_ms": "time to first token (ms)",
    "tpot_ms": "time per output token (ms)",
    "itl_ms": "inter-token latency (ms)",
    "e2el_ms": "end-to-end latency (ms)",
}


def plot_latencies(
    results: Sequence[RequestResult], summary: dict[str, Any], path: Path, title: str
) -> Path:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency (ms), marked with the summary's
    own p50 and p99 (so the figure and the report show the same numbers)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    series = latency_series(results)
    for ax, (key, name) in zip(axes.flat, LATENCY_TITLES.items(), strict=True):
        values = [v * 1e3 for v in series[key]]
        ax.set_title(name)
        ax.set_ylabel("count")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4C72B0")
        for percentile, style in (("p50", "--"), ("p99", ":")):
            mark = summary[key][percentile]
            ax.axvline(mark, color="black", linestyle=style, label=f"{percentile} {mark:.1f}")
        ax.legend(fontsize=8)
    fig.suptitle(wrapped(title))
    return save_figure(fig, path)


def plot_throughput(
    rows: Sequence[dict[str, Any]], path: Path, title: str, bucket_s: float = TIMELINE_BUCKET_S
) -> Path:
    """Output tokens/s, finished and failed requests and requests in flight per time bucket."""
    plt = pyplot()
    t = [row["t"] for row in rows]
    bucket = f"{bucket_s:g} s"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.plot(t, [row["output_tokens_per_s"] for row in rows], color="#4C72B0")
    top.set_ylabel(f"output tokens/s\n(per {bucket} bucket)")
    bottom.step(t, [row["finished"] for row in rows], where="post", label="finished")
    bottom.step(t, [row["failed"] for row in rows], where="post", label="failed", color="red")
    bottom.plot(t, [row["in_flight"] for row in rows], label="in flight (mid-bucket)", color="gray")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel(f"requests per {bucket} bucket")
    bottom.legend(fontsize=8)
    fig.suptitle(wrapped(title))
    return save_figure(fig, path)


def plot_autoscale_timeline(
    samples: Sequence[dict[str, Any]], phases: dict[str, float], path: Path, title: str
) -> Path:
    """Four stacked panels over time: replicas, users and in-flight requests, engine queues,
    recent latencies; the load's phases are shaded behind them."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    t = [s["t"] for s in samples]

    def series(key: str) -> list[float]:
        return [math.nan if s[key] is None else s[key] for s in samples]

    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    replicas, users, queue, latency = axes
    replicas.step(t, series("running_replicas"), where="post", label="RUNNING", lw=2)
    replicas.step(t, series("starting_replicas"), where="post", label="STARTING")
    replicas.step(t, series("stopping_replicas"), where="post", label="STOPPING")
    replicas.step(
        t, series("target_replicas"), where="post", label="autoscaler target", ls="--", c="k"
    )
    replicas.set_ylabel("replicas")
    replicas.set_title(wrapped(title), pad=16)
    users.step(t, series("target_concurrency"), where="post", label="users (target)", c="k")
    users.plot(t, series("in_flight"), label="requests in flight (client)")
    failed = [s["t"] for i, s in enumerate(samples) if i and s["failed"] > samples[i - 1]["failed"]]
    if failed:
        users.plot(failed, [0] * len(failed), "rx", label="failed requests")
    users.set_ylabel("requests")
    queue.plot(t, series("engine_running"), label="running (engines)")
    queue.plot(t, series("engine_waiting"), label="waiting (engines)")
    queue.set_ylabel("engine queue")
    for key, label in (
        ("ttft_p50_ms", "TTFT p50"),
        ("ttft_p90_ms", "TTFT p90"),
        ("e2el_p50_ms", "E2EL p50"),
        ("e2el_p90_ms", "E2EL p90"),
    ):
        latency.plot(t, series(key), label=label)
    latency.set_ylabel("ms (recent requests)")
    latency.set_xlabel("seconds since the load started")
    edges = [
        0.0,
        phases["ramp_up_end_s"],
        phases["hold_end_s"],
        phases["ramp_down_end_s"],
        phases["load_end_s"],
    ]
    shades = ("#dfe9f5", "#f5e3d0", "#dfe9f5", "#e8f2e0")
    names = ("ramp up", "hold", "ramp down", "tail")
    for ax in axes:
        for (start, end), colour in zip(itertools.pairwise(edges), shades, strict=True):
            ax.axvspan(start, end, color=colour, alpha=0.6, lw=0)
        ax.legend(fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    for (start, end), name in zip(itertools.pairwise(edges), names, strict=True):
        if end > start:
            replicas.text(
                (start + end) / 2,
                1.01,
                name,
                transform=replicas.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="dimgray",
            )
    if phases["hold_start_s"] > phases["ramp_up_end_s"]:
        # The hold waited this long for the most replicas to run.
        replicas.axvline(phases["hold_start_s"], color="dimgray", ls=":", lw=1)
    replicas.yaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)
