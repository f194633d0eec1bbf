"""`ernie-cluster bench serve`: load an OpenAI-compatible server and report what it did.

Builds the dataset, runs the load, and writes `<label>.json` (settings, summary, timeline,
optionally every request) plus `<label>_latency.png` and `<label>_throughput.png`; a label an
earlier run in the folder used gets a `-2`, `-3`, ... suffix instead of overwriting it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ernie_cluster.bench.client import RequestSettings, served_model
from ernie_cluster.bench.datasets import JsonlDataset, MultiTurnDataset, RandomDataset, TextSampler
from ernie_cluster.bench.metrics import TIMELINE_BUCKET_S, parse_slos, summarize, timeline
from ernie_cluster.bench.run_files import fresh_label
from ernie_cluster.bench.runner import LoadRun, LoadSpec, run_load

logger = logging.getLogger(__name__)
DATASETS = ("random", "multi-turn", "jsonl")


@dataclass
class ServeBenchConfig:
    base_url: str
    model: str | None = None
    endpoint: str = "chat"  # chat | completions
    dataset: str = "random"
    tokenizer: str | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: int = 256
    output_len: int = 64
    range_ratio: float = 0.0
    turns: int = 4
    system_prompt_len: int = 256
    max_context_tokens: int | None = None
    jsonl_path: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    api_key: str | None = None
    goodput: list[str] = field(default_factory=list)
    seed: int = 0
    timeout_s: float = 600.0
    out_dir: str = "bench-results"
    label: str = "serve_bench"
    plots: bool = True
    save_requests: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "multi-turn" and self.endpoint != "chat":
            raise ValueError("the multi-turn dataset needs the chat endpoint")
        if self.dataset == "jsonl" and not self.jsonl_path:
            raise ValueError("the jsonl dataset needs --jsonl PATH")
        if self.dataset != "jsonl" and self.num_requests is None and self.duration_s is None:
            raise ValueError(
                f"the {self.dataset} dataset is endless: give --num-prompts or --duration"
            )
        for name in ("input_len", "output_len", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_slos(self.goodput)


def load_bench_tokenizer(name: str | None):
    """The tokenizer random prompts are drawn from: a checkpoint directory, a hub repo id, or
    (by default) the built-in demo checkpoint's."""
    from ernie_cluster.loader.checkpoint_files import resolve_model_path
    from ernie_cluster.tokenizer import load_tokenizer

    if name is None:
        from ernie_cluster.checkpoints.demo import demo_checkpoint

        path = demo_checkpoint()
        logger.info("random prompts use the demo checkpoint's tokenizer (pass --tokenizer)")
    else:
        path = resolve_model_path(name, include_weights=False)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{str(path)!r} has no tokenizer.json to draw random prompts from")
    return tokenizer


def build_dataset(config: ServeBenchConfig):
    chat = config.endpoint == "chat"
    if config.dataset == "jsonl":
        return JsonlDataset(
            Path(config.jsonl_path),
            config.output_len,
            chat=chat,
            cycle=config.num_requests is not None or config.duration_s is not None,
        )
    sampler = TextSampler(load_bench_tokenizer(config.tokenizer), random.Random(config.seed))
    if config.dataset == "random":
        return RandomDataset(
            sampler, config.input_len, config.output_len, config.range_ratio, chat=chat
        )
    return MultiTurnDataset(
        sampler,
        num_turns=config.turns,
        system_prompt_len=config.system_prompt_len,
        user_len=config.input_len,
        output_len=config.output_len,
        max_context_tokens=config.max_context_tokens,
        session_prefix=f"bench-{config.seed}-{int(time.time())}",
    )


def run_serve_bench(config: ServeBenchConfig) -> dict[str, Any]:
    """Run the benchmark, write its files, and return the report."""
    slos = parse_slos(config.goodput)
    if config.plots:
        from ernie_cluster.bench.plots import check_plotting

        check_plotting()
    model = config.model or served_model(config.base_url, config.api_key)
    settings = RequestSettings(
        base_url=config.base_url,
        model=model,
        chat=config.endpoint == "chat",
        temperature=config.temperature,
        ignore_eos=config.ignore_eos,
        api_key=config.api_key,
        timeout_s=config.timeout_s,
    )
    spec = LoadSpec(
        request_rate=config.request_rate,
        burstiness=config.burstiness,
        max_concurrency=config.max_concurrency,
        num_requests=config.num_requests,
        duration_s=config.duration_s,
        seed=config.seed,
    )
    sessions = build_dataset(config).sessions()
    run: LoadRun = asyncio.run(run_load(sessions, settings, spec, progress=config.progress))
    rows = timeline(run.results, TIMELINE_BUCKET_S)
    settings_json = {k: v for k, v in asdict(config).items() if k != "api_key"}
    settings_json["model"] = model
    summary = summarize(run.results, run.duration_s, slos)
    report = {
        "settings": _finite(settings_json),
        "started_at": run.started_at,
        "summary": summary,
        "timeline": rows,
    }
    if config.save_requests:
        report["requests"] = [r.to_json() for r in run.results]
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = fresh_label(out, config.label, (".json", "_latency.png", "_throughput.png"))
    files = {"json": out / f"{label}.json"}
    if config.plots:
        from ernie_cluster.bench.plots import plot_latencies, plot_throughput

        title = run_title(config, model, num_sent=len(run.results))
        files["latency_png"] = plot_latencies(
            run.results, summary, out / f"{label}_latency.png", title
        )
        files["throughput_png"] = plot_throughput(
            rows, out / f"{label}_throughput.png", title, TIMELINE_BUCKET_S
        )
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2))
    return report


