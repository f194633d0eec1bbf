"""`ernie-cluster bench serve`: load an OpenAI-compatible server and report what it did.

Builds the dataset, runs the load, and writes `<label>.json` (settings, summary, timeline,
optionally every request) plus `<label>_latency.png` and `<label>_throughput.png`.
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
from ernie_cluster.bench.metrics import parse_slos, summarize, timeline
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
    rows = timeline(run.results)
    settings_json = {k: v for k, v in asdict(config).items() if k != "api_key"}
    settings_json["model"] = model
    report = {
        "settings": _finite(settings_json),
        "started_at": run.started_at,
        "summary": summarize(run.results, run.duration_s, slos),
        "timeline": rows,
    }
    if config.save_requests:
        report["requests"] = [r.to_json() for r in run.results]
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / f"{config.label}.json"}
    if config.plots:
        from ernie_cluster.bench.plots import plot_latencies, plot_throughput

        title = f"{model} @ {config.base_url}: {config.dataset}"
        files["latency_png"] = plot_latencies(
            run.results, out / f"{config.label}_latency.png", title
        )
        files["throughput_png"] = plot_throughput(
            rows, out / f"{config.label}_throughput.png", title
        )
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2))
    return report


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an unlimited rate is written as null."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in values.items()}


def format_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"requests sent {s['num_requests_sent']}, completed {s['completed']}, "
        f"failed {s['failed']} {s['errors_by_status'] or ''}",
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
        g = s["goodput"]
        lines.append(
            f"goodput {g['request_throughput']:.2f} req/s ({g['good_requests']} requests "
            f"within {g['slo_ms']} ms)"
        )
    if len(s["requests_by_replica"]) > 1:
        lines.append(f"requests by replica {s['requests_by_replica']}")
    lines.extend(f"wrote {path}" for path in report["files"].values())
    return "\n".join(lines)
