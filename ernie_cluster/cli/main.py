"""The `ernie-cluster` command line: make-tiny, train-demo, generate (offline) and the
subcommands of the later layers. Each subcommand parses its flags here and calls one library
function."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from ernie_cluster.checkpoints.presets import PRESETS
from ernie_cluster.cli import train_demo
from ernie_cluster.cli.model_args import add_model_args, model_values
from ernie_cluster.config.engine_config import ATTENTION_BACKENDS
from ernie_cluster.serving.limits import RequestLimits
from ernie_cluster.serving.ray_serve.config import API_KEY_ENV, GRAMMAR_FIELDS, ServeAppConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id "
        "(default: the built-in demo checkpoint, shipped inside the package)",
    )
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype (default: the checkpoint's)",
    )
    g.add_argument("--device", default="cpu", help="torch device of the workers (cpu, cuda)")
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="shards of attention heads (must divide the kv heads)",
    )
    g.add_argument(
        "--expert-parallel-size",
        type=int,
        default=None,
        help="shards of the experts (default: the tensor-parallel size)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: from config.json)",
    )
    g.add_argument("--max-num-seqs", type=int, default=32, help="most sequences per step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step (prefill chunks and decodes)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    g.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV cache size in blocks (default: from the memory budget)",
    )
    g.add_argument(
        "--no-prefix-caching", action="store_true", help="disable automatic prefix caching"
    )
    g.add_argument(
        "--kv-offload-gb",
        "--swap-space",
        dest="kv_offload_gb",
        type=float,
        default=0.0,
        help="host memory per rank, in GiB, for KV blocks evicted from the device: prefixes "
        "come back by copy instead of recompute (default 0: off; --swap-space is an alias)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of each GPU's memory the engine may fill with weights, activations and "
        "KV cache (default 0.9); the KV cache gets what the profiled rest leaves",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=ATTENTION_BACKENDS,
        help="paged attention kernels (default auto: triton on CUDA, the torch reference "
        "elsewhere)",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly, without capturing CUDA graphs (debugging; saves the "
        "graphs' memory)",
    )
    g.add_argument(
        "--multi-rank-cuda-graphs",
        action="store_true",
        help="capture CUDA graphs at tensor-parallel size > 1 too (default: eager there until "
        "a multi-GPU run has matched graphs to eager)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "revision": args.revision,
        "device": args.device,
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel_size": args.expert_parallel_size or args.tensor_parallel_size,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size,
        "num_kv_blocks": args.num_kv_blocks,
        "enable_prefix_caching": not args.no_prefix_caching,
        "kv_offload_gb": args.kv_offload_gb,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "multi_rank_cuda_graphs": args.multi_rank_cuda_graphs,
    }


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from ernie_cluster.checkpoints.make_tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        args.directory, args.preset, args.seed, args.dtype, force=args.force
    )
    print(f"wrote the {args.preset!r} checkpoint (seed {args.seed}) to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ernie_cluster import LLM, SamplingParams

    llm = LLM(model=args.model, **engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    try:
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params)
        else:
            outputs = llm.generate([args.prompt], params)
        for out in outputs:
            for sample in out.outputs:
                print(
                    json.dumps(
                        {
                            "prompt": out.prompt if not args.chat else args.prompt,
                            "text": sample.text,
                            "token_ids": sample.token_ids,
                            "finish_reason": sample.finish_reason,
                        },
                        ensure_ascii=False,
                    )
                )
    finally:
        llm.shutdown()
    return 0


def serve_config_from_args(args: argparse.Namespace):
    from ernie_cluster.serving.ray_serve.config import AutoscalingConfig

    # NOTE: any autoscaling flag turns autoscaling on (so it conflicts with --num-replicas);
    # unset bounds default to 1 replica and unset delays to Ray's.
    autoscaling = None
    flags = (args.min_replicas, args.max_replicas, args.upscale_delay_s, args.downscale_delay_s)
    if any(flag is not None for flag in flags):
        autoscaling = AutoscalingConfig(
            min_replicas=args.min_replicas if args.min_replicas is not None else 1,
            max_replicas=args.max_replicas or max(1, args.min_replicas or 1),
            target_ongoing_requests=args.target_ongoing_requests,
            upscale_delay_s=args.upscale_delay_s,
            downscale_delay_s=args.downscale_delay_s,
        )
    engine = engine_kwargs(args)
    return ServeAppConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        api_key=args.api_key,
        api_key_file=args.api_key_file,
        api_key_all_routes=args.api_key_all_routes,
        max_waiting_requests=args.max_waiting_requests,
        num_replicas=args.num_replicas,
        autoscaling=autoscaling,
        single_hop=args.single_hop,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        limits=RequestLimits(**model_values(args, RequestLimits, prefix="limit_")),
        **model_values(args, ServeAppConfig, GRAMMAR_FIELDS),
        **{k: v for k, v in engine.items() if k in ServeAppConfig.model_fields},
    )


def serve_without_ray(args: argparse.Namespace, config) -> int:
    """One process: the engine (W = 1, in-process executor) and the HTTP app under uvicorn."""
    import asyncio

    from ernie_cluster.cli.ports import bind_exclusive
    from ernie_cluster.serving.local_server import build_local_app, make_server
    from ernie_cluster.serving.ray_serve.builder import resolve_model

    if config.tensor_parallel_size != 1 or config.num_replicas or config.autoscaling:
        raise ValueError(
            "--no-ray-serve runs one replica of one shard: drop --tensor-parallel-size "
            f"({config.tensor_parallel_size}) and the replica flags, or use Ray Serve"
        )
    # NOTE: the port is bound before the model loads, so a taken port fails in a second.
    sock = bind_exclusive(args.host, args.port)
    try:
        model = resolve_model(config)
        app, engine = build_local_app(
            config.engine_config(model),
            max_waiting_requests=config.max_waiting_requests,
            auth_all_routes=config.api_key_all_routes,
            served_model_names=config.served_model_name or [config.model or "ernie-demo"],
            reasoning_parser=config.reasoning_parser,
            tool_call_parser=config.tool_call_parser,
            api_key=config.api_key,
            max_request_body_bytes=config.max_request_body_bytes,
            limits=config.limits,
        )
        print(
            f"ernie-cluster: OpenAI API at http://{args.host}:{args.port}/v1 (one process, "
            f"model {config.served_model_name or [config.model or 'ernie-demo']}"
            f"{', API key required' if config.api_key else ''}); Ctrl-C stops",
            flush=True,
        )
        try:
            server = make_server(app, sock, max_header_bytes=config.limits.max_header_bytes)
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down
            pass
        finally:
            asyncio.run(engine.shutdown())
    finally:
        sock.close()
    return 0


def serve_is_running() -> bool:
    """Whether the connected Ray cluster already runs Serve (then its proxy holds the port,
    and `serve.start` reuses it)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


