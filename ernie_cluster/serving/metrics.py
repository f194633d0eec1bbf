"""Prometheus metrics of the HTTP layer (per request) and of the engines behind it (read at
scrape time). One registry per app so several apps in a process never collide.

`ernie_requests_total{status}` counts every generation request once: a request that reached
a handler is counted by its RequestTracker when it ends (streams included); one refused
before that (bad body, unknown model, missing key) by `RequestCounter`, the ASGI middleware
in front of the app, from its HTTP status. Engine series are rebuilt from the replicas' latest
stats at each scrape: gauges, and counters for the cumulative `_total` series.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ernie_cluster.outputs import RequestOutput
from ernie_cluster.serving.errors import OpenAIError

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
ENGINE_GAUGES = {
    "num_running": ("ernie_num_requests_running", "Requests in the running batch"),
    "num_waiting": ("ernie_num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_cache_usage": ("ernie_kv_cache_usage_ratio", "Fraction of KV cache blocks in use"),
    "kv_blocks_used": ("ernie_kv_cache_blocks_used", "KV cache blocks in use"),
    "kv_blocks_total": ("ernie_kv_cache_blocks_capacity", "KV cache blocks in the pool"),
    "prefix_cache_hit_rate": (
        "ernie_prefix_cache_hit_rate",
        "Prefix-cache hits / queries (tokens)",
    ),
    "expert_load_imbalance": (
        "ernie_expert_load_imbalance",
        "max/mean tokens per expert, worst layer",
    ),
    "host_kv_blocks_used": ("ernie_host_kv_blocks_used", "Host KV tier blocks holding a prefix"),
    "host_kv_blocks_total": ("ernie_host_kv_blocks_capacity", "Host KV tier blocks (0: off)"),
    "weight_bytes_per_rank": (
        "ernie_weight_bytes_per_rank",
        "Weight bytes on the fullest shard worker (quantized weights as held)",
    ),
    "spec_decode_acceptance_rate": (
        "ernie_spec_decode_acceptance_rate",
        "Speculative decoding: accepted / proposed tokens so far",
    ),
    "spec_decode_mean_accepted_length": (
        "ernie_spec_decode_mean_accepted_length",
        "Speculative decoding: tokens a verifying sequence gains per step (1 + accepted)",
    ),
}
ENGINE_COUNTERS = {  # exposed with the `_total` suffix
    "num_preemptions": ("ernie_num_preemptions", "Requests preempted so far"),
    "num_prompt_tokens": ("ernie_prompt_tokens", "Prompt tokens received"),
    "num_generated_tokens": ("ernie_generation_tokens", "Tokens generated"),
    "prefix_cache_queries": ("ernie_prefix_cache_queries", "Prompt tokens looked up"),
    "prefix_cache_hits": ("ernie_prefix_cache_hits", "Prompt tokens found in the prefix cache"),
    "host_kv_hit_tokens": (
        "ernie_host_kv_hit_tokens",
        "Prompt tokens copied back from the host KV tier instead of recomputed",
    ),
    "host_kv_swapped_in_tokens": (
        "ernie_host_kv_swapped_in_tokens",
        "Host-tier hit tokens of preempted requests (swap instead of recompute)",
    ),
    "host_kv_blocks_saved": ("ernie_host_kv_blocks_saved", "KV blocks written to the host"),
    "host_kv_blocks_loaded": ("ernie_host_kv_blocks_loaded", "KV blocks copied back"),
    "host_kv_blocks_dropped": (
        "ernie_host_kv_blocks_dropped",
        "Host KV blocks evicted or not written for lack of room",
    ),
    "host_kv_bytes_moved": ("ernie_host_kv_bytes_moved", "Bytes copied device<->host, all ranks"),
    "host_kv_load_wait_s": (
        "ernie_host_kv_load_wait_seconds",
        "Seconds requests waited for host KV blocks to come back",
    ),
    "spec_decode_num_drafts": (
        "ernie_spec_decode_num_drafts",
        "Speculative decoding: sequence-steps that verified proposals",
    ),
    "spec_decode_num_draft_tokens": (
        "ernie_spec_decode_num_draft_tokens",
        "Speculative decoding: proposed tokens verified",
    ),
    "spec_decode_num_accepted_tokens": (
        "ernie_spec_decode_num_accepted_tokens",
        "Speculative decoding: proposed tokens accepted",
    ),
}
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
STATUS_LABELS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    408: "timeout",
    413: "too_large",
    431: "too_large",
    499: "aborted",
    503: "unavailable",
}


def status_label(error: BaseException | None) -> str:
    if error is None:
        return "success"
    if isinstance(error, OpenAIError):
        return http_status_label(error.status_code)
    if isinstance(error, (GeneratorExit,)) or type(error).__name__ == "CancelledError":
        return "aborted"
    return "error"


def http_status_label(status: int) -> str:
    return STATUS_LABELS.get(status, "error")


class _Counted:
    """Set by a RequestTracker on the request it belongs to: the middleware then leaves the
    count to the tracker (which also sees how a stream ended)."""

    is_counted = False


_current_request: contextvars.ContextVar[_Counted | None] = contextvars.ContextVar(
    "ernie_current_request", default=None
)


class RequestTracker:
    """Timing of one request as the client sees it (first token, gaps, end)."""

    def __init__(self, metrics: ServingMetrics, num_prompt_tokens: int) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.queue_time: float | None = None
        self.num_cached_tokens = 0
        self.done = False
        request = _current_request.get()
        if request is not None:
            request.is_counted = True

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


class EngineCollector:
    """The engine series of the stats handed to the current scrape (one set per replica)."""

    def __init__(self) -> None:
        self.stats: list[dict[str, Any]] = []

    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(self.stats)

    @staticmethod
    def _families(engine_stats: list[dict[str, Any]]) -> Iterator[Metric]:
        kinds = [(GaugeMetricFamily, ENGINE_GAUGES), (CounterMetricFamily, ENGINE_COUNTERS)]
        for family_cls, table in kinds:
            for key, (name, help_text) in table.items():
                family = family_cls(name, help_text, labels=["replica"])
                for stats in engine_stats:
                    if key in stats:
                        replica = str(stats.get("replica", "local"))
                        family.add_metric([replica], float(stats[key]))
                yield family


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
        self.engine = EngineCollector()
        r.register(self.engine)

    def track(self, request_id: str, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)

    def render(self, engine_stats: list[dict[str, Any]]) -> bytes:
        # NOTE: synchronous from here to the end: concurrent scrapes cannot interleave.
        self.engine.stats = engine_stats
        try:
            return generate_latest(self.registry)
        finally:
            self.engine.stats = []


class RequestCounter:
    """ASGI middleware: counts generation requests that ended before a RequestTracker took
    them (validation errors, unknown model, API key, body limits) by their HTTP status."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        request = _Counted()
        token = _current_request.set(request)
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _current_request.reset(token)
            if not request.is_counted:
                if status is None:  # no answer: the client left, or the app failed
                    label = status_label(error) if error is not None else "aborted"
                    self.metrics.requests.labels(status=label).inc()
                elif status >= 400:
                    self.metrics.requests.labels(status=http_status_label(status)).inc()


def with_request_counter(app, metrics: ServingMetrics):
    """`app` (a FastAPI/Starlette app) counting the generation requests it refuses before a
    handler takes them; call before the app serves its first request."""
    app.add_middleware(RequestCounter, metrics=metrics)
    return app
