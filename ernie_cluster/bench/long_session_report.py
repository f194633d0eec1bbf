"""The long-session benchmark's report: per-run summaries, the cached-versus-uncached
comparison (or, with --sessions N, the returning-turn TTFT with the host KV tier on, off and
on a device-pool hit at a few context sizes), the printed table and the figure.

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


def _median(values: list[float | None]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def returning_turns(turns: list[dict[str, Any]], bucket: int) -> list[dict[str, Any]]:
    """Per session, its last returning turn with a context in (bucket / 2, bucket]."""
    last: dict[int, dict[str, Any]] = {}
    for turn in turns:
        if turn["ok"] and turn["turn"] > 0 and bucket // 2 < turn["prompt_tokens"] <= bucket:
            last[turn["session"]] = turn
    return list(last.values())


def summarize_sessions(runs: dict[str, dict[str, Any]], max_context: int) -> dict[str, Any]:
    """Median returning-turn TTFT per context bucket (max_context / 4, / 2, / 1) over the
    sessions, tier on vs off vs a device-pool hit, and what the host tier held and moved."""
    summarized = {name: summarize_run(record) for name, record in runs.items()}
    rows = []
    for bucket in (max_context // 4, max_context // 2, max_context):
        on = returning_turns(runs["tier-on"]["turns"], bucket)
        off = returning_turns(runs["tier-off"]["turns"], bucket)
        row = {
            "bucket": bucket,
            "sessions": len(on),
            "context_tokens": _median([t["prompt_tokens"] for t in on]),
            "cached_tokens_tier_on": _median([t["cached_tokens"] for t in on]),
            "cached_tokens_tier_off": _median([t["cached_tokens"] for t in off]),
            "ttft_tier_off_s": _median([t["ttft_s"] for t in off]),
            "ttft_tier_on_s": _median([t["ttft_s"] for t in on]),
            "ttft_device_hit_s": _median([t.get("device_hit_ttft_s") for t in on]),
        }
        row["off_over_on"] = _ratio(row["ttft_tier_off_s"], row["ttft_tier_on_s"])
        row["on_over_device_hit"] = _ratio(row["ttft_tier_on_s"], row["ttft_device_hit_s"])
        rows.append(row)
    host = runs["tier-on"].get("host_tier", {})
    moved = host.get("ernie_host_kv_blocks_saved_total", 0) + host.get(
        "ernie_host_kv_blocks_loaded_total", 0
    )
    block_bytes = host.get("ernie_host_kv_bytes_moved_total", 0) / moved if moved else None
    used = host.get("ernie_host_kv_blocks_used", 0)
    return {
        "runs": summarized,
        "buckets": rows,
        "host_tier": {
            **host,
            "blocks_moved": moved,
            "block_bytes": block_bytes,
            "host_bytes_used": used * block_bytes if block_bytes else 0,
        },
        "failed": sum(r["summary"]["failed"] for r in summarized.values()),
    }


def format_sessions_report(report: dict[str, Any]) -> str:
    """The per-bucket table (tier off, on, device hit) and the host tier's totals."""
    header = (
        f"{'context':>8} {'sessions':>8} | {'tier off ms':>11} {'tier on ms':>10} "
        f"{'device hit ms':>13} | {'off/on':>7} {'on/hit':>7} | {'cached on':>9} {'off':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in report["buckets"]:
        context = row["context_tokens"] if row["context_tokens"] is not None else "-"
        lines.append(
            f"{context!s:>8} {row['sessions']:>8} | {_ms(row['ttft_tier_off_s']):>11} "
            f"{_ms(row['ttft_tier_on_s']):>10} {_ms(row['ttft_device_hit_s']):>13} | "
            f"{_x(row['off_over_on']):>7} {_x(row['on_over_device_hit']):>7} | "
            f"{row['cached_tokens_tier_on']!s:>9} {row['cached_tokens_tier_off']!s:>6}"
        )
    host = report["host_tier"]
    lines.append(
        f"host tier: {host.get('ernie_host_kv_blocks_used', 0):.0f} of "
        f"{host.get('ernie_host_kv_blocks_capacity', 0):.0f} blocks used "
        f"({host['host_bytes_used'] / 2**20:.1f} MiB), {host['blocks_moved']:.0f} blocks moved "
        f"({host.get('ernie_host_kv_blocks_saved_total', 0):.0f} saved, "
        f"{host.get('ernie_host_kv_blocks_loaded_total', 0):.0f} loaded), "
        f"{host.get('ernie_host_kv_hit_tokens_total', 0):.0f} tokens served from the host"
    )
    for name, run in report["runs"].items():
        if run.get("error"):
            lines.append(f"{name:8s} error: {run['error'].splitlines()[0]}")
    lines.extend(f"wrote {path}" for path in report["files"].values())
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The per-turn table (both runs side by side) and the summary lines."""
    if "buckets" in report:
        return format_sessions_report(report)
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


def plot_sessions(runs: dict[str, dict[str, Any]], path: Path, config: Any) -> Path:
    """Returning-turn TTFT against the context: tier off, tier on, device-pool hit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    on = [t for t in runs["tier-on"]["turns"] if t["ok"] and t["turn"] > 0]
    off = [t for t in runs["tier-off"]["turns"] if t["ok"] and t["turn"] > 0]
    for turns, key, style, label in (
        (off, "ttft_s", "s", "host tier off (recompute)"),
        (on, "ttft_s", "o", "host tier on (copy back)"),
        (on, "device_hit_ttft_s", "^", "device-pool hit"),
    ):
        points = [(t["prompt_tokens"], t.get(key)) for t in turns if t.get(key) is not None]
        ax.plot([c for c, _ in points], [v * 1e3 for _, v in points], style, label=label)
    ax.set_xlabel("context length of the returning turn (prompt tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"{config.sessions} sessions round-robin to {config.max_context} tokens")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