INGRESS_CPUS = 0.5
"""CPUs of each OpenAIIngress replica (serving/ray_serve/builder.py)."""


def app_resources(config, num_replicas: int) -> dict[str, float]:
    """CPUs and GPUs the Serve app reserves with `num_replicas` model replicas: each one's
    placement-group bundles (the replica and its shard workers) or actor, plus the ingress."""
    from ernie_cluster.serving.ray_serve.builder import llm_server_options

    options = llm_server_options(config)
    actor = options["ray_actor_options"]
    bundles = options.get("placement_group_bundles") or [
        {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)}
    ]
    need = {kind: num_replicas * sum(b.get(kind, 0) for b in bundles) for kind in ("CPU", "GPU")}
    if not config.single_hop:
        need["CPU"] += config.ingress_replicas * INGRESS_CPUS
    return need


def replica_bounds(config) -> tuple[int, int]:
    """(fewest, most) model replicas the app runs."""
    if config.autoscaling is None:
        return config.num_replicas or 1, config.num_replicas or 1
    scaling = config.autoscaling
    return max(1, scaling.initial_replicas or scaling.min_replicas), scaling.max_replicas


def local_num_cpus(config, requested: int | None) -> int:
    """Logical CPUs of a Ray started here: --num-cpus, else the cores, raised to what the app
    needs at its most replicas. NOTE: Ray counts CPUs logically, so on a small machine the
    shard workers then share cores (fine for CPU models; --num-cpus opts out)."""
    import math
    import os

    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    needed = math.ceil(app_resources(config, replica_bounds(config)[1])["CPU"])
    if needed > (cores or 1):
        print(
            f"ernie-cluster: Ray gets {needed} logical CPUs on {cores} cores so every shard "
            "worker can be placed (they share the cores; --num-cpus sets the count)",
            flush=True,
        )
    return max(cores or 1, needed)


