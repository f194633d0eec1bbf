"""Shared fixtures: generated checkpoints (ours and transformers') and the shared/ folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS_DIR))

REPO_ROOT = TESTS_DIR.parent
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from ernie_cluster_tools.fixtures.make_tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session (explicit CPUs: the shards are CPU
    bundles and two W = 2 engines must fit at once)."""
    import ray

    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _cpu_paths_restored():
    """Tools that run the GPU path on CPU tensors (kernel_counter.use_gpu_path) switch the
    process-wide CPU-only paths off; no test may inherit that from an earlier one."""
    yield
    from ernie_cluster import cpu_bf16

    cpu_bf16.set_cpu_paths(True)
