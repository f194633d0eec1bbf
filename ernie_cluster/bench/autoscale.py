"""`ernie-cluster bench autoscale`: the autoscaling load test.

Ramps closed-loop load up to a peak, holds it, ramps it down, and watches the model
deployment's replicas, the engine queues and the latencies the whole time; then checks that
Serve added replicas under load, removed them afterwards, and that no request failed. Writes
`<label>.json` (settings, checks, samples, summary) and `<label>_timeline.png`.

Deploy mode starts the app itself (and Serve, and Ray, when they are not running yet) and
deletes it afterwards; attach mode (`base_url` given) only loads and watches an app that is
already running, e.g. the Helm chart's RayService. It never changes a deployment it attached to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ernie_cluster.bench.autoscale_target import Target, serve_target, wait_for_replicas
from ernie_cluster.bench.autoscale_timeline import (
    ClientLoad,
    LoadProfile,
    Monitor,
    Sample,
    collapse_runs,
)
from ernie_cluster.bench.client import RequestSettings, auth_headers, served_model
from ernie_cluster.bench.datasets import RandomDataset, TextSampler
from ernie_cluster.bench.metrics import summarize
from ernie_cluster.bench.run_files import fresh_label
from ernie_cluster.bench.runner import LoadSpec, run_load
from ernie_cluster.bench.serve_bench import load_bench_tokenizer

logger = logging.getLogger(__name__)

DEPLOY_APP_NAME = "ernie-autoscale"
ATTACH_APP_NAME = "ernie"  # the Helm chart's application


@dataclass
class AutoscaleTestConfig:
    """The test's knobs. The defaults are the CPU-sized setup (tiny checkpoint, 1 -> 2 -> 1
    replicas in about two minutes); docs/autoscaling-load-test.md has GPU-cluster values."""

    # What deploy mode serves (attach mode: `model` only names the prompts' tokenizer).
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    tensor_parallel_size: int = 1
    single_hop: bool = False
    # Serve's autoscaling_config of the model deployment (deploy mode; attach mode reads the
    # live bounds when it can and otherwise checks against these).
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    look_back_period_s: float = 5.0
    metrics_interval_s: float = 1.0
    # The load: closed-loop users, random prompts.
    peak_concurrency: int = 8
    ramp_up_s: float = 10.0
    hold_s: float = 20.0
    ramp_down_s: float = 10.0
    scale_up_wait_s: float = 90.0
    tail_concurrency: int = 1
    cool_down_s: float = 120.0
    input_len: int = 32
    output_len: int = 16
    ignore_eos: bool = True
    tokenizer: str | None = None
    seed: int = 0
    timeout_s: float = 300.0
    # Observation.
    sample_period_s: float = 0.5
    latency_window_s: float = 5.0
    # Where: deploy mode by default; a base URL switches to attach mode.
    ray_address: str | None = None
    app_name: str | None = None
    base_url: str | None = None
    deployment: str | None = None
    port: int | None = None
    api_key: str | None = None
    # Report.
    out_dir: str = "bench-results"
    label: str = "autoscale"
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} and "
                f"{self.max_replicas} (the test checks a scale-up from the minimum and back)"
            )
        if self.peak_concurrency <= self.target_ongoing_requests * self.min_replicas:
            raise ValueError(
                f"peak concurrency {self.peak_concurrency} never exceeds target_ongoing_requests "
                f"{self.target_ongoing_requests} x min_replicas {self.min_replicas}: Serve "
                "would never scale up"
            )
        for name in ("input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cool_down_s", "sample_period_s", "latency_window_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # LoadProfile checks the shape's own numbers.
        self.profile()

    @property
    def mode(self) -> str:
        return "attach" if self.base_url else "deploy"

    @property
    def app(self) -> str:
        return self.app_name or (ATTACH_APP_NAME if self.mode == "attach" else DEPLOY_APP_NAME)

    def profile(self) -> LoadProfile:
        return LoadProfile(
            self.peak_concurrency,
            self.ramp_up_s,
            self.hold_s,
            self.ramp_down_s,
            self.scale_up_wait_s,
            self.tail_concurrency,
            tail_max_s=self.cool_down_s,
        )

    def serve_app_config(self):
        from ernie_cluster.serving.ray_serve.config import AutoscalingConfig, ServeAppConfig

        return ServeAppConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            tensor_parallel_size=self.tensor_parallel_size,
            single_hop=self.single_hop,
            autoscaling=AutoscalingConfig(
                min_replicas=self.min_replicas,
                max_replicas=self.max_replicas,
                target_ongoing_requests=self.target_ongoing_requests,
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
                look_back_period_s=self.look_back_period_s,
                metrics_interval_s=self.metrics_interval_s,
            ),
        )


# --------------------------------------------------------------------------------- the run
def run_autoscale_test(config: AutoscaleTestConfig) -> dict[str, Any]:
    """Run the test, write its JSON (and PNG), and return the report."""
    # Fail on a bad tokenizer before anything is deployed.
    tokenizer = load_bench_tokenizer(config.tokenizer or config.model)
    if config.plots:
        from ernie_cluster.bench.plots import check_plotting

        check_plotting()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with serve_target(config) as target:
        report = _run(config, target, tokenizer)
    label = fresh_label(out, config.label, (".json", "_timeline.png"))
    files = {"json": out / f"{label}.json"}
    if config.plots:
        from ernie_cluster.bench.plots import plot_autoscale_timeline

        title = (
            f"{report['deployment']['app']}/{target.deployment}: {target.min_replicas}.."
            f"{target.max_replicas} replicas, target {config.target_ongoing_requests} "
            f"ongoing, peak {config.peak_concurrency} users"
        )
        files["timeline_png"] = plot_autoscale_timeline(
            report["samples"], report["phases"], out / f"{label}_timeline.png", title
        )
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2))
    return report


def _run(config: AutoscaleTestConfig, target: Target, tokenizer) -> dict[str, Any]:
    model = served_model(target.base_url, config.api_key)
    settings = RequestSettings(
        base_url=target.base_url,
        model=model,
        ignore_eos=config.ignore_eos,
        api_key=config.api_key,
        timeout_s=config.timeout_s,
    )
    started_at_min = wait_for_replicas(
        target, target.min_replicas, config.cool_down_s, config.sample_period_s
    )
    profile = config.profile()
    load = ClientLoad()
    dataset = RandomDataset(
        TextSampler(tokenizer, random.Random(config.seed)), config.input_len, config.output_len
    )
    sessions = (load.count(session) for session in dataset.sessions())

    def on_sample(sample: Sample) -> None:
        if (sample.running_replicas or 0) >= target.max_replicas:
            profile.mark_scaled_up(sample.t)
        if at_min(sample, target.min_replicas):
            profile.mark_scaled_down(sample.t)

    headers = auth_headers(config.api_key)
    t0 = time.perf_counter()
    monitor = Monitor(
        target.app,
        target.deployment,
        f"{target.base_url}/metrics",
        load,
        profile,
        t0,
        period_s=config.sample_period_s,
        latency_window_s=config.latency_window_s,
        headers=headers,
        on_sample=on_sample,
    ).start()
    try:
        run = asyncio.run(
            run_load(
                sessions,
                settings,
                LoadSpec(concurrency=profile),
                progress=config.progress,
                on_result=load.on_result,
            )
        )
        load_end_s = time.perf_counter() - t0
        deadline_s = max(load_end_s, profile.ramp_down_end_s + config.cool_down_s)
        settled = _cool_down(monitor, target.min_replicas, load_end_s, deadline_s - load_end_s)
    finally:
        monitor.stop()
    samples = [asdict(s) for s in monitor.samples]
    summary = summarize(load.results, run.duration_s)
    running = [s["running_replicas"] for s in samples]
    most = max((r for r in running if r is not None), default=0)
    last = next((r for r in reversed(running) if r is not None), None)
    checks = {
        "scaled_up": most > target.min_replicas,
        "scaled_down": last == target.min_replicas,
        "no_failed_requests": summary["num_requests_sent"] > 0
        and summary["failed"] == 0
        and summary["completed"] == summary["num_requests_sent"],
    }
    settings_json = {k: v for k, v in asdict(config).items() if k != "api_key"}
    return {
        "mode": config.mode,
        "settings": settings_json,
        "deployment": {
            "app": target.app,
            "deployment": target.deployment,
            "base_url": target.base_url,
            "model": model,
            "min_replicas": target.min_replicas,
            "max_replicas": target.max_replicas,
        },
        "started_at": run.started_at,
        "passed": all(checks.values()),
        "checks": checks,
        "replica_sequence": collapse_runs(running),
        "max_running_replicas": most,
        "reached_max_replicas": most >= target.max_replicas,
        "started_at_min_replicas": started_at_min,
        "settled_at_min_replicas": settled,
        "phases": {
            "ramp_up_end_s": profile.ramp_up_s,
            "hold_start_s": profile.hold_start_s,
            "hold_end_s": profile.ramp_down_start_s,
            "ramp_down_end_s": profile.ramp_down_end_s,
            "load_end_s": profile.end_s,
            "last_request_end_s": run.duration_s,
            "cool_down_end_s": samples[-1]["t"] if samples else load_end_s,
        },
        "events": scaling_events(samples, target.min_replicas, target.max_replicas),
        "summary": summary,
        "samples": samples,
    }


def at_min(sample: Sample, min_replicas: int) -> bool:
    """Exactly the fewest replicas run and none is starting or stopping."""
    return (
        sample.running_replicas == min_replicas
        and sample.starting_replicas == 0
        and sample.stopping_replicas == 0
    )


def _cool_down(monitor: Monitor, min_replicas: int, load_end_s: float, timeout_s: float) -> bool:
    """Keep watching after the load until a sample shows the replicas back at the minimum or
    `timeout_s` has passed (one sample after the load is always awaited); True if settled."""
    deadline = time.monotonic() + timeout_s + 4 * monitor.period_s
    while time.monotonic() < deadline:
        latest = monitor.latest
        if latest is not None and latest.t > load_end_s and at_min(latest, min_replicas):
            return True
        time.sleep(monitor.period_s / 2)
    return False


def scaling_events(samples: list[dict[str, Any]], low: int, high: int) -> dict[str, float | None]:
    """When the first replica was added, when the most ran, and when they were back at the
    minimum (seconds since the load started; None: it did not happen)."""
    first_up = next((s["t"] for s in samples if (s["running_replicas"] or 0) > low), None)
    at_max = next((s["t"] for s in samples if (s["running_replicas"] or 0) >= high), None)
    back = None
    if first_up is not None:
        back = next(
            (s["t"] for s in samples if s["t"] > first_up and s["running_replicas"] == low), None
        )
    return {"first_scale_up_s": first_up, "reached_max_s": at_max, "back_to_min_s": back}


def format_summary(report: dict[str, Any]) -> str:
    d, s, ev = report["deployment"], report["summary"], report["events"]
    lines = [
        f"{report['mode']}: {d['app']}/{d['deployment']} at {d['base_url']} "
        f"({d['min_replicas']}..{d['max_replicas']} replicas)",
        f"replicas {' -> '.join(map(str, report['replica_sequence'])) or '?'}  "
        f"(up at {_seconds(ev['first_scale_up_s'])}, max at {_seconds(ev['reached_max_s'])}, "
        f"back at {_seconds(ev['back_to_min_s'])}; load ended at "
        f"{report['phases']['load_end_s']:.1f} s)",
        f"requests sent {s['num_requests_sent']}, completed {s['completed']}, "
        f"failed {s['failed']} {s['errors_by_status'] or ''}",
        f"by replica {s['requests_by_replica']}",
    ]
    for key, name in (("ttft_ms", "TTFT"), ("e2el_ms", "E2EL")):
        st = s[key]
        if st["mean"] is not None:
            lines.append(
                f"{name:4s} ms  p50 {st['p50']:9.1f}  p90 {st['p90']:9.1f}  max {st['max']:9.1f}"
            )
    lines.extend(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in report["checks"].items())
    lines.extend(f"wrote {path}" for path in report["files"].values())
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f} s"
