"""PNG figures of the benchmarks (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ernie_cluster.bench.client import RequestResult


def check_plotting() -> None:
    """Fail before a run, not after it, when the figures cannot be drawn."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'ernie-cluster[bench]' (or pass --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latencies(results: Sequence[RequestResult], path: Path, title: str) -> Path:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency (ms) with p50/p99 marks."""
    plt = _pyplot()
    ok = [r for r in results if r.ok]
    series = {
        "time to first token (ms)": [r.ttft * 1e3 for r in ok if r.ttft is not None],
        "time per output token (ms)": [t * 1e3 for r in ok if (t := r.tpot) is not None],
        "inter-token latency (ms)": [g * 1e3 for r in ok for g in r.itls],
        "end-to-end latency (ms)": [e * 1e3 for r in ok if (e := r.e2el) is not None],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        ax.set_title(name)
        ax.set_ylabel("count")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4C72B0")
        ordered = sorted(values)
        for q, style in ((0.5, "--"), (0.99, ":")):
            mark = ordered[min(len(ordered) - 1, int(q * len(ordered)))]
            ax.axvline(mark, color="black", linestyle=style, label=f"p{round(q * 100)} {mark:.1f}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Output tokens/s, finished and failed requests and requests in flight per second."""
    plt = _pyplot()
    t = [row["t"] for row in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.plot(t, [row["output_tokens_per_s"] for row in rows], color="#4C72B0")
    top.set_ylabel("output tokens/s")
    top.set_title(title)
    bottom.step(t, [row["finished"] for row in rows], where="post", label="finished")
    bottom.step(t, [row["failed"] for row in rows], where="post", label="failed", color="red")
    bottom.plot(t, [row["in_flight"] for row in rows], label="in flight", color="gray")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylabel("requests per bucket")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
