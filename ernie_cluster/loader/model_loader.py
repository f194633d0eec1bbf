"""Build a rank's model from a checkpoint directory: config, parameters, weights."""

from __future__ import annotations

from pathlib import Path

import torch

from ernie_cluster.attention.backend import AttentionBackend
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.loader.safetensors_loader import IGNORED_WHEN_TIED, load_weights
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.model.sharding import ShardSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, config: ErnieMoeConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {[*DTYPES, 'auto']}")
    return DTYPES[name]


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    shard: ShardSpec | None = None,
    device: str | torch.device = "cpu",
    backend: AttentionBackend | None = None,
    config: ErnieMoeConfig | None = None,
    show_progress: bool = True,
    comm: Communicator | None = None,
) -> Ernie4_5_MoeForCausalLM:
    config = config or ErnieMoeConfig.from_pretrained(model_dir)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device):
        model = Ernie4_5_MoeForCausalLM(config, torch_dtype, shard, backend, comm)
    ignored = IGNORED_WHEN_TIED if config.tie_word_embeddings else ()
    load_weights(model.weight_targets(), model_dir, show_progress=show_progress, ignored=ignored)
    return model.eval()
