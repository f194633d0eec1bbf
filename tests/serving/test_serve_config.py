"""deploy/serve_config.yaml is a valid Serve config whose args load through ServeAppConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from ernie_cluster.serving.ray_serve.builder import build_app, llm_server_options
from ernie_cluster.serving.ray_serve.config import ServeAppConfig

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"


def test_serve_config_validates():
    raw = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "ernie_cluster.serving.ray_serve.builder:build_app"
    config = ServeAppConfig.model_validate(app.args)
    options = llm_server_options(config)
    assert options["placement_group_bundles"] == [{"CPU": 1}] + [{"GPU": 1, "CPU": 1}] * 4
    assert options["autoscaling_config"]["max_replicas"] == 2


def test_builder_makes_an_application(tiny_checkpoint):
    app = build_app({"model": str(tiny_checkpoint), "num_replicas": 2})
    assert type(app).__name__ == "Application"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"tensor_parallel_size": 2, "expert_parallel_size": 4}, "must equal"),
        ({"num_replicas": 2, "autoscaling": {"min_replicas": 1}}, "either num_replicas"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"autoscaling": {"upscale_delay_s": -1}}, "upscale_delay_s"),
        ({"autoscaling": {"look_back_period_s": 0}}, "look_back_period_s"),
        ({"reasoning_parser": "deepseek"}, "unknown reasoning_parser"),
        ({"nonsense": 1}, "Extra inputs"),
    ],
)
def test_bad_configs_rejected(args, message):
    with pytest.raises(ValidationError, match=message):
        ServeAppConfig.model_validate(args)


AUTOSCALING_KNOBS = {
    "initial_replicas": 2,
    "upscale_delay_s": 5.0,
    "downscale_delay_s": 0.0,
    "look_back_period_s": 10.0,
    "metrics_interval_s": 2.0,
}


def test_autoscaling_knobs_reach_serve():
    autoscaling = {"min_replicas": 1, "max_replicas": 3, **AUTOSCALING_KNOBS}
    options = llm_server_options(ServeAppConfig(autoscaling=autoscaling))
    assert options["autoscaling_config"] == {**autoscaling, "target_ongoing_requests": 16.0}
    ray_config = RayAutoscalingConfig(**options["autoscaling_config"])
    for name, value in AUTOSCALING_KNOBS.items():
        assert getattr(ray_config, name) == value


def test_unset_autoscaling_knobs_are_left_to_ray():
    options = llm_server_options(ServeAppConfig(autoscaling={"max_replicas": 2}))
    dumped = options["autoscaling_config"]
    assert dumped == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16.0}
    ray_config = RayAutoscalingConfig(**dumped)
    defaults = RayAutoscalingConfig()
    for name in AUTOSCALING_KNOBS:
        assert getattr(ray_config, name) == getattr(defaults, name)


@pytest.mark.parametrize("initial", [0, 4])
def test_initial_replicas_outside_bounds_rejected(initial):
    with pytest.raises(ValueError, match=rf"initial_replicas \({initial}\) .* = \[1, 3\]"):
        ServeAppConfig(
            autoscaling={"min_replicas": 1, "max_replicas": 3, "initial_replicas": initial}
        )


def test_model_replicas_drain_long_generations_on_scale_down():
    from ray import serve

    from ernie_cluster.serving.ray_serve.model_server import LLMServer

    default = llm_server_options(ServeAppConfig())
    assert default["graceful_shutdown_timeout_s"] == 300.0  # Ray's own 20 s cuts streams off
    options = llm_server_options(ServeAppConfig(graceful_shutdown_timeout_s=45))
    deployment = serve.deployment(LLMServer, **options)
    # NOTE: a private attribute, but the only place Serve keeps the value it will apply.
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 45.0
    with pytest.raises(ValidationError, match="graceful_shutdown_timeout_s"):
        ServeAppConfig(graceful_shutdown_timeout_s=-1)
