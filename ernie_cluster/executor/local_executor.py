"""LocalExecutor: the single worker (W = 1) in the engine's own process, no Ray."""

from __future__ import annotations

import os

import torch

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.worker.worker import Worker


class LocalExecutor:
    """Implements `executor.base.Executor` with one in-process `Worker`."""

    # A failed step leaves the in-process worker consistent: the engine ends that batch's
    # requests (the worker drops their state) and keeps serving.
    recovers_from_step_errors = True

    def __init__(self, config: EngineConfig, model_dir: str) -> None:
        if config.world_size != 1:
            raise ValueError(
                f"LocalExecutor runs one shard; tensor_parallel_size={config.world_size} "
                "needs the Ray executor"
            )
        self.worker = Worker(config, model_dir, rank=0)
        self.num_kv_blocks = self.worker.num_kv_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def collective_rpc(self, method: str, *args, timeout: float | None = None) -> list:
        return [getattr(self.worker, method)(*args)]

    def expert_load(self) -> torch.Tensor:
        return self.worker.expert_load()

    def check_health(self) -> None:
        """Raises if the executor cannot run steps (never, in-process)."""

    def worker_pids(self) -> list[int]:
        """This process: the model runs in it."""
        return [os.getpid()]

    def shutdown(self) -> None:
        self.worker = None  # type: ignore[assignment]
