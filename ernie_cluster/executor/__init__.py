"""Executors: how the engine reaches its workers (in-process or Ray actors)."""

from __future__ import annotations

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.executor.base import Executor, WorkerDiedError

__all__ = ["Executor", "WorkerDiedError", "make_executor"]


def make_executor(
    config: EngineConfig,
    model_dir: str,
    placement_strategy: str = "STRICT_PACK",
    cpus_per_worker: int = 1,
) -> Executor:
    """LocalExecutor for one shard; Ray actors otherwise (placed with `placement_strategy`,
    `cpus_per_worker` CPUs each when they run on CPU)."""
    if config.world_size == 1:
        from ernie_cluster.executor.local_executor import LocalExecutor

        return LocalExecutor(config, model_dir)
    from ernie_cluster.executor.ray_executor import RayExecutor

    return RayExecutor(
        config, model_dir, placement_strategy=placement_strategy, cpus_per_worker=cpus_per_worker
    )
