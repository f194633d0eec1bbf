"""The chart's `serve.kvOffloadGb` reaches the engine as --kv-offload-gb (the host KV tier),
defaults to off, and a negative size fails at lint time."""

from __future__ import annotations

from chart_render import lint, only, render, serve_config

from ernie_cluster.serving.ray_serve.config import ServeAppConfig


def _args(values: dict) -> dict:
    (app,) = serve_config(only(render(values), "RayService"))["applications"]
    return app["args"]


def test_kv_offload_gb_reaches_the_engine_config():
    config = ServeAppConfig.model_validate(_args({"serve": {"kvOffloadGb": 24}}))
    assert config.kv_offload_gb == 24.0
    engine = config.engine_config("/models/x")
    assert engine.kv_offload_gb == 24.0 and engine.kv_offload_enabled


def test_kv_offload_is_off_by_default():
    config = ServeAppConfig.model_validate(_args({}))
    assert config.kv_offload_gb == 0.0
    assert not config.engine_config("/models/x").kv_offload_enabled


def test_a_negative_size_fails_lint():
    assert lint({"serve": {"kvOffloadGb": -1}})["errors"]
