"""What a Serve app reserves on Ray, planned before it is deployed: CPUs and GPUs per replica
(placement-group bundles plus the ingress), the logical CPUs a locally started Ray gets, and
the one-line refusal when this Ray cannot place the app's fewest replicas."""

from __future__ import annotations

import math
import os

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