def run_title(config: ServeBenchConfig, model: str, num_sent: int | None = None) -> str:
    """The figures' title: what was loaded, then the load and the dataset. With `num_sent`
    (after a run) it counts the requests really sent, which a duration may have cut short."""
    load = []
    if math.isinf(config.request_rate):
        load.append(
            f"closed loop of {config.max_concurrency} users"
            if config.max_concurrency
            else "every request at once"
        )
    else:
        arrivals = (
            "Poisson" if config.burstiness == 1 else f"gamma, burstiness {config.burstiness:g}"
        )
        load.append(f"{config.request_rate:g} req/s ({arrivals})")
        if config.max_concurrency:
            load.append(f"at most {config.max_concurrency} in flight")
    if num_sent is not None and num_sent != config.num_requests:
        planned = f" of {config.num_requests}" if config.num_requests is not None else ""
        load.append(f"{num_sent}{planned} requests sent")
    elif config.num_requests is not None:
        load.append(f"{config.num_requests} requests")
    if config.duration_s is not None:
        load.append(f"{config.duration_s:g} s")
    if config.dataset == "random":
        spread = f" ±{config.range_ratio:.0%}" if config.range_ratio else ""
        data = f"random prompts of {config.input_len}{spread} tokens"
    elif config.dataset == "multi-turn":
        data = (
            f"multi-turn: {config.turns} turns, {config.system_prompt_len}-token system "
            f"prompt, {config.input_len}-token user turns"
        )
    else:
        data = f"JSONL {Path(config.jsonl_path or '').name}"
    output = f"{'exactly' if config.ignore_eos else 'up to'} {config.output_len} output tokens"
    return (
        f"{model} @ {config.base_url} ({config.endpoint})\n"
        f"{', '.join(load)}; {data}, {output}, temperature {config.temperature:g}, "
        f"seed {config.seed}"
    )


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an unlimited rate is written as null."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in values.items()}


def describe_goodput(goodput: dict[str, Any], num_sent: int) -> str:
    """'goodput 3.43 req/s: 48 of 56 requests (85.7%) met TTFT <= 500 ms and TPOT <= 50 ms'"""
    slos = " and ".join(
        f"{metric.upper()} <= {limit:g} ms" for metric, limit in goodput["slo_ms"].items()
    )
    return (
        f"goodput {goodput['request_throughput']:.2f} req/s: {goodput['good_requests']} of "
        f"{num_sent} requests ({goodput['fraction']:.1%}) met {slos}"
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in counts.items())


def format_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    failed = f"failed {s['failed']}"
    if s["errors_by_status"]:
        failed += f" (by status {_counts(s['errors_by_status'])})"
    lines = [
        f"requests sent {s['num_requests_sent']}, completed {s['completed']}, {failed}",
        f"duration {s['duration_s']:.2f} s",
        f"request throughput {s['request_throughput']:.2f} req/s, output "
        f"{s['output_throughput']:.1f} tok/s, total {s['total_token_throughput']:.1f} tok/s",
        f"tokens in {s['total_input_tokens']} (cached {s['total_cached_tokens']}), "
        f"out {s['total_output_tokens']}",
    ]
    for key, name in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2el_ms", "E2EL"),
    ):
        st = s[key]
        if st["mean"] is None:
            lines.append(f"{name:5s} (no data)")
            continue
        lines.append(
            f"{name:5s} ms  mean {st['mean']:9.2f}  p50 {st['p50']:9.2f}  "
            f"p90 {st['p90']:9.2f}  p99 {st['p99']:9.2f}"
        )
    if s["goodput"]:
        lines.append(describe_goodput(s["goodput"], s["num_requests_sent"]))
    if len(s["requests_by_replica"]) > 1:
        lines.append(f"requests by replica: {_counts(s['requests_by_replica'])}")
    for error_status, example in s["error_examples"].items():
        lines.append(f"example {error_status} error: {' '.join(example.split())[:200]}")
    lines.extend(f"wrote {path}" for path in report["files"].values())
    return "\n".join(lines)
