"""`ernie-cluster bench ...`: the load generator and the load tests built on it."""

from __future__ import annotations

import argparse
import math

SERVE_EXAMPLES = """examples:
  # 200 random prompts, Poisson arrivals at 4 req/s, goodput under two SLOs
  ernie-cluster bench serve --num-prompts 200 --request-rate 4 --goodput ttft:500 tpot:50
  # 32 users in a closed loop for 60 s, multi-turn sessions growing toward 8K tokens
  ernie-cluster bench serve --dataset multi-turn --max-concurrency 32 --duration 60 \\
      --turns 8 --max-context-tokens 8192
  # replay a JSONL file ({"prompt": ...} or {"messages": [...]}, optional "max_tokens")
  ernie-cluster bench serve --dataset jsonl --jsonl prompts.jsonl --request-rate 2
"""


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_serve_args(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("server")
    target.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)"
    )
    target.add_argument("--model", default=None, help="model name (default: the first served)")
    target.add_argument(
        "--endpoint", choices=["chat", "completions"], default="chat", help="API to load"
    )
    target.add_argument("--api-key", default=None, help="bearer token")
    target.add_argument("--timeout", type=positive_float, default=600.0, help="seconds/request")

    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=None, help="requests to send")
    load.add_argument(
        "--duration", type=positive_float, default=None, help="stop sending after this many s"
    )
    load.add_argument(
        "--request-rate",
        type=positive_float,
        default=math.inf,
        help="mean session arrivals per second (default inf: as many as --max-concurrency)",
    )
    load.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 more regular",
    )
    load.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight (with an infinite rate: a closed loop of this many users)",
    )
    load.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset", choices=["random", "multi-turn", "jsonl"], default="random")
    data.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint dir or hub id random prompts are drawn from (default: the demo's)",
    )
    data.add_argument(
        "--input-len", type=int, default=256, help="prompt tokens (multi-turn: per user turn)"
    )
    data.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    data.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="random lengths are uniform in len*(1-r)..len*(1+r)",
    )
    data.add_argument("--turns", type=int, default=4, help="multi-turn: turns per session")
    data.add_argument(
        "--system-prompt-len",
        type=int,
        default=256,
        help="multi-turn: tokens of the system prompt every session shares",
    )
    data.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help="multi-turn: end a session before its prompt passes this",
    )
    data.add_argument("--jsonl", default=None, help="jsonl: the file of requests")
    data.add_argument("--temperature", type=float, default=0.0)
    data.add_argument(
        "--ignore-eos", action="store_true", help="generate exactly --output-len tokens"
    )

    report = p.add_argument_group("report")
    report.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="METRIC:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000",
    )
    report.add_argument(
        "--out",
        default="bench-results",
        help="output directory (default %(default)s, which the repository's .gitignore lists)",
    )
    report.add_argument("--label", default="serve_bench", help="file name prefix")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    report.add_argument(
        "--save-requests", action="store_true", help="also write every request's timings"
    )
    report.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from ernie_cluster.bench.serve_bench import ServeBenchConfig, format_summary, run_serve_bench

    config = ServeBenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        dataset=args.dataset,
        tokenizer=args.tokenizer,
        num_requests=args.num_prompts,
        duration_s=args.duration,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        turns=args.turns,
        system_prompt_len=args.system_prompt_len,
        max_context_tokens=args.max_context_tokens,
        jsonl_path=args.jsonl,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        goodput=args.goodput,
        seed=args.seed,
        timeout_s=args.timeout,
        out_dir=args.out,
        label=args.label,
        plots=not args.no_plots,
        save_requests=args.save_requests,
        progress=not args.no_progress,
    )
    report = run_serve_bench(config)
    print(format_summary(report))
    return 1 if report["summary"]["failed"] else 0


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="load generator, load tests and benchmarks")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser(
        "serve",
        help="load an OpenAI-compatible server and report latencies and throughput",
        description="Send OpenAI API load (random, multi-turn or JSONL prompts; Poisson/gamma "
        "arrivals or a closed loop) and report throughput, TTFT, TPOT, ITL, end-to-end "
        "latency and goodput as JSON and PNG. Exits 1 when a request failed.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_args(serve)
    serve.set_defaults(func=cmd_bench_serve)

    from ernie_cluster.cli.bench_autoscale import add_autoscale_parser
    from ernie_cluster.cli.bench_long_session import add_long_session_parser

    add_autoscale_parser(kinds)
    add_long_session_parser(kinds)
