"""How checkpoint tensors land in our parameters.

A model describes, for every tensor name the full checkpoint holds, where (if anywhere) the
rank's copy goes and which slice of the checkpoint tensor it takes. The loader only reads and
copies; it never knows the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightTarget:
    """One checkpoint tensor: its full shape and the slice this rank copies into `dest`.

    `dest` is None when another rank owns the tensor (an expert or vocabulary slice held
    elsewhere): the loader checks the name exists but reads nothing.
    """

    full_shape: tuple[int, ...]
    dest: torch.Tensor | None
    src_dim: int = 0
    src_start: int = 0
    src_stop: int | None = None


def whole(dest: torch.Tensor) -> WeightTarget:
    return WeightTarget(tuple(dest.shape), dest)


def rows(dest: torch.Tensor, full_shape: tuple[int, ...], start: int) -> WeightTarget:
    """`dest` takes rows [start, start + len(dest)) of the checkpoint tensor (dim 0)."""
    return WeightTarget(full_shape, dest, 0, start, start + dest.shape[0])


def cols(dest: torch.Tensor, full_shape: tuple[int, ...], start: int) -> WeightTarget:
    """`dest` takes columns [start, start + dest.shape[1]) of the checkpoint tensor (dim 1)."""
    return WeightTarget(full_shape, dest, 1, start, start + dest.shape[1])


def elsewhere(full_shape: tuple[int, ...]) -> WeightTarget:
    return WeightTarget(full_shape, None)
