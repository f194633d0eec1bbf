"""One rank's ModelRunner over a small checkpoint, as a worker builds it (float32, 4-token
blocks, 128 KV blocks): for worker and distributed tests that drive steps directly."""

from __future__ import annotations

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.worker.model_runner import ModelRunner


def make_runner(
    checkpoint, rank: int = 0, world: int = 1, device: str = "cpu", **overrides
) -> ModelRunner:
    """Rank `rank` of `world` (its shard and communicator; the process group, if any, is
    joined by the caller). Triton attention on a GPU, the torch reference on CPU."""
    from ernie_cluster.attention.selector import get_attention_backend
    from ernie_cluster.distributed.communicator import Communicator
    from ernie_cluster.loader.model_loader import load_model
    from ernie_cluster.model.sharding import ShardSpec

    settings = {"max_model_len": 256, "max_num_seqs": 8, "block_size": 4, **overrides}
    config = EngineConfig(
        model=str(checkpoint),
        dtype="float32",
        tensor_parallel_size=world,
        expert_parallel_size=world,
        show_progress=False,
        **settings,
    )
    model = load_model(
        checkpoint,
        dtype="float32",
        shard=ShardSpec(rank, world),
        show_progress=False,
        comm=Communicator(rank, world),
        device=device,
        backend=get_attention_backend("triton" if device != "cpu" else "torch", device),
    )
    return ModelRunner(model, num_blocks=128, config=config, device=device)
