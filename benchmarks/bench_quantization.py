"""Quantization (--quantization, --kv-cache-dtype): bytes, accuracy and CPU decode rate.

Parts (`--parts`, comma-separated):

* bytes: weight bytes per rank for the real ERNIE-4.5-21B-A3B shapes (the `full` preset, built
  on the meta device, so nothing is allocated) at W = 1, 2, 4, per mode, and the KV-cache
  tokens an 80 GB / 141 GB GPU fits after the weights at --gpu-memory-utilization, bf16 vs
  fp8 KV. COMPUTED from shapes, not measured (activations and graphs not subtracted).
* accuracy: teacher-forced against the unquantized model in the same dtype: over sequences
  whose continuation the unquantized model chose (mini: random prompts and its greedy
  continuation; demo: held-out conversations and their reference answers), the mean |delta
  logprob| of the chosen tokens, top-1 agreement and mean KL(unquantized || quantized).
* calls: the demo model's held-out tool-call accuracy (and the other held-out scores of
  ernie_cluster_tools.demo_model.evaluate), per mode, with the offline engine at --world ranks.
* server-calls: the same held-out scores through a server (the one-process server at
  --world 1, the Ray Serve application at more ranks) and the official openai client: the
  tool calls as the server's parser returns them.
* speed: CPU decode rate of the `mini` checkpoint per mode, the modes alternating (ABBA),
  --threads threads, output tokens/s and the ratio to unquantized in the same run.

`python benchmarks/bench_quantization.py --parts bytes,accuracy,calls,speed` (and
`--parts server-calls --world 2`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_threads_arg, checkpoint, interleave, machine_summary, set_threads

MODES = (None, "wint8", "wint4", "fp8", "block_wise_fp8")
GPUS_GB = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}


def mode_name(mode: str | None) -> str:
    return mode or "unquantized"


def part_bytes(args: argparse.Namespace) -> dict:
    from ernie_cluster.config.model_config import ErnieMoeConfig
    from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
    from ernie_cluster.model.sharding import ShardSpec
    from ernie_cluster.quantization.apply import planned_weight_bytes
    from ernie_cluster_tools.fixtures.presets import preset_config

    config = ErnieMoeConfig.from_dict(preset_config("full"))
    results: dict = {"weights_gb": {}, "kv": {}}
    print("weight bytes per rank, real model shapes (computed), GB: experts + rest = total")
    for world in (1, 2, 4):
        with torch.device("meta"):
            model = Ernie4_5_MoeForCausalLM(config, torch.bfloat16, ShardSpec(0, world))
        for mode in MODES:
            sizes = planned_weight_bytes(model, mode)
            total = sum(sizes.values())
            results["weights_gb"][f"W{world} {mode_name(mode)}"] = total / 1e9
            print(
                f"  W={world} {mode_name(mode):15} {sizes['experts'] / 1e9:6.2f} + "
                f"{sizes['other'] / 1e9:5.2f} = {total / 1e9:6.2f}"
            )
    kv_heads = config.num_key_value_heads
    for world in (1, 4):
        for kv_name, itemsize in (("bf16", 2), ("fp8", 1)):
            per_token = config.num_hidden_layers * 2 * (kv_heads // world) * config.head_dim
            per_token *= itemsize
            for gpu, capacity in GPUS_GB.items():
                for mode in (None, "wint8", "wint4"):
                    weights = results["weights_gb"][f"W{world} {mode_name(mode)}"] * 1e9
                    free = capacity * args.gpu_memory_utilization - weights
                    tokens = max(0, int(free // per_token))
                    key = f"W{world} {gpu} {mode_name(mode)} KV {kv_name}"
                    results["kv"][key] = tokens
    print(
        f"KV tokens that fit after the weights at gpu_memory_utilization "
        f"{args.gpu_memory_utilization} (computed upper bound: activations not subtracted):"
    )
    for key, tokens in results["kv"].items():
        print(f"  {key:45} {tokens / 1e3:9.0f}K tokens ({tokens / 131072:5.1f} x 128K)")
    return results


def sequence_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 logits of one sequence, one prefill through the paged model."""
    from ernie_cluster.attention import AttentionMetadata

    n, block_size = len(token_ids), 16
    num_blocks = -(-n // block_size)
    attn = model.layers[0].self_attn
    caches = [
        torch.zeros(2, num_blocks * block_size, attn.num_kv_heads, attn.head_dim, dtype=model.dtype)
        for _ in model.layers
    ]
    model.bind_kv_caches(caches)
    meta = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(n), meta)
        return model.compute_logits(hidden, torch.arange(n))


