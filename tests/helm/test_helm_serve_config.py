"""The serveConfigV2 the chart renders loads through ServeAppConfig (the model behind
`serve run deploy/serve_config.yaml`), carries the values it was rendered from, and asks for
resources a worker pod of the chart can give."""

from __future__ import annotations

import math

import pytest
import yaml
from chart_render import EXAMPLES, REPO_ROOT, chart, load_values, only, render, serve_config
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

from ernie_cluster.serving.ray_serve.builder import llm_server_options
from ernie_cluster.serving.ray_serve.config import ServeAppConfig

DEPLOY_SERVE_CONFIG = yaml.safe_load((REPO_ROOT / "deploy" / "serve_config.yaml").read_text())
VALUE_SETS = {"defaults": {}, **{path.stem: load_values(path) for path in EXAMPLES}}
VALUE_SETS["no-parsers-no-max-len"] = {
    "serve": {"reasoningParser": None, "toolCallParser": None, "maxModelLen": None},
    "model": {"revision": "main", "servedModelNames": ["ernie", "ernie-4.5"]},
}
VALUE_SETS["autoscaling-delays"] = {
    "serve": {"autoscaling": {"upscaleDelayS": 0, "downscaleDelayS": 45.5}}
}


@pytest.fixture(params=sorted(VALUE_SETS), ids=sorted(VALUE_SETS))
def values(request) -> dict:
    return VALUE_SETS[request.param]


def _app(values: dict) -> dict:
    config = serve_config(only(render(values), "RayService"))
    (app,) = config["applications"]
    return app


def test_round_trips_through_serve_app_config(values):
    # NOTE: Helm drops null values when it merges, so nullable keys are read with .get().
    merged = chart().merge_values(values)
    model, serve = merged["model"], merged["serve"]
    config = ServeAppConfig.model_validate(_app(values)["args"])

    assert config.model == model["name"]
    assert config.revision == model.get("revision")
    assert config.served_model_name == (model.get("servedModelNames") or [model["name"]])
    assert config.dtype == model["dtype"]
    assert config.device == "cuda"
    assert config.tensor_parallel_size == serve["tensorParallelSize"]
    assert config.expert_parallel_size == (
        serve.get("expertParallelSize") or serve["tensorParallelSize"]
    )
    assert config.max_model_len == serve.get("maxModelLen")
    assert config.max_num_seqs == serve["maxNumSeqs"]
    assert config.max_num_batched_tokens == serve["maxNumBatchedTokens"]
    assert config.gpu_memory_utilization == serve["gpuMemoryUtilization"]
    assert config.enable_prefix_caching is serve["enablePrefixCaching"]
    assert config.max_waiting_requests == serve.get("maxWaitingRequests")
    assert config.reasoning_parser == serve.get("reasoningParser")
    assert config.tool_call_parser == serve.get("toolCallParser")
    assert config.num_replicas is None
    assert config.autoscaling is not None
    assert config.autoscaling.min_replicas == serve["autoscaling"]["minReplicas"]
    assert config.autoscaling.max_replicas == serve["autoscaling"]["maxReplicas"]
    assert (
        config.autoscaling.target_ongoing_requests == serve["autoscaling"]["targetOngoingRequests"]
    )
    assert config.autoscaling.upscale_delay_s == serve["autoscaling"].get("upscaleDelayS")
    assert config.autoscaling.downscale_delay_s == serve["autoscaling"].get("downscaleDelayS")
    assert config.ingress_replicas == serve["ingressReplicas"]
    assert config.placement_strategy == serve["placementStrategy"]


def test_same_shape_as_deploy_serve_config(values):
    config = serve_config(only(render(values), "RayService"))
    assert config.keys() == DEPLOY_SERVE_CONFIG.keys()
    assert config["proxy_location"] == DEPLOY_SERVE_CONFIG["proxy_location"]
    assert config["http_options"]["port"] == chart().merge_values(values)["serve"]["httpPort"]
    (app,) = config["applications"]
    (deploy_app,) = DEPLOY_SERVE_CONFIG["applications"]
    assert app.keys() == deploy_app.keys()
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == deploy_app[key]


def test_defaults_equal_deploy_serve_config():
    (deploy_app,) = DEPLOY_SERVE_CONFIG["applications"]
    chart_config = ServeAppConfig.model_validate(_app({})["args"])
    assert chart_config == ServeAppConfig.model_validate(deploy_app["args"])


def test_autoscaling_delays_render_only_when_set():
    assert _app({})["args"]["autoscaling"].keys() == {
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
    }
    args = _app(VALUE_SETS["autoscaling-delays"])["args"]
    assert args["autoscaling"]["upscale_delay_s"] == 0
    assert args["autoscaling"]["downscale_delay_s"] == 45.5
    options = llm_server_options(ServeAppConfig.model_validate(args))
    ray_config = RayAutoscalingConfig(**options["autoscaling_config"])
    assert (ray_config.upscale_delay_s, ray_config.downscale_delay_s) == (0, 45.5)


def test_extra_args_reach_the_config():
    args = _app({"serve": {"extraArgs": {"num_kv_blocks": 4096, "max_num_seqs": 48}}})["args"]
    config = ServeAppConfig.model_validate(args)
    assert (config.num_kv_blocks, config.max_num_seqs) == (4096, 48)
    with pytest.raises(ValidationError, match="not_a_field"):
        ServeAppConfig.model_validate(_app({"serve": {"extraArgs": {"not_a_field": 1}}})["args"])


def test_replicas_fit_the_worker_pods(values):
    """What the builder asks Ray for per replica (one STRICT_PACK placement group, or one actor
    at W = 1) fits a worker pod, and the worker group can hold max_replicas of them."""
    config = ServeAppConfig.model_validate(_app(values)["args"])
    options = llm_server_options(config)
    if "placement_group_bundles" in options:
        assert options["placement_group_strategy"] == "STRICT_PACK"
        bundles = options["placement_group_bundles"]
        gpus = sum(bundle.get("GPU", 0) for bundle in bundles)
        cpus = sum(bundle.get("CPU", 0) for bundle in bundles)
    else:
        gpus = options["ray_actor_options"]["num_gpus"]
        cpus = options["ray_actor_options"]["num_cpus"]
    assert gpus == config.tensor_parallel_size

    cluster = only(render(values), "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    pod_gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    pod_cpus = int(container["resources"]["limits"]["cpu"])
    per_pod = pod_gpus // gpus
    assert per_pod >= 1 and per_pod * cpus <= pod_cpus
    assert group["maxReplicas"] * per_pod >= config.autoscaling.max_replicas
    assert group["minReplicas"] == math.ceil(config.autoscaling.min_replicas / per_pod) or (
        not cluster["enableInTreeAutoscaling"]
    )
