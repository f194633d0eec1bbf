"""What the autoscaling load test sees over time: the load it offers (`LoadProfile`), what it
samples while that load runs (`Monitor`: replicas by state, engine queues, client in-flight
requests and recent latencies). The figure is drawn by `plots.plot_autoscale_timeline`.

Observation only: nothing here deploys, scales or sends a request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from ernie_cluster.bench.client import RequestResult
from ernie_cluster.bench.datasets import BenchRequest, Reply, Session
from ernie_cluster.bench.metrics import latency_stats

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- the load
@dataclass
class LoadProfile:
    """Closed-loop users over time: 1 -> `peak_concurrency` over `ramp_up_s`, a hold at the
    peak, down to `tail_concurrency` over `ramp_down_s`, then a tail at that level until the
    replicas are back at the minimum; `end_s` tells the runner when it is over.

    The hold lasts `hold_s` from the moment the deployment reached its most replicas
    (`mark_scaled_up`), so a slow replica start does not eat the time spent at full scale;
    it starts at the end of the ramp-up at the earliest and `scale_up_wait_s` after it at
    the latest (0: a fixed hold right after the ramp-up). The tail keeps a few users sending
    while Serve removes replicas, so a replica's shutdown meets requests in flight; it ends
    at `mark_scaled_down` and lasts `tail_max_s` at most (no tail when either is 0).
    """

    peak_concurrency: int
    ramp_up_s: float
    hold_s: float
    ramp_down_s: float
    scale_up_wait_s: float = 0.0
    tail_concurrency: int = 0
    tail_max_s: float = 0.0
    scaled_up_at_s: float | None = None
    scaled_down_at_s: float | None = None

    def __post_init__(self) -> None:
        if self.peak_concurrency < 1:
            raise ValueError(f"peak concurrency must be >= 1, got {self.peak_concurrency}")
        if not 0 <= self.tail_concurrency <= self.peak_concurrency:
            raise ValueError(
                f"tail concurrency must be in [0, peak {self.peak_concurrency}], "
                f"got {self.tail_concurrency}"
            )
        for name in ("ramp_up_s", "hold_s", "ramp_down_s", "scale_up_wait_s", "tail_max_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def mark_scaled_up(self, t: float) -> None:
        """The deployment reached its most replicas at `t` s (the first call counts)."""
        if self.scaled_up_at_s is None:
            self.scaled_up_at_s = t

    def mark_scaled_down(self, t: float) -> None:
        """The deployment was back at its fewest replicas at `t` s; only a call after the
        ramp-down counts (the first one)."""
        if self.scaled_down_at_s is None and t >= self.ramp_down_end_s:
            self.scaled_down_at_s = t

    @property
    def hold_start_s(self) -> float:
        latest = self.ramp_up_s + self.scale_up_wait_s
        if self.scaled_up_at_s is None:
            return latest  # NOTE: until then the hold is open-ended (up to the latest start)
        return min(max(self.ramp_up_s, self.scaled_up_at_s), latest)

    @property
    def ramp_down_start_s(self) -> float:
        return self.hold_start_s + self.hold_s

    @property
    def ramp_down_end_s(self) -> float:
        return self.ramp_down_start_s + self.ramp_down_s

    @property
    def has_tail(self) -> bool:
        return self.tail_concurrency > 0 and self.tail_max_s > 0

    @property
    def end_s(self) -> float:
        start = self.ramp_down_end_s
        if not self.has_tail:
            return start
        latest = start + self.tail_max_s
        if self.scaled_down_at_s is None:
            return latest
        return min(self.scaled_down_at_s, latest)

    def __call__(self, t: float) -> int:
        if t < 0 or t >= self.end_s:
            return 0
        peak = self.peak_concurrency
        if t < self.ramp_up_s:
            return 1 + math.floor((peak - 1) * t / self.ramp_up_s)
        down = self.ramp_down_start_s
        if t < down:
            return peak
        if t >= self.ramp_down_end_s:
            return self.tail_concurrency
        fraction = (t - down) / self.ramp_down_s
        return max(
            1, self.tail_concurrency, math.ceil(peak - (peak - self.tail_concurrency) * fraction)
        )


def collapse_runs(values: Sequence[int | None]) -> list[int]:
    """[1, 1, 2, 2, None, 2, 1] -> [1, 2, 1]: the distinct steps, unknowns skipped."""
    steps: list[int] = []
    for value in values:
        if value is not None and (not steps or steps[-1] != value):
            steps.append(value)
    return steps


# ------------------------------------------------------------------ client-side counters
@dataclass
class ClientLoad:
    """Requests the load generator has started and finished (fed from the runner's loop)."""

    started: int = 0
    failed: int = 0
    results: list[RequestResult] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.started - len(self.results)

    def on_result(self, result: RequestResult) -> None:
        self.failed += not result.ok
        self.results.append(result)

    def count(self, session: Session) -> Session:
        return _CountedSession(session, self)

    def recent(self, since_s: float) -> list[RequestResult]:
        """Requests that finished at or after `since_s` (results arrive in finishing order)."""
        recent = []
        for result in reversed(self.results):
            if result.end is None or result.end < since_s:
                break
            recent.append(result)
        return recent


@dataclass
class _CountedSession:
    session: Session
    load: ClientLoad

    @property
    def session_id(self) -> str:
        return self.session.session_id

    def next_request(self, previous: Reply | None) -> BenchRequest | None:
        request = self.session.next_request(previous)
        if request is not None:
            self.load.started += 1
        return request


# ---------------------------------------------------------------------------- the samples
@dataclass
class Sample:
    """One look at the system; `t` is seconds since the load started."""

    t: float
    running_replicas: int | None
    starting_replicas: int | None
    stopping_replicas: int | None
    target_replicas: int | None
    target_concurrency: int
    in_flight: int
    finished: int
    failed: int
    engine_waiting: float | None
    engine_running: float | None
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    e2el_p50_ms: float | None
    e2el_p90_ms: float | None


def replica_counts(app: str, deployment: str) -> dict[str, int]:
    """Replicas of `deployment` by state (RUNNING, STARTING, STOPPING, ...) from Serve."""
    from ray import serve

    application = serve.status().applications.get(app)
    if application is None or deployment not in application.deployments:
        return {}
    states = application.deployments[deployment].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def target_replicas(app: str, deployment: str) -> int | None:
    """The autoscaler's current decision, or None when it cannot be read.

    NOTE: serve.status() omits it; the controller's instance details (a private client
    API) carry it, so this is best effort and the test never depends on it.
    """
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        return int(details["applications"][app]["deployments"][deployment]["target_num_replicas"])
    except Exception as exc:
        logger.debug("no target replica count: %s", exc)
        return None


def engine_queues(metrics_text: str) -> tuple[float, float]:
    """(requests waiting, requests running) summed over the replicas in a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"ernie_num_requests_waiting": 0.0, "ernie_num_requests_running": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["ernie_num_requests_waiting"], totals["ernie_num_requests_running"]


class Monitor:
    """Samples every `period_s` on a thread until `stop()`; `on_sample` sees each sample."""

    def __init__(
        self,
        app: str,
        deployment: str,
        metrics_url: str,
        load: ClientLoad,
        profile: LoadProfile,
        t0: float,
        period_s: float = 0.5,
        latency_window_s: float = 5.0,
        headers: dict[str, str] | None = None,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        if not period_s > 0:
            raise ValueError(f"sample period must be > 0 s, got {period_s}")
        self.app, self.deployment = app, deployment
        self.metrics_url = metrics_url
        self.load, self.profile, self.t0 = load, profile, t0
        self.period_s, self.latency_window_s = period_s, latency_window_s
        self.on_sample = on_sample
        self.samples: list[Sample] = []
        self._http = httpx.Client(timeout=max(2.0, 4 * period_s), headers=headers or {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autoscale-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._http.close()

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            try:
                sample = self.sample()
            except Exception as exc:  # one bad look must not end the observation
                logger.warning("autoscale monitor: sample failed: %s", exc)
            else:
                self.samples.append(sample)
                if self.on_sample is not None:
                    self.on_sample(sample)
            self._stop.wait(max(0.0, self.period_s - (time.perf_counter() - began)))

    def sample(self) -> Sample:
        t = time.perf_counter() - self.t0
        try:
            states = replica_counts(self.app, self.deployment)
        except Exception as exc:
            logger.warning("autoscale monitor: serve.status() failed: %s", exc)
            states = None
        waiting = running = None
        try:
            response = self._http.get(self.metrics_url)
            if response.status_code == 200:
                waiting, running = engine_queues(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("autoscale monitor: /metrics failed: %s", exc)
        recent = [r for r in self.load.recent(t - self.latency_window_s) if r.ok]
        ttft = latency_stats([r.ttft for r in recent if r.ttft is not None])
        e2el = latency_stats([e for r in recent if (e := r.e2el) is not None])
        failed = self.load.failed
        return Sample(
            t=round(t, 3),
            running_replicas=None if states is None else states.get("RUNNING", 0),
            starting_replicas=None if states is None else states.get("STARTING", 0),
            stopping_replicas=None if states is None else states.get("STOPPING", 0),
            target_replicas=target_replicas(self.app, self.deployment),
            target_concurrency=self.profile(t),
            in_flight=self.load.in_flight,
            finished=len(self.load.results) - failed,
            failed=failed,
            engine_waiting=waiting,
            engine_running=running,
            ttft_p50_ms=ttft["p50"],
            ttft_p90_ms=ttft["p90"],
            e2el_p50_ms=e2el["p50"],
            e2el_p90_ms=e2el["p90"],
        )