def compare(reference, quantized, sequences: list[tuple[list[int], int]]) -> dict:
    """Each sequence (ids, first scored position): the three agreement figures."""
    deltas, agree, kls = [], [], []
    for ids, start in sequences:
        ref = torch.log_softmax(sequence_logits(reference, ids), -1)[start - 1 : -1]
        got = torch.log_softmax(sequence_logits(quantized, ids), -1)[start - 1 : -1]
        chosen = torch.tensor(ids[start:])
        deltas += (got.gather(1, chosen[:, None]) - ref.gather(1, chosen[:, None])).abs()[:, 0]
        agree += (got.argmax(-1) == ref.argmax(-1)).tolist()
        kls += (ref.exp() * (ref - got)).sum(-1).tolist()
    return {
        "mean_abs_delta_logprob": float(torch.stack(deltas).mean()),
        "top1_agreement": sum(agree) / len(agree),
        "mean_kl": statistics.fmean(kls),
        "tokens": len(agree),
    }


def mini_sequences(path: Path, dtype: str, count: int) -> list[tuple[list[int], int]]:
    import random

    from ernie_cluster import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(rng.randint(16, 96))] for _ in range(count)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    with LLM(model=str(path), dtype=dtype, show_progress=False) as llm:
        outputs = llm.generate(prompts, params)
    return [
        (p + list(o.outputs[0].token_ids), len(p)) for p, o in zip(prompts, outputs, strict=True)
    ]


def demo_sequences(count: int) -> list[tuple[list[int], int]]:
    """Held-out conversations of every family, scored over their reference answers."""
    from ernie_cluster import LLM
    from ernie_cluster_tools.demo_model.conversations import generate_examples
    from ernie_cluster_tools.demo_model.evaluate import EVAL_SEED

    examples = generate_examples(count, seed=EVAL_SEED, split="heldout")
    sequences = []
    with LLM(show_progress=False, num_kv_blocks=16) as llm:
        tokenizer = llm.tokenizer
        for example in examples:
            prompt = llm.render_chat(example.messages, example.tools)
            prompt_ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
            target_ids = tokenizer.encode(example.target)
            sequences.append((prompt_ids + target_ids, len(prompt_ids)))
    return sequences


def part_accuracy(args: argparse.Namespace) -> dict:
    from ernie_cluster.checkpoints.demo import demo_checkpoint
    from ernie_cluster.loader.model_loader import load_model

    results: dict = {}
    sets = {
        "mini": (
            checkpoint("mini"),
            mini_sequences(checkpoint("mini"), args.dtype, args.mini_sequences),
        ),
        "demo": (demo_checkpoint(), demo_sequences(args.demo_conversations)),
    }
    for name, (path, sequences) in sets.items():
        dtype = args.dtype if name == "mini" else "auto"
        reference = load_model(path, dtype=dtype, show_progress=False)
        print(
            f"{name} ({reference.dtype}, {sum(len(s[0]) - s[1] for s in sequences)} scored tokens):"
        )
        for mode in MODES[1:]:
            quantized = load_model(path, dtype=dtype, show_progress=False, quantization=mode)
            figures = compare(reference, quantized, sequences)
            results[f"{name} {mode}"] = figures
            print(
                f"  {mode:15} mean |dlogprob| {figures['mean_abs_delta_logprob']:.4f}  "
                f"top-1 {figures['top1_agreement'] * 100:5.1f}%  KL {figures['mean_kl']:.5f}"
            )
    return results


def part_calls(args: argparse.Namespace) -> dict:
    from ernie_cluster.checkpoints.demo import demo_checkpoint
    from ernie_cluster_tools.demo_model.evaluate import evaluate_checkpoint

    results: dict = {}
    print(f"demo model held-out scores, offline engine, W={args.world}:")
    for mode in MODES:
        scores = evaluate_checkpoint(
            str(demo_checkpoint()),
            quantization=mode,
            tensor_parallel_size=args.world,
            expert_parallel_size=args.world,
        )
        row = {
            "tool_call_accuracy": scores.tool_call_accuracy,
            "answer_temperature_rate": scores.answer_temperature_rate,
            "clean_greeting_rate": scores.clean_greeting_rate,
        }
        results[mode_name(mode)] = row
        print(
            f"  {mode_name(mode):15} calls {row['tool_call_accuracy'] * 100:5.1f}%  answers "
            f"{row['answer_temperature_rate'] * 100:5.1f}%  greetings "
            f"{row['clean_greeting_rate'] * 100:5.1f}%"
        )
    return results


