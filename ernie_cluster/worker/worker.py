"""One rank's worker: loads its shard of the model, sizes and owns its KV cache, runs steps.

The same class runs in-process (LocalExecutor) and inside a Ray actor (RayExecutor). It never
schedules: it executes the SchedulerOutput it is given.
"""

from __future__ import annotations

import logging

import torch

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        rank: int = 0,
        comm: Communicator | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.rank = rank
        self.device = device or torch.device(config.device)
        self.model_config = ErnieMoeConfig.from_pretrained(model_dir)
        shard = ShardSpec(rank, config.world_size)
        self.model = load_model(
            model_dir,
            dtype=config.dtype,
            shard=shard,
            device=self.device,
            config=self.model_config,
            show_progress=config.show_progress and rank == 0,
            comm=comm,
        )
        self.num_kv_blocks = self._num_kv_blocks()
        self.runner = ModelRunner(self.model, self.num_kv_blocks, config.block_size, self.device)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        logger.info(
            "rank %d: %d KV blocks of %d tokens", rank, self.num_kv_blocks, config.block_size
        )

    def bytes_per_block(self) -> int:
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.model.dtype.itemsize
        return per_token * len(self.model.layers) * self.config.block_size

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        budget = self.config.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.9)
            else:
                budget = CPU_KV_CACHE_BYTES
        num_blocks = min(budget // self.bytes_per_block(), self.config.num_blocks_cap())
        if num_blocks < 1:
            raise ValueError(
                f"KV cache budget {budget} bytes is smaller than one block "
                f"({self.bytes_per_block()} bytes)"
            )
        return num_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def expert_load(self) -> torch.Tensor:
        """[moe_layers, experts] tokens routed to this rank's experts since start."""
        return self.model.expert_load()

    def communication_bytes(self) -> dict[str, int]:
        """Bytes this rank has sent to the other ranks, by collective."""
        return dict(self.model.comm.bytes_sent)

    def resident_parameter_bytes(self) -> dict[str, int]:
        """Bytes of parameters held by this rank, by kind (routed experts vs the rest)."""
        sizes = {"experts": 0, "other": 0}
        for name, param in self.model.named_parameters():
            kind = "experts" if ".experts." in f".{name}." else "other"
            sizes[kind] += param.numel() * param.element_size()
        return sizes
