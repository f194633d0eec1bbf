"""Where the autoscaling load test runs: deploy mode starts Ray and Serve when they are not
running, deploys the app and deletes it afterwards; attach mode finds a running app (e.g. the
Helm chart's RayService) and never changes it. Both yield the `Target` the test loads and
watches."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ernie_cluster.bench.autoscale_timeline import replica_counts
from ernie_cluster.bench.client import wait_until_serving

if TYPE_CHECKING:
    from ernie_cluster.bench.autoscale import AutoscaleTestConfig

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENTS = ("LLMServer", "OpenAIServer")  # two-hop layout, single-hop layout
READY_TIMEOUT_S = 120.0


@dataclass
class Target:
    """The deployment under test."""

    base_url: str
    app: str
    deployment: str
    min_replicas: int
    max_replicas: int


# ------------------------------------------------------------------ deploy / attach
def _ray_init_kwargs(config: AutoscaleTestConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,  # the replicas' per-request logs would bury the summary
        "logging_level": logging.WARNING,
    }
    if config.ray_address or config.mode == "attach":
        return {**kwargs, "address": config.ray_address or "auto"}
    # NOTE: Ray counts CPUs logically: all max_replicas (each its shard workers, plus the
    # replica actor when sharded) and the ingress must fit, or the scale-up could never be
    # scheduled on a 2-core machine; oversubscribing a small CPU model is fine.
    tp = config.tensor_parallel_size
    needed = config.max_replicas * (tp + (tp > 1)) + 1
    return {
        **kwargs,
        "num_cpus": max(os.cpu_count() or 1, needed),
        "_node_ip_address": "127.0.0.1",
    }


@contextmanager
def serve_target(config: AutoscaleTestConfig) -> Iterator[Target]:
    """Connect to (or start) Ray, then deploy the app or find the running one; undo only
    what this function started."""
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(**_ray_init_kwargs(config))
    try:
        if config.mode == "attach":
            yield _attach(config)
        else:
            with _deploy(config) as target:
                yield target
    finally:
        if started_ray:
            ray.shutdown()


@contextmanager
def _deploy(config: AutoscaleTestConfig) -> Iterator[Target]:
    from ray import serve
    from ray.serve.context import _get_global_client

    from ernie_cluster.distributed.process_group import free_port
    from ernie_cluster.serving.ray_serve.builder import build_app

    app_config = config.serve_app_config()
    # NOTE: a private call, but the only way to learn whether Serve runs and on which port
    # (serve.start would silently keep the running instance's HTTP options).
    client = _get_global_client(raise_if_no_controller_running=False)
    started_serve = client is None
    deployed = False
    try:
        if started_serve:
            port = config.port or free_port()
            start_serve(port)
            host, prefix = "127.0.0.1", "/"
        else:
            http = client.http_config
            port = http.port
            host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "localhost") else http.host
            prefix = f"/{config.app}"  # another app may own "/"
            if config.port is not None and config.port != port:
                logger.warning(
                    "Serve runs on port %d already; --port %d is ignored", port, config.port
                )
        deployment = "OpenAIServer" if config.single_hop else "LLMServer"
        deployed = True
        serve.run(build_app(app_config), name=config.app, route_prefix=prefix, blocking=False)
        base_url = f"http://{host}:{port}{prefix.rstrip('/')}"
        problem = wait_until_serving(base_url, config.api_key, READY_TIMEOUT_S)
        if problem is not None:
            raise TimeoutError(
                f"{base_url} did not serve /v1/models within {READY_TIMEOUT_S:.0f} s ({problem})"
            )
        yield Target(base_url, config.app, deployment, config.min_replicas, config.max_replicas)
    finally:
        try:
            if deployed:
                serve.delete(config.app)
        finally:
            if started_serve:
                serve.shutdown()


def start_serve(port: int) -> None:
    """serve.start on 127.0.0.1:`port`, tolerating a proxy restart while it starts."""
    from ray import serve
    from ray.exceptions import RayActorError

    options = {"host": "127.0.0.1", "port": port}
    try:
        serve.start(http_options=options)
    except RayActorError as exc:
        # NOTE: on a starved machine the controller kills and restarts a proxy that missed
        # three 5 s readiness checks, and serve.start, waiting on that proxy, fails. The
        # controller lives on: connecting again is enough (wait_until_serving then waits
        # for the new proxy).
        logger.warning("Serve's proxy restarted while Serve started (%s); connecting again", exc)
        serve.start(http_options=options)


def _attach(config: AutoscaleTestConfig) -> Target:
    from ray import serve

    application = serve.status().applications.get(config.app)
    if application is None:
        running = sorted(serve.status().applications)
        raise ValueError(f"no Serve application {config.app!r} runs here; running: {running}")
    names = list(application.deployments)
    deployment = config.deployment or next((n for n in MODEL_DEPLOYMENTS if n in names), None)
    if deployment not in names:
        raise ValueError(
            f"application {config.app!r} has no deployment {deployment!r}; it has {names} "
            "(pass --deployment)"
        )
    low, high = live_bounds(config.app, deployment) or (config.min_replicas, config.max_replicas)
    if (low, high) != (config.min_replicas, config.max_replicas):
        logger.info("checking against the deployment's own bounds: %d..%d replicas", low, high)
    return Target(config.base_url.rstrip("/"), config.app, deployment, low, high)


def live_bounds(app: str, deployment: str) -> tuple[int, int] | None:
    """(min_replicas, max_replicas) of a running autoscaling deployment, if readable (the
    controller's instance details: a private client API, so best effort)."""
    try:
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        options = details["applications"][app]["deployments"][deployment]["deployment_config"]
        scaling = options["autoscaling_config"]
        return int(scaling["min_replicas"]), int(scaling["max_replicas"])
    except Exception as exc:
        logger.debug("no live autoscaling bounds: %s", exc)
        return None


def wait_for_replicas(target: Target, count: int, timeout_s: float, period_s: float) -> bool:
    """Until exactly `count` replicas run and none starts or stops; False on time-out."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = replica_counts(target.app, target.deployment)
        if states.get("RUNNING", 0) == count and sum(states.values()) == count:
            return True
        if time.monotonic() >= deadline:
            logger.warning("replicas of %s: %s, not %d RUNNING", target.deployment, states, count)
            return False
        time.sleep(period_s)
