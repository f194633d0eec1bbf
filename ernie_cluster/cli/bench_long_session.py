"""`ernie-cluster bench long-session`: TTFT per turn of one conversation grown toward the
context limit, with prefix caching on and off; with --sessions N, N conversations
round-robin with the host KV tier on and off. Parses flags; the work is in
`ernie_cluster.bench.long_session`."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  # this machine: two one-process servers on the demo checkpoint, 32K context (CPU)
  ernie-cluster bench long-session --max-context 32768 --turn-tokens 2048
  # a GPU box: spawn both servers on the GPU, 128K context
  ernie-cluster bench long-session --model baidu/ERNIE-4.5-21B-A3B-PT --device cuda \\
      --dtype bfloat16 --max-context 131072 --turn-tokens 8192 --max-num-batched-tokens 8192
  # 4 sessions round-robin over a 40K-token device pool, host KV tier (1 GiB) on vs off
  ernie-cluster bench long-session --sessions 4 --kv-offload-gb 1 --max-context 32768 \\
      --server-arg=--num-kv-blocks --server-arg=2560
  # or attach to two running servers (the second started with --no-prefix-caching);
  # --model then only names the tokenizer the prompt text is drawn from
  ernie-cluster bench long-session --model baidu/ERNIE-4.5-21B-A3B-PT --max-context 131072 \\
      --base-url-cached http://127.0.0.1:8000 --base-url-uncached http://127.0.0.1:8001
"""


def add_long_session_args(p: argparse.ArgumentParser) -> None:
    from ernie_cluster.cli.bench import positive_float

    session = p.add_argument_group("conversation")
    session.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or hub id: what spawned servers load and the prompt text's "
        "tokenizer (default: the demo checkpoint)",
    )
    session.add_argument(
        "--max-context",
        type=int,
        default=32768,
        help="context limit in tokens: the servers' --max-model-len; the conversation ends "
        "before a turn would pass it (default %(default)s)",
    )
    session.add_argument(
        "--turn-tokens",
        type=int,
        default=2048,
        help="user tokens added per turn (default %(default)s)",
    )
    session.add_argument(
        "--output-len", type=int, default=16, help="tokens generated per turn (default %(default)s)"
    )
    session.add_argument("--seed", type=int, default=0, help="seed of the conversation's text")
    session.add_argument(
        "--sessions",
        type=int,
        default=1,
        help="> 1: that many conversations round-robin, against spawned servers with the host "
        "KV tier on and off; returning-turn TTFT at max-context/4, /2, /1 (default 1: one "
        "conversation, prefix caching on vs off)",
    )
    session.add_argument(
        "--kv-offload-gb",
        type=positive_float,
        default=4.0,
        help="the tier-on server's host KV tier in GiB, with --sessions (default %(default)s)",
    )

    engine = p.add_argument_group("spawned servers (ignored for an attached one)")
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="per-step token budget, i.e. the prefill chunk (default: the server's)",
    )
    engine.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    engine.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    engine.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more flag for `ernie-cluster serve` (repeat; e.g. --server-arg=--num-kv-blocks "
        "--server-arg=8192)",
    )
    engine.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=600.0,
        help="seconds a spawned server may take to start answering",
    )

    attach = p.add_argument_group("attach to running servers")
    attach.add_argument(
        "--base-url-cached", default=None, help="server with prefix caching on (not spawned)"
    )
    attach.add_argument(
        "--base-url-uncached",
        default=None,
        help="server started with --no-prefix-caching (not spawned)",
    )
    attach.add_argument("--api-key", default=None, help="bearer token")
    attach.add_argument(
        "--timeout", type=positive_float, default=1800.0, help="seconds per request"
    )

    report = p.add_argument_group("report")
    report.add_argument(
        "--out", default="bench-results/long-session", help="output directory (default %(default)s)"
    )
    report.add_argument("--no-plots", action="store_true", help="skip the PNG figure")
    report.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_bench_long_session(args: argparse.Namespace) -> int:
    from ernie_cluster.bench.long_session import LongSessionConfig, run_long_session
    from ernie_cluster.bench.long_session_report import format_report

    config = LongSessionConfig(
        model=args.model,
        max_context=args.max_context,
        turn_tokens=args.turn_tokens,
        output_len=args.output_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        device=args.device,
        dtype=args.dtype,
        server_args=args.server_arg,
        base_url_cached=args.base_url_cached,
        base_url_uncached=args.base_url_uncached,
        api_key=args.api_key,
        sessions=args.sessions,
        kv_offload_gb=args.kv_offload_gb,
        seed=args.seed,
        timeout_s=args.timeout,
        startup_timeout_s=args.startup_timeout,
        out_dir=args.out,
        plots=not args.no_plots,
        progress=not args.no_progress,
    )
    try:
        report = run_long_session(config)
    except KeyboardInterrupt:
        print("interrupted (spawned servers were stopped)", file=sys.stderr)
        return 130
    print(format_report(report))
    return 1 if report["failed"] else 0


def add_long_session_parser(kinds) -> None:
    """Register the subcommand on the `bench` subparsers."""
    p = kinds.add_parser(
        "long-session",
        help="TTFT per turn of one conversation grown to the context limit, caching on/off",
        description="Grow one conversation turn by turn (greedy, real replies carried forward, "
        "one request at a time) until the context limit, once against a server with prefix "
        "caching and once without, and report time to first token per turn. Spawns two "
        "one-process servers in turn (no Ray) unless given their URLs. Writes "
        "long_session.json and long_session.png; exits 1 when a request failed.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_long_session_args(p)
    p.set_defaults(func=cmd_bench_long_session)
