"""Executors: how the engine reaches its workers (in-process or Ray actors)."""

from __future__ import annotations

from ernie_cluster.config.engine_config import EngineConfig


def make_executor(config: EngineConfig, model_dir: str):
    """LocalExecutor for one shard; Ray actors otherwise."""
    if config.world_size == 1:
        from ernie_cluster.executor.local_executor import LocalExecutor

        return LocalExecutor(config, model_dir)
    from ernie_cluster.executor.ray_executor import RayExecutor

    return RayExecutor(config, model_dir)
