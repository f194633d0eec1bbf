"""`--kv-offload-gb` (and FastDeploy's `--swap-space`) reach the engine and Serve configs."""

from __future__ import annotations

import pytest

from ernie_cluster.cli.main import build_parser
from ernie_cluster.cli.model_args import model_values
from ernie_cluster.cli.serve import serve_config_from_args
from ernie_cluster.config.engine_config import EngineConfig, EngineSettings


def engine_config(args) -> EngineConfig:
    return EngineConfig(**{**model_values(args, EngineSettings), "model": "m"})


@pytest.mark.parametrize("flag", ["--kv-offload-gb", "--swap-space"])
def test_the_flag_and_its_alias_reach_both_configs(flag):
    args = build_parser().parse_args(["serve", flag, "12.5"])
    assert serve_config_from_args(args).kv_offload_gb == 12.5
    config = engine_config(args)
    assert config.kv_offload_gb == 12.5 and config.kv_offload_enabled


def test_off_by_default_and_refused_without_prefix_caching():
    args = build_parser().parse_args(["generate"])
    assert not engine_config(args).kv_offload_enabled
    args = build_parser().parse_args(["generate", "--kv-offload-gb", "2", "--no-prefix-caching"])
    with pytest.raises(ValueError, match="needs prefix caching"):
        engine_config(args)
    with pytest.raises(ValueError, match=r"kv_offload_gb must be >= 0, got -1.0"):
        EngineConfig(model="m", kv_offload_gb=-1.0)
