"""EngineConfig's GPU fast-path flags: defaults, and ValueErrors that name the numbers."""

from __future__ import annotations

import pytest

from ernie_cluster.config.engine_config import EngineConfig


def test_gpu_flag_defaults():
    config = EngineConfig(model="m")
    assert config.gpu_memory_utilization == 0.9
    assert config.attention_backend == "auto"
    assert config.enforce_eager is False


@pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
def test_gpu_memory_utilization_range(value):
    with pytest.raises(ValueError, match=rf"must be in \(0, 1\], got {value}"):
        EngineConfig(model="m", gpu_memory_utilization=value)
    assert EngineConfig(model="m", gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0


def test_attention_backend_names():
    for name in ("auto", "triton", "torch"):
        assert EngineConfig(model="m", attention_backend=name).attention_backend == name
    with pytest.raises(ValueError, match=r"unknown attention_backend 'flash'.*'triton'"):
        EngineConfig(model="m", attention_backend="flash")
