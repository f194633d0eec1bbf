"""Build the Ray Serve application from a ServeAppConfig.

`build_app` is the import path for `serve run` and KubeRay's serveConfigV2 (args are the
ServeAppConfig fields, the API key resolved from api_key_file or ERNIE_CLUSTER_API_KEY); the
CLI calls it too. Model replicas get their shard workers' resources as Serve placement-group
bundles (bundle 0: the replica itself), so autoscaling adds whole model instances.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from ernie_cluster.serving.ray_serve.config import ServeAppConfig
from ernie_cluster.serving.ray_serve.ingress import OpenAIIngress
from ernie_cluster.serving.ray_serve.model_server import LLMServer, OpenAIServer
from ernie_cluster.serving.ray_serve.router import SessionAffinityRouter


def resolve_model(config: ServeAppConfig) -> str:
    if config.model is not None:
        return config.model
    from ernie_cluster.checkpoints.demo import demo_checkpoint

    return str(demo_checkpoint())


def llm_server_options(config: ServeAppConfig) -> dict[str, Any]:
    use_gpu = config.device.startswith("cuda")
    world = config.tensor_parallel_size
    options: dict[str, Any] = {
        "name": "LLMServer",
        "max_ongoing_requests": config.max_num_seqs
        + (config.max_waiting_requests or 3 * config.max_num_seqs),
        "request_router_config": RequestRouterConfig(request_router_class=SessionAffinityRouter),
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
    }
    if world == 1:
        options["ray_actor_options"] = (
            {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": config.cpus_per_worker}
        )
    else:
        worker = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": config.cpus_per_worker}
        options["ray_actor_options"] = {"num_cpus": 1}
        options["placement_group_bundles"] = [{"CPU": 1}] + [dict(worker)] * world
        options["placement_group_strategy"] = config.placement_strategy
    if config.autoscaling is not None:
        # NOTE: unset (None) fields are left out so Ray applies its own defaults.
        options["autoscaling_config"] = config.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = config.num_replicas or 1
    return options


def build_app(args: dict[str, Any] | ServeAppConfig) -> serve.Application:
    config = args if isinstance(args, ServeAppConfig) else ServeAppConfig.model_validate(args)
    # NOTE: the key is read here, where the app is built (the Serve controller's node under
    # KubeRay, whose pods carry it from a Secret), and travels to the ingress inside Ray.
    config = config.with_api_key_resolved()
    model = resolve_model(config)
    dumped = config.model_dump()
    board = (
        "ernie-stats-"
        + hashlib.blake2b(repr(sorted(dumped.items())).encode(), digest_size=6).hexdigest()
    )
    server_args = (
        config.engine_config(model),
        config.max_waiting_requests,
        board,
        config.placement_strategy,
        config.cpus_per_worker,
    )
    if config.single_hop:
        options = {**llm_server_options(config), "name": "OpenAIServer"}
        return serve.deployment(serve.ingress()(OpenAIServer), **options).bind(
            *server_args, dumped, model
        )
    llm = serve.deployment(LLMServer, **llm_server_options(config)).bind(*server_args)
    ingress_cls = serve.ingress()(OpenAIIngress)
    ingress = serve.deployment(
        ingress_cls,
        name="OpenAIIngress",
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=1024,
    )
    return ingress.bind(llm, dumped, model, board)