def check_app_fits(config) -> None:
    """One line, at once, when this Ray cannot place the app's fewest replicas (instead of a
    replica that waits forever, with only an autoscaler line in Ray's log)."""
    import ray

    fewest = replica_bounds(config)[0]
    need = app_resources(config, fewest)
    have = ray.cluster_resources()
    short = [kind for kind, amount in need.items() if amount > have.get(kind, 0) + 1e-9]
    if short:
        hint = "raise --num-cpus" if "CPU" in short else "add GPUs"
        raise ValueError(
            f"the app cannot be placed: {fewest} model replica(s) of "
            f"{config.tensor_parallel_size} shard(s) plus the ingress need "
            f"{need['CPU']:g} CPUs and {need['GPU']:g} GPUs, this Ray has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; {hint} or lower "
            "--tensor-parallel-size / --num-replicas"
        )


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import time

    from ernie_cluster.cli.ports import check_port_free

    config = serve_config_from_args(args).with_api_key_resolved()
    if args.no_ray_serve:
        return serve_without_ray(args, config)
    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        # NOTE: a fresh local Ray owns nothing yet, so whatever holds the port is someone
        # else's; Ray Serve's proxy would share it (SO_REUSEPORT) and split the traffic.
        check_port_free(args.host, args.port)

    import ray
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app

    local = {} if address else {"num_cpus": local_num_cpus(config, args.num_cpus)}
    if not address and args.host in ("127.0.0.1", "localhost"):
        local["_node_ip_address"] = "127.0.0.1"  # a loopback server keeps its Ray on loopback
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
    if not address:  # a cluster may still add nodes; this Ray never will
        try:
            check_app_fits(config)
        except ValueError:
            ray.shutdown()
            raise
    if address and not serve_is_running():
        try:
            check_port_free(args.host, args.port)
        except ValueError:
            ray.shutdown()
            raise
    # NOTE: SIGTERM (docker stop, Kubernetes, a supervisor) must shut Serve and Ray down like
    # Ctrl-C does; SIGINT may arrive set to "ignore" (a background job). Installed after
    # ray.init, which sets a SIGTERM handler of its own.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    try:  # Ctrl-C during start-up must clean up too
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(config), name="ernie", route_prefix="/", blocking=False)
        print(
            f"ernie-cluster: OpenAI API at http://{args.host}:{args.port}/v1 "
            f"(model {config.served_model_name or [config.model or 'ernie-demo']}); Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ernie-cluster",
        description="Serve ERNIE-4.5 mixture-of-experts models (OpenAI-compatible, on Ray).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny", help="write a random checkpoint for tests and demos")
    tiny.add_argument("directory", help="output directory (created)")
    tiny.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tiny.add_argument(
        "--force", action="store_true", help="write into a directory that is not empty"
    )
    tiny.set_defaults(func=cmd_make_tiny)
    train_demo.add_parser(sub)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    add_engine_args(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model names clients send (default: --model)",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=["ernie_x1", "ernie45"],
        help="split reasoning_content from content",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=["ernie_x1", "ernie45"],
        help="parse <tool_call> blocks into tool_calls",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on the /v1 routes (visible in `ps`: prefer "
        f"--api-key-file or the {API_KEY_ENV} environment variable)",
    )
    g.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="read the API key from this file (one line)",
    )
    g.add_argument(
        "--api-key-all-routes",
        action="store_true",
        help="require the key on /metrics, /docs, /redoc and /openapi.json too (default: "
        "those and /health are open; /health always is)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="503 + Retry-After once this many requests wait in a replica",
    )
    g.add_argument(
        "--single-hop",
        action="store_true",
        help="run the HTTP app inside the model replicas: one Serve hop (lower latency) but "
        "no session affinity",
    )
    g.add_argument(
        "--no-ray-serve",
        action="store_true",
        help="serve from this one process with uvicorn, without Ray (one replica, W = 1): "
        "the smallest footprint, e.g. a single-GPU box",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (default: RAY_ADDRESS, else start one)",
    )
    g.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of a locally started Ray (default: the cores, or as many as the "
        "app's shard workers need, which then share the cores)",
    )
    add_model_args(srv, RequestLimits, "request limits (worded 400s beyond them)", prefix="limit_")
    add_model_args(srv, ServeAppConfig, "structured outputs (grammar compiles)", GRAMMAR_FIELDS)
    s_ = srv.add_argument_group("replicas (Ray Serve)")
    s_.add_argument("--num-replicas", type=int, default=None, help="fixed model replicas")
    s_.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    s_.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    s_.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=16.0,
        help="requests in flight per replica that autoscaling aims for",
    )
    s_.add_argument(
        "--upscale-delay-s",
        type=float,
        default=None,
        help="seconds load must stay above target before a replica is added "
        "(default: Ray's 30); implies autoscaling",
    )
    s_.add_argument(
        "--downscale-delay-s",
        type=float,
        default=None,
        help="seconds load must stay below target before a replica is removed "
        "(default: Ray's 600); implies autoscaling",
    )
    s_.add_argument(
        "--graceful-shutdown-timeout-s",
        type=float,
        default=300.0,
        help="seconds a model replica being removed may finish its requests (default 300)",
    )
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="offline generation for one prompt")
    add_engine_args(gen)
    gen.add_argument("--prompt", default="Hello, ERNIE!", help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    from ernie_cluster.cli.bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # NOTE: httpx logs every request at INFO: hundreds of lines under bench's progress bar.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
