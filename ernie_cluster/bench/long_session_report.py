"""The long-session benchmark's report: per-run summaries, the cached-versus-uncached
comparison, the printed table and the figure.

Reads the per-turn records `long_session` collected; never sends a request. Timings are
reported as measured, never judged against a threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ernie_cluster.bench.plots import pyplot, save_figure


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def summarize_run(record: dict[str, Any]) -> dict[str, Any]:
    """First/last-turn TTFT and what the cache did, added to one run's record."""
    turns = record["turns"]
    ok = [t for t in turns if t["ok"]]
    first, last = (ok[0], ok[-1]) if ok else (None, None)
    summary = {
        "num_turns": len(turns),
        "failed": sum(1 for t in turns if not t["ok"]) + (1 if record.get("error") else 0),
        "first_context_tokens": first["prompt_tokens"] if first else None,
        "last_context_tokens": last["prompt_tokens"] if last else None,
        "ttft_first_s": first["ttft_s"] if first else None,
        "ttft_last_s": last["ttft_s"] if last else None,
        "ttft_last_over_first": _ratio(
            last["ttft_s"] if last else None, first["ttft_s"] if first else None
        ),
        "total_prompt_tokens": sum(t["prompt_tokens"] for t in ok),
        "total_cached_tokens": sum(t["cached_tokens"] for t in ok),
        "total_computed_tokens": sum(t["computed_tokens"] for t in ok),
        # an attached server's caching switch is only known from what it reports
        "caching_observed": any(t["cached_tokens"] > 0 for t in ok),
    }
    return {**record, "summary": summary}


def compare(cached: dict[str, Any], uncached: dict[str, Any]) -> dict[str, Any]:
    """Uncached over cached TTFT at the last turn both runs completed, and whether both runs
    sent the same prompts (greedy replies should make them identical)."""
    a = [t for t in cached["turns"] if t["ok"]]
    b = [t for t in uncached["turns"] if t["ok"]]
    common = min(len(a), len(b))
    differing = next(
        (i for i in range(common) if a[i]["prompt_digest"] != b[i]["prompt_digest"]), None
    )
    last = common - 1
    return {
        "turns_compared": common,
        "same_prompts": differing is None and len(a) == len(b),
        "first_differing_turn": differing,
        "last_common_turn": last if common else None,
        "ttft_last_cached_s": a[last]["ttft_s"] if common else None,
        "ttft_last_uncached_s": b[last]["ttft_s"] if common else None,
        "uncached_over_cached_last_ttft": _ratio(b[last]["ttft_s"], a[last]["ttft_s"])
        if common
        else None,
    }


def summarize_runs(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summarized = {name: summarize_run(record) for name, record in runs.items()}
    return {
        "runs": summarized,
        "comparison": compare(summarized["cached"], summarized["uncached"]),
        "failed": sum(r["summary"]["failed"] for r in summarized.values()),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The per-turn table (both runs side by side) and the summary lines."""
    cached, uncached = report["runs"]["cached"], report["runs"]["uncached"]
    header = (
        f"{'turn':>4} | {'context':>7} {'cached':>7} {'computed':>8} {'TTFT ms':>9} "
        f"{'E2E ms':>9} | {'context':>7} {'computed':>8} {'TTFT ms':>9} {'E2E ms':>9}"
    )
    lines = [
        f"{'':4} | {'prefix caching on':^44} | {'prefix caching off':^36}",
        header,
        "-" * len(header),
    ]
    for i in range(max(len(cached["turns"]), len(uncached["turns"]))):
        a = cached["turns"][i] if i < len(cached["turns"]) else None
        b = uncached["turns"][i] if i < len(uncached["turns"]) else None
        left = (
            f"{a['prompt_tokens']:>7} {a['cached_tokens']:>7} {a['computed_tokens']:>8} "
            f"{_ms(a['ttft_s']):>9} {_ms(a['e2el_s']):>9}"
            if a
            else " " * 44
        )
        right = (
            f"{b['prompt_tokens']:>7} {b['computed_tokens']:>8} "
            f"{_ms(b['ttft_s']):>9} {_ms(b['e2el_s']):>9}"
            if b
            else ""
        )
        lines.append(f"{i:>4} | {left} | {right}")
    for name, run in (("cached", cached), ("uncached", uncached)):
        s = run["summary"]
        where = run.get("base_url") or "-"
        lines.append(
            f"{name:8s} TTFT first {_ms(s['ttft_first_s'])} ms ({s['first_context_tokens']} "
            f"tokens), last {_ms(s['ttft_last_s'])} ms ({s['last_context_tokens']} tokens): "
            f"last/first {_x(s['ttft_last_over_first'])}; {s['num_turns']} turns, "
            f"{s['failed']} failed, server {where}"
        )
        if run.get("error"):
            lines.append(f"{name:8s} error: {run['error'].splitlines()[0]}")
    c = report["comparison"]
    lines.append(
        f"last turn ({c['last_common_turn']}): uncached/cached TTFT "
        f"{_x(c['uncached_over_cached_last_ttft'])}"
    )
    if not c["same_prompts"]:
        lines.append(
            f"NOTE: the runs' prompts differ from turn {c['first_differing_turn']} "
            "(the replies were not the same) or they ran different numbers of turns"
        )
    if uncached["turns"] and uncached["summary"]["caching_observed"]:
        lines.append("NOTE: the 'uncached' server reported cached tokens: is caching off there?")
    if cached["turns"] and not cached["summary"]["caching_observed"]:
        lines.append("NOTE: the 'cached' server reported no cached tokens: is caching on there?")
    lines.extend(f"wrote {path}" for path in report["files"].values())
    return "\n".join(lines)


def plot_long_session(runs: dict[str, dict[str, Any]], path: Path, config: Any) -> Path:
    """TTFT per turn against the context length, and the tokens each turn computed."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    styles = {"cached": ("#4C72B0", "prefix caching on"), "uncached": ("#DD8452", "off")}
    for name, record in runs.items():
        ok = [t for t in record["turns"] if t["ok"]]
        color, label = styles[name]
        context = [t["prompt_tokens"] for t in ok]
        top.plot(context, [t["ttft_s"] * 1e3 for t in ok], "o-", color=color, label=label)
        bottom.plot(context, [t["computed_tokens"] for t in ok], "o-", color=color, label=label)
    top.set_ylabel("time to first token (ms)")
    top.set_title(
        f"one conversation to {config.max_context} tokens, +{config.turn_tokens} per turn"
    )
    top.legend(fontsize=8)
    bottom.set_ylabel("prompt tokens computed (not cached)")
    bottom.set_xlabel("context length of the turn (prompt tokens)")
    bottom.legend(fontsize=8)
    return save_figure(fig, path)
