"""`ernie-cluster bench autoscale`: flags of the autoscaling load test and its exit status.

Flags only; the test itself is ernie_cluster/bench/autoscale.py (its config's defaults are
the flags' defaults, so the two never disagree).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ernie_cluster.cli.bench import positive_float

EXAMPLES = """examples:
  # here (CPU): deploy the demo checkpoint with 1..2 replicas, ramp 1 -> 8 users and back,
  # check 1 -> 2 -> 1 replicas and zero failed requests (about two minutes)
  ernie-cluster bench autoscale --out bench-results
  # the same with your checkpoint
  ernie-cluster bench autoscale --model /models/tiny --dtype float32
  # GPU cluster, from the head pod: load and watch the Helm chart's running app
  ernie-cluster bench autoscale --ray-address auto --app-name ernie \\
      --base-url http://127.0.0.1:8000 --model baidu/ERNIE-4.5-21B-A3B-Thinking \\
      --target-ongoing-requests 24 --peak-concurrency 64 --ramp-up 120 --hold 300 \\
      --ramp-down 120 --scale-up-wait 1200 --cool-down 900 --input-len 1024 --output-len 256

Exit status: 0 when every check passed, 1 when one failed, 2 on bad input.
See docs/autoscaling-load-test.md for reading the timeline.
"""


def cmd_bench_autoscale(args: argparse.Namespace) -> int:
    from ernie_cluster.bench.autoscale import format_summary, run_autoscale_test

    # NOTE: httpx logs every request at INFO; the monitor polls /metrics twice a second.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    report = run_autoscale_test(config_from_args(args))
    print(format_summary(report))
    return 0 if report["passed"] else 1


def config_from_args(args: argparse.Namespace):
    from ernie_cluster.bench.autoscale import AutoscaleTestConfig

    names = {f.name for f in dataclasses.fields(AutoscaleTestConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values["ignore_eos"] = not args.no_ignore_eos
    values["plots"] = not args.no_plots
    values["progress"] = not args.no_progress
    return AutoscaleTestConfig(**values)


def add_autoscale_parser(kinds) -> None:
    """Register the subcommand on the `bench` subparsers."""
    from ernie_cluster.bench.autoscale import AutoscaleTestConfig

    d = {f.name: f.default for f in dataclasses.fields(AutoscaleTestConfig)}
    p = kinds.add_parser(
        "autoscale",
        help="autoscaling load test: ramp load up and down, check replicas grow and shrink",
        description="Ramp closed-loop load up to a peak, hold it, ramp it down, and record the "
        "model deployment's replicas (RUNNING/STARTING/STOPPING), the engine queues and the "
        "latencies over time. Checks that Serve added replicas under load, was back at the "
        "minimum afterwards, and that no request failed; writes JSON and a PNG timeline. "
        "Deploys the app itself (starting Ray and Serve on 127.0.0.1 if needed) unless "
        "--base-url attaches to a running one.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model (deploy mode)")
    m.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or hub id (default: the built-in demo checkpoint); in attach "
        "mode only the source of the prompts' tokenizer",
    )
    m.add_argument(
        "--dtype", default=d["dtype"], choices=["auto", "float32", "bfloat16", "float16"]
    )
    m.add_argument("--device", default=d["device"], help="'cuda' on GPU nodes (default cpu)")
    m.add_argument("--tensor-parallel-size", type=int, default=d["tensor_parallel_size"])
    m.add_argument("--single-hop", action="store_true", help="HTTP app inside the model replicas")

    a = p.add_argument_group("autoscaling (Serve's autoscaling_config)")
    a.add_argument(
        "--min-replicas",
        type=int,
        default=d["min_replicas"],
        metavar="N",
        help="replicas at rest, where the test starts and must end (default %(default)s)",
    )
    a.add_argument(
        "--max-replicas",
        type=int,
        default=d["max_replicas"],
        metavar="N",
        help="most replicas (default %(default)s)",
    )
    a.add_argument(
        "--target-ongoing-requests",
        type=positive_float,
        default=d["target_ongoing_requests"],
        help="requests in flight per replica Serve aims for (default %(default)s)",
    )
    a.add_argument(
        "--upscale-delay-s",
        type=float,
        default=d["upscale_delay_s"],
        help="seconds the load must stay high before a replica is added (default %(default)s)",
    )
    a.add_argument(
        "--downscale-delay-s",
        type=float,
        default=d["downscale_delay_s"],
        help="seconds the load must stay low before a replica is removed (default %(default)s)",
    )
    a.add_argument(
        "--look-back-period-s",
        type=positive_float,
        default=d["look_back_period_s"],
        help="window the load is averaged over (default %(default)s)",
    )
    a.add_argument(
        "--metrics-interval-s",
        type=positive_float,
        default=d["metrics_interval_s"],
        help="how often handles and replicas report load to the controller; in Ray 2.60 this "
        "deprecated field is still what sets the push period (default %(default)s)",
    )

    load = p.add_argument_group("load (closed-loop users, random prompts)")
    load.add_argument(
        "--peak-concurrency",
        type=int,
        default=d["peak_concurrency"],
        help="users at the peak (default %(default)s)",
    )
    for flag, name, text in (
        ("--ramp-up", "ramp_up_s", "seconds from 1 user to the peak"),
        ("--hold", "hold_s", "seconds at the peak, counted from when max replicas run"),
        ("--ramp-down", "ramp_down_s", "seconds from the peak down to the tail"),
        (
            "--scale-up-wait",
            "scale_up_wait_s",
            "most seconds the hold waits, after the ramp-up, for max replicas to run",
        ),
        (
            "--cool-down",
            "cool_down_s",
            "most seconds to wait, after the ramp-down, for the replicas to get back to the "
            "minimum",
        ),
    ):
        load.add_argument(
            flag,
            dest=name,
            type=float,
            default=d[name],
            metavar="S",
            help=f"{text} (default {d[name]})",
        )
    load.add_argument(
        "--tail-concurrency",
        type=int,
        default=d["tail_concurrency"],
        help="users that keep sending after the ramp-down until the replicas are back at the "
        "minimum, so a replica's shutdown meets requests in flight; 0: stop at the ramp-down "
        "(default %(default)s)",
    )
    load.add_argument("--input-len", type=int, default=d["input_len"], help="prompt tokens")
    load.add_argument("--output-len", type=int, default=d["output_len"], help="max_tokens")
    load.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let answers end at EOS (default: exactly --output-len tokens)",
    )
    load.add_argument(
        "--tokenizer",
        default=None,
        help="checkpoint dir or hub id random prompts are drawn from (default: --model's)",
    )
    load.add_argument("--seed", type=int, default=d["seed"])
    load.add_argument(
        "--timeout", dest="timeout_s", type=positive_float, default=d["timeout_s"], metavar="S"
    )
    load.add_argument(
        "--sample-period",
        dest="sample_period_s",
        type=positive_float,
        default=d["sample_period_s"],
        metavar="S",
        help="seconds between samples of replicas, queues and latencies (default %(default)s)",
    )
    load.add_argument(
        "--latency-window",
        dest="latency_window_s",
        type=positive_float,
        default=d["latency_window_s"],
        metavar="S",
        help="a sample's latencies are of the requests finished in this many last seconds",
    )

    where = p.add_argument_group("where (deploy mode unless --base-url)")
    where.add_argument(
        "--base-url",
        default=None,
        help="attach to the app serving here instead of deploying one (no deploy, no delete)",
    )
    where.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (attach mode default: auto); deploy mode without it "
        "starts a local Ray on 127.0.0.1 unless one is running in this process",
    )
    where.add_argument(
        "--app-name",
        default=None,
        help="Serve application (default: ernie-autoscale when deploying, ernie when attaching)",
    )
    where.add_argument(
        "--deployment",
        default=None,
        help="model deployment to watch (default: LLMServer, else OpenAIServer)",
    )
    where.add_argument(
        "--port",
        type=int,
        default=None,
        help="deploy mode: Serve's HTTP port when this starts Serve (default: a free one)",
    )
    where.add_argument("--api-key", default=None, help="bearer token")

    report = p.add_argument_group("report")
    report.add_argument("--out", dest="out_dir", default=d["out_dir"], help="output directory")
    report.add_argument("--label", default=d["label"], help="file name prefix")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG timeline")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_autoscale)
