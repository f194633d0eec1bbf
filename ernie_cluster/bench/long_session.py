"""`ernie-cluster bench long-session`: one conversation grown turn by turn toward the context
limit, time to first token per turn, once with prefix caching and once without.

Both runs send the same user messages (one seed) and carry the model's real, greedy replies
forward, one request at a time, so every TTFT is one request's alone. With caching a turn
only computes its own growth; without, it recomputes the whole context. Writes
`long_session.json` and `long_session.png`. Owns the run and the per-turn records; spawned
servers are `server_process`'s, summaries and figures `long_session_report`'s. With
`sessions` > 1 the runs are N round-robin sessions with the host KV tier on and off instead
(`long_session_multi`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from ernie_cluster.bench.client import (
    RequestResult,
    RequestSettings,
    send_request,
    served_model,
)
from ernie_cluster.bench.datasets import BenchRequest, Conversation, Reply, TextSampler
from ernie_cluster.bench.run_files import fresh_label
from ernie_cluster.bench.serve_bench import load_bench_tokenizer
from ernie_cluster.bench.server_process import ServerProcess

logger = logging.getLogger(__name__)

RUNS = ("cached", "uncached")
# NOTE: tokens a turn adds besides the user text and the reply's own tokens: the chat
# template's wrappers around a user and an assistant turn (~16 on ERNIE's template) and
# the reply re-tokenized from text (it may split differently than it was generated).
TEMPLATE_TOKENS_PER_TURN = 32


@dataclass
class LongSessionConfig:
    """One long-session benchmark: two runs (prefix caching on, off) of one conversation."""

    model: str | None = None
    """Checkpoint dir or hub id: what spawned servers load and where the prompt text's
    tokenizer comes from (default: the demo checkpoint)."""
    max_context: int = 32768
    """Context limit: spawned servers get it as --max-model-len; the conversation ends before
    a prompt plus its reply would pass it."""
    turn_tokens: int = 2048
    """User tokens added per turn (the first turn is one such message)."""
    output_len: int = 16
    """max_tokens of every turn (generated in full: EOS is ignored)."""
    max_num_batched_tokens: int | None = None
    """Spawned servers' per-step token budget (default: the server's)."""
    device: str = "cpu"
    dtype: str = "auto"
    server_args: list[str] = field(default_factory=list)
    """More flags for spawned servers, e.g. ['--num-kv-blocks', '4096']."""
    base_url_cached: str | None = None
    """Attach to this running server (prefix caching on) instead of spawning one."""
    base_url_uncached: str | None = None
    """Attach to this running server (started with --no-prefix-caching)."""
    api_key: str | None = None
    sessions: int = 1
    """> 1: that many conversations round-robin, host KV tier on vs off (spawned servers;
    give them a device pool the sessions overflow with --num-kv-blocks in server_args)."""
    kv_offload_gb: float = 4.0
    """The tier-on server's --kv-offload-gb (only with sessions > 1)."""
    seed: int = 0
    timeout_s: float = 1800.0
    startup_timeout_s: float = 600.0
    out_dir: str = "bench-results/long-session"
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_context", "turn_tokens", "output_len", "sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        first_turn = self.turn_tokens + TEMPLATE_TOKENS_PER_TURN + self.output_len
        if 2 * first_turn > self.max_context:
            raise ValueError(
                f"max_context {self.max_context} leaves room for fewer than two turns of "
                f"{self.turn_tokens} user + {self.output_len} output tokens "
                f"(+{TEMPLATE_TOKENS_PER_TURN} template): lower --turn-tokens"
            )
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.sessions > 1 and (self.base_url_cached or self.base_url_uncached):
            raise ValueError(
                f"--sessions {self.sessions} spawns its two servers (host KV tier on, off); "
                "it cannot attach to running ones"
            )
        if self.sessions > 1 and not self.kv_offload_gb > 0:
            raise ValueError(
                f"kv_offload_gb must be > 0 with sessions > 1, got {self.kv_offload_gb}"
            )
        if not (self.timeout_s > 0 and self.startup_timeout_s > 0):
            raise ValueError(
                f"timeouts must be > 0 s, got {self.timeout_s} and {self.startup_timeout_s}"
            )

    def base_url(self, run: str) -> str | None:
        return self.base_url_cached if run == "cached" else self.base_url_uncached


