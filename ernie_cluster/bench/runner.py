"""Drive sessions against a server: open-loop arrivals at a rate, or closed-loop workers at a
concurrency that may change over time (the autoscaling test ramps it).

A run stops issuing requests at the request budget, at the deadline, or when the dataset
runs out; requests in flight then finish (they are never cut off, so nothing counts as an
error that the server did not cause).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from tqdm.auto import tqdm

from ernie_cluster.bench.arrivals import arrival_gaps
from ernie_cluster.bench.client import RequestResult, RequestSettings, send_request
from ernie_cluster.bench.datasets import Reply, Session

CONTROL_PERIOD_S = 0.1


@dataclass
class LoadSpec:
    """How much load: `request_rate` sessions/s (inf: as fast as `max_concurrency` allows)
    or a `concurrency` schedule (workers in flight as a function of seconds since start)."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    concurrency: Callable[[float], int] | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"number of requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max concurrency must be >= 1, got {self.max_concurrency}")
        if self.concurrency is not None and not math.isinf(self.request_rate):
            raise ValueError("give either a request rate or a concurrency schedule, not both")


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration_s: float
    started_at: float  # wall-clock (time.time()) of t = 0


class _Budget:
    def __init__(self, spec: LoadSpec, t0: float) -> None:
        self.left = spec.num_requests if spec.num_requests is not None else math.inf
        self.deadline = t0 + spec.duration_s if spec.duration_s is not None else math.inf

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True

    @property
    def open(self) -> bool:
        return self.left > 0 and time.perf_counter() < self.deadline


async def run_load(
    sessions: Iterator[Session],
    settings: RequestSettings,
    spec: LoadSpec,
    progress: bool = True,
    on_result: Callable[[RequestResult], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> LoadRun:
    """Run `sessions` until the budget, deadline or data runs out. An endless dataset needs
    `spec.num_requests` or `spec.duration_s` (or a schedule with an end)."""
    results: list[RequestResult] = []
    failed = 0
    bar = tqdm(total=spec.num_requests, unit="req", desc="requests", disable=not progress)
    limit = spec.max_concurrency or spec.num_requests or 1024
    http = httpx.AsyncClient(
        timeout=settings.timeout_s,
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        transport=transport,
    )
    semaphore = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    source = iter(sessions)
    started_at = time.time()
    t0 = time.perf_counter()
    budget = _Budget(spec, t0)

    def next_session() -> Session | None:
        return next(source, None)

    async def drive(session: Session) -> None:
        nonlocal failed
        previous: Reply | None = None
        while budget.open:
            request = session.next_request(previous)
            if request is None or not budget.take():
                return
            if semaphore is None:
                result = await send_request(http, request, settings, t0)
            else:
                async with semaphore:
                    result = await send_request(http, request, settings, t0)
            results.append(result)
            bar.update(1)
            if not result.ok:
                failed += 1
                bar.set_postfix(failed=failed)
            if on_result is not None:
                on_result(result)
            previous = (
                Reply(result.answer, result.prompt_tokens, result.output_tokens)
                if result.ok
                else None
            )

    try:
        if spec.concurrency is not None or math.isinf(spec.request_rate):
            schedule = spec.concurrency or (lambda _t: spec.max_concurrency or 1)
            await _closed_loop(schedule, next_session, drive, budget, t0)
        else:
            await _open_loop(spec, next_session, drive, budget)
    finally:
        bar.close()
        await http.aclose()
    ends = [r.end for r in results if r.end is not None]
    return LoadRun(results, max(ends, default=time.perf_counter() - t0), started_at)


async def _open_loop(spec: LoadSpec, next_session, drive, budget: _Budget) -> None:
    tasks: set[asyncio.Task] = set()
    for gap in arrival_gaps(spec.request_rate, spec.burstiness, spec.seed):
        await asyncio.sleep(gap)
        session = next_session() if budget.open else None
        if session is None:
            break
        task = asyncio.create_task(drive(session))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _closed_loop(schedule, next_session, drive, budget: _Budget, t0: float) -> None:
    """Keep `schedule(t)` workers busy; each drives whole sessions one after another and
    leaves, between sessions, when there are more workers than the schedule wants."""
    workers: set[asyncio.Task] = set()
    exhausted = False

    async def worker() -> None:
        nonlocal exhausted
        while budget.open and not exhausted:
            if len(workers) > max(0, schedule(time.perf_counter() - t0)):
                return
            session = next_session()
            if session is None:
                exhausted = True
                return
            await drive(session)

    while budget.open and not exhausted:
        wanted = max(0, schedule(time.perf_counter() - t0))
        while len(workers) < wanted:
            task = asyncio.create_task(worker())
            workers.add(task)
            task.add_done_callback(workers.discard)
        await asyncio.sleep(CONTROL_PERIOD_S)
        if not workers and wanted == 0 and schedule_done(schedule, t0):
            break
    if workers:
        await asyncio.gather(*workers)


def schedule_done(schedule, t0: float) -> bool:
    """A schedule may say it is over by exposing `end_s`; plain callables run to the budget."""
    end = getattr(schedule, "end_s", None)
    return end is not None and time.perf_counter() - t0 >= end
