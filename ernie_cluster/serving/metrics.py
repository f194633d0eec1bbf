"""Prometheus metrics of the HTTP layer (per request) and of the engines behind it (gauges
read at scrape time). One registry per app so several apps in a process never collide."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving.errors import OpenAIError

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
ENGINE_GAUGES = {
    "num_running": ("ernie_num_requests_running", "Requests in the running batch"),
    "num_waiting": ("ernie_num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_cache_usage": ("ernie_kv_cache_usage_ratio", "Fraction of KV cache blocks in use"),
    "prefix_cache_hit_rate": (
        "ernie_prefix_cache_hit_rate",
        "Prefix-cache hits / queries (tokens)",
    ),
    "num_preemptions": ("ernie_num_preemptions_total", "Requests preempted so far"),
    "num_prompt_tokens": ("ernie_prompt_tokens_total", "Prompt tokens received"),
    "num_generated_tokens": ("ernie_generation_tokens_total", "Tokens generated"),
    "expert_load_imbalance": (
        "ernie_expert_load_imbalance",
        "max/mean tokens per expert, worst layer",
    ),
}


def status_label(error: BaseException | None) -> str:
    if error is None:
        return "success"
    if isinstance(error, OpenAIError):
        return {400: "bad_request", 401: "unauthorized", 404: "not_found", 503: "unavailable"}.get(
            error.status_code, "error"
        )
    if isinstance(error, (GeneratorExit,)) or type(error).__name__ == "CancelledError":
        return "aborted"
    return "error"


class RequestTracker:
    """Timing of one request as the client sees it (first token, gaps, end)."""

    def __init__(self, metrics: ServingMetrics, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.queue_time: float | None = None
        self.num_cached_tokens = 0
        self.done = False

    def on_output(self, output: RequestOutput) -> None:
        self.num_cached_tokens = output.num_cached_tokens
        if not any(sample.token_ids for sample in output.outputs):
            return
        now = time.monotonic()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last_token)
        self.last_token = now
        if output.metrics is not None and output.metrics.queue_time is not None:
            self.queue_time = output.metrics.queue_time

    def finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(status=status_label(error)).inc()
        if error is None:
            self.metrics.e2e.observe(time.monotonic() - self.start)
            if self.queue_time is not None:
                self.metrics.queue.observe(self.queue_time)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ernie_requests", "Finished HTTP generation requests", ["status"], registry=r
        )

        def latency(name: str, help_text: str) -> Histogram:
            return Histogram(name, help_text, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = latency("ernie_time_to_first_token_seconds", "Time to first token")
        self.itl = latency("ernie_inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = latency("ernie_e2e_request_latency_seconds", "Request latency")
        self.queue = latency("ernie_request_queue_time_seconds", "Time waiting for a batch slot")
        self.engine = {
            key: Gauge(name, help_text, ["replica"], registry=r)
            for key, (name, help_text) in ENGINE_GAUGES.items()
        }

    def track(self, request_id: str, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def render(self, engine_stats: list[dict[str, Any]]) -> bytes:
        for gauge in self.engine.values():
            gauge.clear()
        for stats in engine_stats:
            replica = str(stats.get("replica", "local"))
            for key, gauge in self.engine.items():
                if key in stats:
                    gauge.labels(replica=replica).set(float(stats[key]))
        return generate_latest(self.registry)
