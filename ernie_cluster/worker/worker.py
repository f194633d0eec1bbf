"""One rank's worker: loads its shard of the model (and on rank 0 a draft_model's draft,
worker/draft_runner, or ernie_mtp's MTP layer, worker/mtp_runner), sizes
(worker/kv_cache_sizing) and owns its KV cache, runs steps.

The same class runs in-process (LocalExecutor) and inside a Ray actor (RayExecutor). It never
schedules: it executes the SchedulerOutput it is given.
"""

from __future__ import annotations

import logging

import torch

from ernie_cluster.attention.selector import get_attention_backend
from ernie_cluster.config.engine_config import EngineConfig, max_model_len_for
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.quantization.apply import weight_bytes
from ernie_cluster.step_io import ModelRunnerOutput, SchedulerOutput
from ernie_cluster.worker.draft_runner import DraftRunner, load_draft_model
from ernie_cluster.worker.kv_cache_sizing import determine_num_kv_blocks
from ernie_cluster.worker.model_runner import ModelRunner
from ernie_cluster.worker.mtp_runner import MTPRunner, load_mtp_model

logger = logging.getLogger(__name__)


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
        if self.device.type == "cuda":
            # NOTE: Triton and torch launch on the current device, not the tensors'; every
            # executor (not only Ray's) must make this rank's GPU current.
            torch.cuda.set_device(self.device)
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
            backend=get_attention_backend(config.attention_backend, self.device),
            quantization=config.quantization,
            kv_cache_dtype=config.kv_cache_dtype,
        )
        # NOTE: a max_model_len beyond the checkpoint's max_position_embeddings needs more
        # RoPE rows than the model builds by default.
        self.model.rotary.extend(max_model_len_for(config.max_model_len, self.model.config))
        # NOTE: a draft model (draft_model) loads on rank 0 before sizing, which counts its
        # weights as used memory and its KV in each block's bytes.
        draft = load_draft_model(config, self.model, self.device) if rank == 0 else None
        mtp = load_mtp_model(config, model_dir, self.model, self.device, rank)  # ernie_mtp
        # NOTE: the MTP layer's KV, like a draft's, is one more cache of the same blocks.
        sized = draft if draft is not None else mtp
        self.num_kv_blocks = determine_num_kv_blocks(self.model, config, self.device, draft=sized)
        self.runner = ModelRunner(self.model, self.num_kv_blocks, config, self.device)
        if draft is not None:
            self.runner.draft = DraftRunner(draft, self.runner)
        if mtp is not None:
            self.runner.draft = MTPRunner(mtp, self.runner)
        self.runner.capture_cuda_graphs()
        # NOTE: the profiling and capture forwards routed dummy tokens; served load starts here.
        for name, buffer in self.model.named_buffers():
            if name.endswith("tokens_per_expert"):
                buffer.zero_()
        # NOTE: start-up traffic (the profiling forward) is not part of the served steps'.
        self._bytes_sent_at_start = dict(self.model.comm.bytes_sent)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        weights = weight_bytes(self.model)
        logger.info(
            "rank %d: weights %.1f MB (experts %.1f MB)%s, %d KV blocks of %d tokens",
            rank,
            sum(weights.values()) / 1e6,
            weights["experts"] / 1e6,
            f", {config.quantization}" if config.quantization else "",
            self.num_kv_blocks,
            config.block_size,
        )

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def host_kv_tier(self) -> tuple[int, int]:
        """(host KV blocks, bytes per block) of this rank's host tier; (0, 0) when off."""
        pool = self.runner.kv_offload
        return (0, 0) if pool is None else (pool.num_host_blocks, pool.block_bytes)

    def expert_load(self) -> torch.Tensor:
        """[moe_layers, experts] tokens routed to this rank's experts since start."""
        return self.model.expert_load()

    def communication_bytes(self) -> dict[str, int]:
        """Bytes this rank has sent to the other ranks since start-up, by collective."""
        start = self._bytes_sent_at_start
        return {name: n - start.get(name, 0) for name, n in self.model.comm.bytes_sent.items()}

    def resident_parameter_bytes(self) -> dict[str, int]:
        """Bytes of weights held by this rank, by kind (routed experts vs the rest), quantized
        ones at their resident size."""
        return weight_bytes(self.model)