@dataclass
class Script:
    """What both runs send: the system prompt, the user messages and the warm-up request."""

    system_prompt: str
    user_messages: list[str]
    user_message_tokens: int
    warmup: BenchRequest

    def conversation(self, config: LongSessionConfig, run: str) -> Conversation:
        return Conversation(
            session_id=f"long-session-{run}",
            system_prompt=self.system_prompt,
            user_messages=self.user_messages,
            max_tokens=config.output_len,
            max_context_tokens=config.max_context,
            user_message_tokens=self.user_message_tokens,
        )


def build_script(config: LongSessionConfig) -> Script:
    tokenizer = load_bench_tokenizer(config.model)
    sampler = TextSampler(tokenizer, random.Random(config.seed))
    num_messages = math.ceil(config.max_context / config.turn_tokens) + 1
    messages = [sampler.text(config.turn_tokens) for _ in range(num_messages)]
    # NOTE: the growth estimate is what each user turn really costs (its text re-tokenized
    # plus the template), so the conversation stops before the server would refuse a turn.
    longest = max(len(tokenizer.encode(m)) for m in messages)
    # NOTE: a fresh tag per invocation, shared by both runs: an attached server that saw an
    # earlier invocation's conversation must not serve its first turn from the cache.
    system = f"long-session benchmark {secrets.token_hex(4)}"
    warmup = BenchRequest(
        max_tokens=config.output_len,
        messages=[{"role": "user", "content": "warm-up"}],
        session_id="long-session-warmup",
    )
    return Script(system, messages, longest + TEMPLATE_TOKENS_PER_TURN, warmup)


