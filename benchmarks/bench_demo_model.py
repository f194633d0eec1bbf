"""The demo model as a user meets it: held-out scores, then latency through the demo server.

1. Scores of the shipped demo checkpoint on held-out conversations (greedy, the offline `LLM`):
   get_weather calls naming the asked city, answers that state a tool result's temperature,
   clean greetings (`ernie_cluster_tools.demo_model.evaluate`).
2. The Ray Serve application `scripts/demo.sh` starts (one replica, W = 1, ernie_x1 parsers),
   asked the README's two requests (the greeting, the weather question with `tools`) one at a
   time over HTTP, streamed with the official `openai` client: time to the first streamed
   token and decode tokens/s after it.
3. In the same run, our engine in this process (the offline `LLM`) and the peer,
   transformers' `Ernie4_5_MoeForCausalLM.generate`, on the same rendered prompts, greedy,
   float32: the time to the first token (a one-token generate) and decode tokens/s. The
   ratios say how the served demo, and the engine without the serving hops, compare.

    .venv/bin/python benchmarks/bench_demo_model.py [--requests 10] [--threads 2]

Not collected by pytest; it backs "The demo model" in RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import code_version, machine_summary

from ernie_cluster.checkpoints.demo import DEMO_SERVED_NAME as SERVED_NAME
from ernie_cluster.checkpoints.demo import demo_checkpoint as shipped_checkpoint
from ernie_cluster.distributed.process_group import free_port
from ernie_cluster_tools.demo_model.conversations import weather_tool
from ernie_cluster_tools.demo_model.evaluate import evaluate_checkpoint

APP = "ernie-demo-bench"
REQUESTS = {
    "greeting": ([{"role": "user", "content": "Hello!"}], None),
    "weather tool call": (
        [{"role": "user", "content": "What's the weather like in Paris today?"}],
        [weather_tool()],
    ),
}


def served_timings(client, messages, tools, repeats: int) -> tuple[list[float], list[float], int]:
    """(first-token seconds, decode tokens/s, completion tokens) of `repeats` streamed requests."""
    ttfts, rates, tokens = [], [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        first = end = None
        stream = client.chat.completions.create(
            model=SERVED_NAME,
            messages=messages,
            tools=tools,
            temperature=0.0,
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and first is None:
                delta = chunk.choices[0].delta
                if delta.content or delta.tool_calls or getattr(delta, "reasoning_content", None):
                    first = time.perf_counter()
            end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((tokens - 1) / (end - first))
    return ttfts, rates, tokens


def first_token_and_decode(
    generate: Callable[[int], float], num_tokens: int, repeats: int
) -> tuple[list[float], list[float]]:
    """(first-token seconds, decode tokens/s) from `generate(n)`, the seconds a greedy
    generation of exactly n tokens takes: a one-token run, then a full one, `repeats` times."""
    generate(2)  # warm-up
    ttfts, rates = [], []
    for _ in range(repeats):
        first = generate(1)
        whole = generate(num_tokens)
        ttfts.append(first)
        rates.append((num_tokens - 1) / max(1e-9, whole - first))
    return ttfts, rates


def engine_timings(prompt_ids: list[int], num_tokens: int, repeats: int):
    """(first-token seconds, decode tokens/s) of our engine in this process (offline `LLM`,
    W = 1, float32), the same prompt and length: the model step without the serving hops."""
    from ernie_cluster import LLM, SamplingParams

    with LLM(model=str(shipped_checkpoint()), dtype="float32", show_progress=False) as llm:

        def generate(new_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
            start = time.perf_counter()
            llm.generate([prompt_ids], params)
            return time.perf_counter() - start

        return first_token_and_decode(generate, num_tokens, repeats)


def transformers_timings(prompt_ids: list[int], num_tokens: int, repeats: int):
    """(first-token seconds, decode tokens/s) of transformers' greedy generate, same prompt."""
    from transformers import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(
        shipped_checkpoint(), dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)

    def generate(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    return first_token_and_decode(generate, num_tokens, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10, help="requests per prompt")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads of the transformers peer"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_summary())
    print(f"code {code_version()}; checkpoint {shipped_checkpoint()}")

    scores = evaluate_checkpoint(str(shipped_checkpoint()), dtype="float32")
    print(
        f"held-out (greedy): get_weather with the asked city {scores.tool_call_accuracy:.0%} "
        f"of 30, arguments JSON {scores.arguments_json_rate:.0%}, answers stating the "
        f"temperature {scores.answer_temperature_rate:.0%} of 20, clean greetings "
        f"{scores.clean_greeting_rate:.0%} of 10"
    )

    import ray
    from openai import OpenAI
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig
    from ernie_cluster.tokenizer import load_tokenizer

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the flags scripts/demo.sh passes
    config = ServeAppConfig(
        dtype="float32", reasoning_parser="ernie_x1", tool_call_parser="ernie_x1"
    )
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
    tokenizer = load_tokenizer(shipped_checkpoint())
    try:
        for name, (messages, tools) in REQUESTS.items():
            served_timings(client, messages, tools, 1)  # warm-up
            ttft, rate, tokens = served_timings(client, messages, tools, args.requests)
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools))
            engine_ttft, engine_rate = engine_timings(prompt, tokens, args.requests)
            peer_ttft, peer_rate = transformers_timings(prompt, tokens, args.requests)
            print(
                f"{name}: {len(prompt)} prompt tokens, {tokens} generated\n"
                f"  demo server (Ray Serve, HTTP, streamed): first token "
                f"{statistics.median(ttft) * 1e3:.1f} ms, decode "
                f"{statistics.median(rate):.1f} tokens/s\n"
                f"  our engine (offline LLM, in-process):    first token "
                f"{statistics.median(engine_ttft) * 1e3:.1f} ms, decode "
                f"{statistics.median(engine_rate):.1f} tokens/s\n"
                f"  transformers generate (in-process):     first token "
                f"{statistics.median(peer_ttft) * 1e3:.1f} ms, decode "
                f"{statistics.median(peer_rate):.1f} tokens/s\n"
                f"  decode speed vs transformers: demo server "
                f"{statistics.median(rate) / statistics.median(peer_rate):.2f}x, engine "
                f"{statistics.median(engine_rate) / statistics.median(peer_rate):.2f}x"
            )
    finally:
        serve.delete(APP)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
