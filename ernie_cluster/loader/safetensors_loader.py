"""Loading a rank's weights from memory-mapped safetensors shards.

For every tensor the model's `weight_targets` names, read only the slice this rank owns
(`get_slice`, so unowned experts and head slices are never paged in) and copy it into the
parameter. Checks names and shapes first and fails with the tensor's name; `mtp*` tensors
(multi-token prediction heads) are skipped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ernie_cluster.loader.checkpoint_files import CheckpointError, weight_map
from ernie_cluster.loader.compressed_tensors import CompressedTensorsReader
from ernie_cluster.model.weights import WeightTarget

logger = logging.getLogger(__name__)

# Present in some checkpoints, never used for inference.
IGNORED_WHEN_TIED = ("lm_head.weight",)


def is_skipped(name: str) -> bool:
    return any(part.startswith("mtp") for part in name.split("."))


def load_weights(
    targets: dict[str, WeightTarget],
    model_dir: str | Path,
    show_progress: bool = True,
    ignored: tuple[str, ...] = (),
    quantized: CompressedTensorsReader | None = None,
) -> int:
    """Copy the checkpoint's tensors into `targets`; returns the number of bytes read.
    `quantized` serves a pre-quantized checkpoint's Linear weights, dequantized, under their
    unquantized names (loader/compressed_tensors)."""
    model_dir = Path(model_dir)
    files = weight_map(model_dir) if quantized is None else quantized.logical_files()
    present = {name for name in files if not is_skipped(name) and name not in ignored}
    missing = sorted(set(targets) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r} in {model_dir}{more}")
    unexpected = sorted(present - set(targets))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in {model_dir}{more}")

    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, _target in targets.items():
        by_file[files[name]].append(name)
    bytes_read = 0
    shards = sorted(by_file)
    progress = tqdm(
        shards, desc="Loading safetensors shards", unit="shard", disable=not show_progress
    )
    for file in progress:
        with safe_open(file, framework="pt") as handle:
            for name in by_file[file]:
                if quantized is not None and quantized.is_quantized(name):
                    bytes_read += quantized.copy(name, targets[name])
                else:
                    bytes_read += _copy_one(handle, name, targets[name])
    logger.info("loaded %.1f MiB from %d shards of %s", bytes_read / 2**20, len(shards), model_dir)
    return bytes_read


def _copy_one(handle, name: str, target: WeightTarget) -> int:
    tensor_slice = handle.get_slice(name)
    shape = tuple(tensor_slice.get_shape())
    if shape != target.full_shape:
        raise CheckpointError(
            f"tensor {name!r} has shape {list(shape)} in the checkpoint, "
            f"expected {list(target.full_shape)}"
        )
    if target.dest is None:
        return 0
    stop = shape[target.src_dim] if target.src_stop is None else target.src_stop
    index = [slice(None)] * len(shape)
    index[target.src_dim] = slice(target.src_start, stop)
    data: torch.Tensor = tensor_slice[tuple(index)]
    if tuple(data.shape) != tuple(target.dest.shape):
        raise CheckpointError(
            f"tensor {name!r}: slice {list(data.shape)} does not fit parameter "
            f"{list(target.dest.shape)}"
        )
    target.dest.copy_(data)
    return data.numel() * data.element_size()
