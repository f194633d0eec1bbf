"""`ernie-cluster serve`: its flags (the engine and serving ones made from `ServeAppConfig`'s
fields, plus where to listen and which Ray to use), the config they build, and the two ways
to run it: on Ray Serve, or in this one process under uvicorn (`--no-ray-serve`)."""

from __future__ import annotations

import argparse
import logging
import signal

from ernie_cluster.cli.model_args import add_model_args, argument_group, model_values
from ernie_cluster.config.engine_config import EngineSettings
from ernie_cluster.serving.limits import RequestLimits
from ernie_cluster.serving.ray_serve.config import AutoscalingConfig, ServeAppConfig

SERVER_FIELDS = [
    "served_model_name",
    "reasoning_parser",
    "tool_call_parser",
    "api_key",
    "api_key_file",
    "api_key_all_routes",
    "max_waiting_requests",
    "single_hop",
    "num_replicas",
    "graceful_shutdown_timeout_s",
]
"""ServeAppConfig's serving settings that are flags (the engine settings all are)."""


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    add_model_args(srv, EngineSettings, "model and engine")
    add_model_args(srv, ServeAppConfig, "server", SERVER_FIELDS)
    g = argument_group(srv, "server")
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
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
    # NOTE: any of these turns autoscaling on, so unset ones stay None to tell (see below).
    s_ = argument_group(srv, "replicas (Ray Serve)")
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
    srv.set_defaults(func=cmd_serve)


def serve_config_from_args(args: argparse.Namespace) -> ServeAppConfig:
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
    return ServeAppConfig(
        **model_values(args, EngineSettings),
        **model_values(args, ServeAppConfig, SERVER_FIELDS),
        autoscaling=autoscaling,
        limits=RequestLimits(**model_values(args, RequestLimits, prefix="limit_")),
    )


def serve_without_ray(args: argparse.Namespace, config: ServeAppConfig) -> int:
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
            served_model_names=config.served_model_names(),
            reasoning_parser=config.reasoning_parser,
            tool_call_parser=config.tool_call_parser,
            api_key=config.api_key,
            max_request_body_bytes=config.max_request_body_bytes,
            limits=config.limits,
        )
        print(
            f"ernie-cluster: OpenAI API at http://{args.host}:{args.port}/v1 (one process, "
            f"model {config.served_model_names()}"
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


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import time

    from ernie_cluster.cli.ports import check_port_free
    from ernie_cluster.cli.ray_resources import check_app_fits, local_num_cpus

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
            f"(model {config.served_model_names()}); Ctrl-C stops",
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