@contextlib.contextmanager
def served_demo(mode: str | None, world: int):
    """The demo model served with `mode`: the one-process server at one rank, the Ray Serve
    application (a local Ray instance, 127.0.0.1, a free port) at `world` ranks. Yields the
    base URL."""
    from ernie_cluster.bench.server_process import ServerProcess

    if world == 1:
        flags = ["--quantization", mode] if mode else []
        with ServerProcess(flags, start_timeout_s=300) as server:
            yield server.base_url
        return
    import ray
    from ray import serve

    from ernie_cluster.checkpoints.demo import demo_checkpoint
    from ernie_cluster.distributed.process_group import free_port
    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig

    ray.init(
        num_cpus=2 * world,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}},
    )
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeAppConfig(
            model=str(demo_checkpoint()),
            tensor_parallel_size=world,
            expert_parallel_size=world,
            reasoning_parser="ernie_x1",
            tool_call_parser="ernie_x1",
            quantization=mode,
        )
        serve.run(build_app(config), name="bench-quantization", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def part_server_calls(args: argparse.Namespace) -> dict:
    """The held-out scores again, each mode served (`served_demo`) and asked with the
    official openai client."""
    import openai

    from ernie_cluster_tools.demo_model.evaluate import heldout_examples

    sets = {
        "call": heldout_examples("weather_call", 30),
        "answer": heldout_examples("weather_answer", 20),
        "greeting": heldout_examples("greeting", 10),
    }
    results: dict = {}
    print(f"demo model held-out scores through the server (openai client), W={args.world}:")
    for mode in MODES:
        with served_demo(mode, args.world) as base_url:
            client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300)
            model = client.models.list().data[0].id
            replies = {
                kind: [
                    client.chat.completions.create(
                        model=model,
                        messages=example.messages,
                        tools=example.tools or openai.NOT_GIVEN,
                        temperature=0,
                        max_tokens=160,
                    )
                    .choices[0]
                    .message
                    for example in examples
                ]
                for kind, examples in sets.items()
            }
        calls_ok = 0
        for example, message in zip(sets["call"], replies["call"], strict=True):
            call = (message.tool_calls or [None])[0]
            try:
                arguments = json.loads(call.function.arguments) if call else {}
            except ValueError:
                arguments = {}
            city = example.facts["arguments"]["location"]
            calls_ok += bool(
                call and call.function.name == "get_weather" and arguments.get("location") == city
            )
        answers_ok = sum(
            str(example.facts["result"]["temperature"]) in (message.content or "")
            for example, message in zip(sets["answer"], replies["answer"], strict=True)
        )
        greetings_ok = sum(bool((m.content or "").strip()) for m in replies["greeting"])
        row = {
            "tool_call_accuracy": calls_ok / len(sets["call"]),
            "answer_temperature_rate": answers_ok / len(sets["answer"]),
            "clean_greeting_rate": greetings_ok / len(sets["greeting"]),
        }
        results[mode_name(mode)] = row
        print(
            f"  {mode_name(mode):15} calls {row['tool_call_accuracy'] * 100:5.1f}%  answers "
            f"{row['answer_temperature_rate'] * 100:5.1f}%  greetings "
            f"{row['clean_greeting_rate'] * 100:5.1f}%",
            flush=True,
        )
    return results


def part_speed(args: argparse.Namespace) -> dict:
    import random

    from ernie_cluster import LLM, SamplingParams

    path = checkpoint("mini")
    rng = random.Random(1)
    prompts = [
        [rng.randrange(3, 32000) for _ in range(rng.randint(32, 128))]
        for _ in range(args.speed_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engines = {
        mode_name(mode): LLM(
            model=str(path),
            dtype=args.dtype,
            show_progress=False,
            quantization=mode,
            enable_prefix_caching=False,
        )
        for mode in args.speed_modes
    }

    def runner(llm):
        def run() -> float:
            start = time.perf_counter()
            llm.generate(prompts, params)
            return time.perf_counter() - start

        return run

    seconds = interleave({name: runner(llm) for name, llm in engines.items()}, args.repeats)
    for llm in engines.values():
        llm.shutdown()
    tokens = len(prompts) * args.output_len
    base = statistics.median(seconds["unquantized"])
    results = {}
    print(f"CPU decode, mini {args.dtype}, {len(prompts)} prompts x {args.output_len} tokens:")
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        results[name] = {"tok_per_s": rate, "vs_unquantized": base / statistics.median(times)}
        print(
            f"  {name:15} {rate:7.1f} tok/s  ({base / statistics.median(times):.2f}x unquantized;"
            f" runs {', '.join(f'{tokens / t:.1f}' for t in times)})"
        )
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="bytes,accuracy,calls,speed")
    parser.add_argument("--dtype", default="bfloat16", help="mini's dtype (demo: its own)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--mini-sequences", type=int, default=16)
    parser.add_argument("--demo-conversations", type=int, default=60)
    parser.add_argument("--world", type=int, default=1, help="ranks for the calls part")
    parser.add_argument("--speed-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--speed-modes",
        type=lambda text: [None if m == "unquantized" else m for m in text.split(",")],
        default=[None, "wint8", "wint4", "fp8"],
        help="comma-separated; 'unquantized' is the baseline and must be included",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    add_threads_arg(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(machine_summary())
    parts = {
        "bytes": part_bytes,
        "accuracy": part_accuracy,
        "calls": part_calls,
        "server-calls": part_server_calls,
        "speed": part_speed,
    }
    unknown = set(args.parts.split(",")) - set(parts)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {sorted(parts)}")
    results = {name: parts[name](args) for name in args.parts.split(",")}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