def prompt_digest(request: BenchRequest) -> str:
    data = json.dumps(request.messages, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def turn_record(request: BenchRequest, result: RequestResult) -> dict[str, Any]:
    return {
        "turn": request.turn,
        "ok": result.ok,
        "status": result.status,
        "error": result.error,
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "computed_tokens": result.prompt_tokens - result.cached_tokens,
        "output_tokens": result.output_tokens,
        "ttft_s": result.ttft,
        "e2el_s": result.e2el,
        "prompt_digest": prompt_digest(request),
    }


def request_settings(config: LongSessionConfig, base_url: str) -> RequestSettings:
    """Greedy, EOS ignored, for the model the server serves."""
    return RequestSettings(
        base_url=base_url,
        model=served_model(base_url, config.api_key),
        temperature=0.0,
        ignore_eos=True,
        api_key=config.api_key,
        timeout_s=config.timeout_s,
    )


async def warm_up(http: httpx.AsyncClient, script: Script, settings: RequestSettings) -> float:
    """The warm-up request's TTFT; raises if it failed."""
    warmup = await send_request(http, script.warmup, settings, 0.0)
    if not warmup.ok:
        raise RuntimeError(f"the warm-up request failed: {warmup.status} {warmup.error}")
    return warmup.ttft


def reply_of(result: RequestResult) -> Reply | None:
    """What the next turn carries forward; None ends the conversation."""
    return Reply(result.answer, result.prompt_tokens, result.output_tokens) if result.ok else None


async def drive_conversation(
    script: Script, config: LongSessionConfig, run: str, base_url: str
) -> dict[str, Any]:
    """Warm the server up, then send the conversation's turns one by one until it ends."""
    settings = request_settings(config, base_url)
    conversation = script.conversation(config, run)
    turns: list[dict[str, Any]] = []
    estimate = config.max_context // (script.user_message_tokens + config.output_len)
    bar = tqdm(total=estimate, unit="turn", desc=f"{run:8s}", disable=not config.progress)
    async with httpx.AsyncClient(timeout=config.timeout_s) as http:
        try:
            # NOTE: a fresh server's first request pays one-time costs (allocations, kernel
            # warm-up) that would inflate turn 0's TTFT; the warm-up shares less than one
            # cache block with the conversation, so it gives no turn a cache hit.
            warmup_ttft = await warm_up(http, script, settings)
            previous: Reply | None = None
            while (request := conversation.next_request(previous)) is not None:
                result = await send_request(http, request, settings, 0.0)
                turns.append(turn_record(request, result))
                bar.update(1)
                bar.set_postfix(context=result.prompt_tokens, cached=result.cached_tokens)
                previous = reply_of(result)
        finally:
            bar.close()
    return {
        "base_url": base_url,
        "model": settings.model,
        "warmup_ttft_s": warmup_ttft,
        "turns": turns,
    }


def server_args(config: LongSessionConfig, run: str) -> list[str]:
    """`ernie-cluster serve --no-ray-serve` flags of a spawned server; the runs differ only in
    --no-prefix-caching."""
    args = ["--max-model-len", str(config.max_context), "--device", config.device]
    args += ["--dtype", config.dtype]
    if config.model is not None:
        args += ["--model", config.model]
    if config.max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if run == "uncached":
        args.append("--no-prefix-caching")
    return args + list(config.server_args)


def run_one(script: Script, config: LongSessionConfig, run: str) -> dict[str, Any]:
    """One run against an attached server, or a spawned one that is stopped afterwards."""
    attached = config.base_url(run)
    record: dict[str, Any] = {"base_url": attached, "spawned": attached is None, "turns": []}
    try:
        if attached is not None:
            record.update(asyncio.run(drive_conversation(script, config, run, attached)))
        else:
            args = server_args(config, run)
            record["server_args"] = args
            with ServerProcess(args, start_timeout_s=config.startup_timeout_s) as server:
                record.update(asyncio.run(drive_conversation(script, config, run, server.base_url)))
    except (RuntimeError, ValueError, httpx.HTTPError) as exc:  # no server, or it broke
        logger.error("%s run: %s", run, exc)
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def run_long_session(config: LongSessionConfig) -> dict[str, Any]:
    """Both runs, one after the other (a spawned server has the machine to itself), then
    the report, written as JSON (and a PNG) under `config.out_dir`."""
    from ernie_cluster.bench.long_session_multi import run_multi
    from ernie_cluster.bench.long_session_report import (
        plot_long_session,
        plot_sessions,
        summarize_runs,
        summarize_sessions,
    )
    from ernie_cluster.bench.plots import check_plotting

    if config.plots:
        check_plotting()
    for run in RUNS:  # a wrong URL fails now, not after the other run has taken minutes
        if (url := config.base_url(run)) is not None:
            served_model(url, config.api_key)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    script = build_script(config)
    if config.sessions > 1:
        runs = run_multi(script, config, server_args(config, "cached"))
        summary = summarize_sessions(runs, config.max_context)
    else:
        runs = {run: run_one(script, config, run) for run in RUNS}
        summary = summarize_runs(runs)
    settings = {k: v for k, v in asdict(config).items() if k != "api_key"}
    settings["system_prompt"] = script.system_prompt
    settings["user_message_tokens_max"] = script.user_message_tokens - TEMPLATE_TOKENS_PER_TURN
    report: dict[str, Any] = {"settings": settings, **summary}
    label = fresh_label(out, "long_session", (".json", ".png"))
    files = {"json": out / f"{label}.json"}
    if config.plots:
        plot = plot_sessions if config.sessions > 1 else plot_long_session
        files["png"] = plot(runs, out / f"{label}.png", config)
    report["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(report, indent=2))
    return report
