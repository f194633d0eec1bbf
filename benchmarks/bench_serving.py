"""Serving overhead: time to first token (TTFT) and inter-token latency (ITL) through HTTP
against the same requests on the in-process AsyncLLMEngine, at concurrency 1 and 32, in one
run. Two Ray Serve layouts: the default (proxy -> OpenAIIngress -> LLMServer, session
affinity) and `single_hop` (proxy -> OpenAIServer, the app inside the model replica).

    .venv/bin/python benchmarks/bench_serving.py [--requests 32] [--max-tokens 32]

Uses the `tiny` checkpoint on purpose: the model step is a few milliseconds, so the serving
hops are what the difference shows. Prints medians and p90s and the TTFT added by HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ernie_cluster import SamplingParams
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.distributed.process_group import free_port
from ernie_cluster.engine.async_engine import AsyncLLMEngine
from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1e3:7.2f} ms  p90 {p90 * 1e3:7.2f} ms"


async def in_process(engine: AsyncLLMEngine, prompt: list[int], max_tokens: int, tag: str):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    stamps = []
    async for out in engine.generate(prompt, params, tag):
        if out.outputs and out.outputs[0].token_ids:
            stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)]


async def over_http(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int):
    body = {
        "model": "tiny",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    stamps = []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)]


async def run_level(make_call, concurrency: int, total: int):
    ttfts, itls = [], []
    for start in range(0, total, concurrency):
        results = await asyncio.gather(
            *(make_call(i) for i in range(start, min(total, start + concurrency)))
        )
        for ttft, gaps in results:
            ttfts.append(ttft)
            itls.extend(gaps)
    return ttfts, itls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    args = parser.parse_args()

    import ray
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig

    ckpt = Path(tempfile.mkdtemp()) / "tiny"
    make_tiny_checkpoint(ckpt, "tiny", seed=0)
    prompts = [
        [13 + (i * 7 + j) % 400 for j in range(args.prompt_len)] for i in range(args.requests)
    ]

    config = EngineConfig(model=str(ckpt), dtype="float32", show_progress=False, max_num_seqs=32)
    engine = AsyncLLMEngine.from_config(config)

    async def local_levels():
        out = {}
        await in_process(engine, prompts[0], 4, "warmup")
        for level in (1, 32):
            out[level] = await run_level(
                lambda i, level=level: in_process(
                    engine, prompts[i], args.max_tokens, f"l{level}-{i}"
                ),
                level,
                args.requests,
            )
        await engine.shutdown()
        return out

    local = asyncio.run(local_levels())

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    remote = {}
    for single_hop in (False, True):
        config = ServeAppConfig(
            model=str(ckpt),
            served_model_name=["tiny"],
            dtype="float32",
            max_num_seqs=32,
            single_hop=single_hop,
        )
        serve.run(build_app(config), name="bench", route_prefix="/", blocking=False)
        remote[single_hop] = asyncio.run(
            http_levels(f"http://127.0.0.1:{port}", prompts, args.max_tokens, args.requests)
        )
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    report(args, local, remote)


async def http_levels(url: str, prompts, max_tokens: int, requests: int):
    out = {}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
        await over_http(http, url, prompts[0], 4)
        for level in (1, 32):
            out[level] = await run_level(
                lambda i: over_http(http, url, prompts[i], max_tokens), level, requests
            )
    return out


def report(args, local, remote) -> None:
    print(
        f"tiny checkpoint, {args.requests} requests per level, prompt {args.prompt_len}, "
        f"{args.max_tokens} output tokens, greedy"
    )
    layouts = {False: "HTTP two-hop", True: "HTTP one-hop"}
    for level in (1, 32):
        l_ttft, l_itl = local[level]
        print(f"concurrency {level:2d}  in-process   TTFT {summary(l_ttft)} | ITL {summary(l_itl)}")
        for single_hop, name in layouts.items():
            h_ttft, h_itl = remote[single_hop][level]
            added = statistics.median(h_ttft) - statistics.median(l_ttft)
            print(
                f"concurrency {level:2d}  {name} TTFT {summary(h_ttft)} | ITL {summary(h_itl)}"
                f" | adds {added * 1e3:.2f} ms to TTFT (p50)"
            )


if __name__ == "__main__":
    main()
