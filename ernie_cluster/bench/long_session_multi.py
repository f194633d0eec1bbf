"""`ernie-cluster bench long-session --sessions N`: N conversations grown round-robin on a
device KV pool they overflow, against a server with the host KV tier and one without.

Each session has its own system prompt (so sessions share no cache block) and the same
user messages; replies are greedy and carried forward, one request at a time. By the time a
session returns, the others have pushed its blocks out of the device pool: the tier-on
server copies them back from host memory, the tier-off server recomputes them. Right after
each returning turn a sibling is sent: the same history with another user message of the same
length, so its prefix is on the device and it computes as many new tokens as the turn did;
its TTFT is a device-pool hit at the same context, measured in the same run (the tier-on run
only: the baseline needs measuring once). The tier-on server's
host-tier counters are read from its /metrics at the end. Owns the runs and their records;
the summary and table are `long_session_report`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from ernie_cluster.bench.client import send_request
from ernie_cluster.bench.datasets import BenchRequest, Conversation, Reply
from ernie_cluster.bench.long_session import reply_of, request_settings, turn_record, warm_up
from ernie_cluster.bench.server_process import ServerProcess

logger = logging.getLogger(__name__)

MULTI_RUNS = ("tier-on", "tier-off")
HOST_TIER_SERIES = (
    "ernie_host_kv_blocks_used",
    "ernie_host_kv_blocks_capacity",
    "ernie_host_kv_hit_tokens_total",
    "ernie_host_kv_blocks_saved_total",
    "ernie_host_kv_blocks_loaded_total",
    "ernie_host_kv_blocks_dropped_total",
    "ernie_host_kv_bytes_moved_total",
    "ernie_host_kv_load_wait_seconds_total",
)


def multi_server_args(base_args: list[str], config: Any, run: str) -> list[str]:
    """The runs' servers differ only in the host tier."""
    if run == "tier-on":
        return [*base_args, "--kv-offload-gb", str(config.kv_offload_gb)]
    return list(base_args)


def conversations(script: Any, config: Any, run: str) -> list[Conversation]:
    return [
        Conversation(
            session_id=f"long-session-{run}-{i}",
            # NOTE: the session index leads, so the sessions' chains differ from block 0.
            system_prompt=f"session {i}: {script.system_prompt}",
            user_messages=script.user_messages,
            max_tokens=config.output_len,
            max_context_tokens=config.max_context,
            user_message_tokens=script.user_message_tokens,
        )
        for i in range(config.sessions)
    ]


def sibling(request: BenchRequest, user_messages: list[str]) -> BenchRequest:
    """The request with its last user message swapped for another one of the script's."""
    other = user_messages[(request.turn + len(user_messages) // 2) % len(user_messages)]
    messages = [*request.messages[:-1], {"role": "user", "content": other}]
    return dataclasses.replace(request, messages=messages)


async def read_host_tier(http: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """The host-tier series of the server's /metrics (summed over replicas)."""
    text = (await http.get(f"{base_url}/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in HOST_TIER_SERIES:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


async def drive_sessions(script: Any, config: Any, run: str, base_url: str) -> dict[str, Any]:
    """Warm up, then one turn per session in turn until every conversation has ended."""
    settings = request_settings(config, base_url)
    sessions = conversations(script, config, run)
    previous: list[Reply | None] = [None] * len(sessions)
    active = list(range(len(sessions)))
    turns: list[dict[str, Any]] = []
    bar = tqdm(unit="turn", desc=f"{run:8s}", disable=not config.progress)
    async with httpx.AsyncClient(timeout=config.timeout_s) as http:
        try:
            warmup_ttft = await warm_up(http, script, settings)
            while active:
                for index in list(active):
                    request = sessions[index].next_request(previous[index])
                    if request is None:
                        active.remove(index)
                        continue
                    result = await send_request(http, request, settings, 0.0)
                    record = {"session": index, **turn_record(request, result)}
                    if result.ok and request.turn > 0 and run == "tier-on":
                        # Its history is on the device now: a device-pool hit, same work.
                        hit = sibling(request, script.user_messages)
                        again = await send_request(http, hit, settings, 0.0)
                        record["device_hit_ttft_s"] = again.ttft if again.ok else None
                        record["device_hit_cached_tokens"] = again.cached_tokens
                    turns.append(record)
                    bar.update(1)
                    bar.set_postfix(session=index, context=result.prompt_tokens)
                    previous[index] = reply_of(result)
            host_tier = await read_host_tier(http, base_url)
        finally:
            bar.close()
    return {
        "base_url": base_url,
        "model": settings.model,
        "warmup_ttft_s": warmup_ttft,
        "turns": turns,
        "host_tier": host_tier,
    }


def run_multi(script: Any, config: Any, base_args: list[str]) -> dict[str, Any]:
    """Both runs on spawned servers, one after the other; per-run records."""
    runs: dict[str, dict[str, Any]] = {}
    for run in MULTI_RUNS:
        args = multi_server_args(base_args, config, run)
        record: dict[str, Any] = {"spawned": True, "server_args": args, "turns": []}
        try:
            with ServerProcess(args, start_timeout_s=config.startup_timeout_s) as server:
                record.update(asyncio.run(drive_sessions(script, config, run, server.base_url)))
        except (RuntimeError, ValueError, httpx.HTTPError) as exc:
            logger.error("%s run: %s", run, exc)
            record["error"] = f"{type(exc).__name__}: {exc}"
        runs[run] = record
    return runs
