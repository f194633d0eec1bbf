"""Figures of a load run from its per-request results: throughput, latency percentiles,
goodput under service-level objectives, errors by status and throughput over time."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ernie_cluster.bench.client import RequestResult

PERCENTILES = (50, 90, 99)
# metric name -> what it measures; milliseconds in the report
SLO_METRICS = {"ttft": "time to first token", "tpot": "time per output token", "e2el": "latency"}


def latency_stats(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, min, max and p50/p90/p99 in milliseconds (None when there are no values)."""
    keys = ["mean", "min", "max", *(f"p{p}" for p in PERCENTILES)]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats = {"mean": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max())}
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(ms, p))
    return stats


@dataclass(frozen=True)
class Slo:
    metric: str
    limit_ms: float


def parse_slos(specs: Sequence[str]) -> list[Slo]:
    """'ttft:500 tpot:50' -> SLOs; limits in milliseconds."""
    slos = []
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"goodput SLO {spec!r} must look like METRIC:MS with METRIC one of "
                f"{sorted(SLO_METRICS)}"
            )
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {spec!r}: {value!r} is not a number") from None
        if not limit > 0:
            raise ValueError(f"goodput SLO {spec!r}: the limit must be > 0 ms, got {limit}")
        slos.append(Slo(name, limit))
    return slos


def meets(result: RequestResult, slos: Sequence[Slo]) -> bool:
    if not result.ok:
        return False
    for slo in slos:
        value = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.e2el}[slo.metric]
        # NOTE: a one-token answer has no TPOT; it cannot break a TPOT objective.
        if value is not None and value * 1e3 > slo.limit_ms:
            return False
    return True


LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def latency_series(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """The samples (seconds) behind each latency figure of the report, keyed like the
    summary: TTFT, TPOT and end-to-end latency per finished request, ITL per token gap."""
    ok = [r for r in results if r.ok]
    return {
        "ttft_ms": [r.ttft for r in ok if r.ttft is not None],
        "tpot_ms": [t for r in ok if (t := r.tpot) is not None],
        "itl_ms": [gap for r in ok for gap in r.itls],
        "e2el_ms": [e for r in ok if (e := r.e2el) is not None],
    }


TIMELINE_BUCKET_S = 1.0


def timeline(
    results: Sequence[RequestResult], bucket_s: float = TIMELINE_BUCKET_S
) -> list[dict[str, Any]]:
    """Per time bucket: requests started and finished, output tokens finished, in flight."""
    ends = [r.end for r in results if r.end is not None]
    if not ends:
        return []
    buckets = math.ceil(max(ends) / bucket_s) or 1
    rows = [
        {"t": round(i * bucket_s, 6), "started": 0, "finished": 0, "failed": 0, "output_tokens": 0}
        for i in range(buckets)
    ]
    for r in results:
        rows[min(buckets - 1, int(r.start / bucket_s))]["started"] += 1
        if r.end is None:
            continue
        row = rows[min(buckets - 1, int(r.end / bucket_s))]
        if r.ok:
            row["finished"] += 1
            row["output_tokens"] += r.output_tokens
        else:
            row["failed"] += 1
    for i, row in enumerate(rows):
        middle = (i + 0.5) * bucket_s
        row["in_flight"] = sum(
            1 for r in results if r.start <= middle and (r.end is None or r.end > middle)
        )
        row["output_tokens_per_s"] = row["output_tokens"] / bucket_s
    return rows


def summarize(
    results: Sequence[RequestResult], duration_s: float, slos: Sequence[Slo] = ()
) -> dict[str, Any]:
    """The report's figures. Throughputs count finished requests over the run's wall time."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    errors = Counter(r.status for r in failed)
    summary: dict[str, Any] = {
        "duration_s": duration_s,
        "num_requests_sent": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "errors_by_status": dict(sorted(errors.items())),
        "error_examples": {
            status: next(r.error for r in failed if r.status == status) for status in errors
        },
        "total_input_tokens": input_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **{key: latency_stats(values) for key, values in latency_series(results).items()},
        "requests_by_replica": dict(sorted(Counter(r.replica or "?" for r in ok).items())),
        "goodput": None,
    }
    if slos:
        good = sum(1 for r in results if meets(r, slos))
        summary["goodput"] = {
            "slo_ms": {slo.metric: slo.limit_ms for slo in slos},
            "good_requests": good,
            "request_throughput": good / duration,
            "fraction": good / len(results) if results else 0.0,
        }
    return summary
