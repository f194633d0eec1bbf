"""deploy/serve_config.yaml is a valid Serve config whose args load through ServeAppConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
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
        ({"reasoning_parser": "deepseek"}, "unknown reasoning_parser"),
        ({"nonsense": 1}, "Extra inputs"),
    ],
)
def test_bad_configs_rejected(args, message):
    with pytest.raises(ValidationError, match=message):
        ServeAppConfig.model_validate(args)
