"""When the runner captures CUDA graphs: on CUDA unless enforce_eager, and at W > 1 only with
multi_rank_cuda_graphs (until a multi-GPU run has matched graphs to eager)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.worker.model_runner import ModelRunner


@pytest.mark.parametrize(
    ("device", "world", "overrides", "captured"),
    [
        ("cuda", 1, {}, True),
        ("cuda", 1, {"enforce_eager": True}, False),
        ("cuda", 2, {}, False),
        ("cuda", 4, {}, False),
        ("cuda", 2, {"multi_rank_cuda_graphs": True}, True),
        ("cuda", 2, {"multi_rank_cuda_graphs": True, "enforce_eager": True}, False),
        ("cpu", 1, {}, False),
    ],
)
def test_capture_policy(device, world, overrides, captured):
    calls = []
    runner = SimpleNamespace(
        device=torch.device(device),
        config=EngineConfig(model="m", **overrides),
        model=SimpleNamespace(comm=SimpleNamespace(world_size=world)),
        capture_graphs=lambda: calls.append(True),
    )
    ModelRunner.capture_cuda_graphs(runner)
    assert bool(calls) is captured
