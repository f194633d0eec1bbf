"""Collectives between the ranks of one model instance, over rows of token tensors.

The model calls these and nothing else of torch.distributed, so one rank (W = 1) runs the same
code with every collective an identity. Works on NCCL (GPU) and gloo (CPU). Uneven
all-to-all splits are exchanged as counts first. Never holds model state.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# NOTE: torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor; older releases
# (the GPU image) lack the new names. Both take (output, input, ...).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Communicator:
    """Collectives of the default process group (every rank of the instance)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank = rank
        self.world_size = world_size
        # Bytes this rank sent to OTHER ranks, by collective (for the benchmarks and stats).
        self.bytes_sent: dict[str, int] = {"all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def pad_rows(self, num_rows: int) -> int:
        """Rows after padding to a multiple of the world size."""
        return -(-num_rows // self.world_size) * self.world_size

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[n, ...] on each rank -> [W * n, ...] (rank order)."""
        if self.world_size == 1:
            return x
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        self.bytes_sent["all_gather"] += x.numel() * x.element_size() * (self.world_size - 1)
        return out

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[W * n, ...] partial sums on each rank -> this rank's [n, ...] block of the sum."""
        if self.world_size == 1:
            return x
        out = x.new_empty((x.shape[0] // self.world_size, *x.shape[1:]))
        _reduce_scatter_single(out, x.contiguous())
        self.bytes_sent["reduce_scatter"] += (
            out.numel() * out.element_size() * (self.world_size - 1)
        )
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [W] int64 (rows for each rank) -> rows each rank sends to this one."""
        if self.world_size == 1:
            return send_counts.clone()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        return recv_counts

    def all_to_all_rows(
        self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Rows of `x` grouped by destination rank -> rows received, grouped by source rank."""
        if self.world_size == 1:
            return x
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        remote_rows = sum(send_counts) - send_counts[self.rank]
        self.bytes_sent["all_to_all"] += remote_rows * row_bytes
        return out

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on rank 0 (others get None)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src=0)
        return x


SINGLE_RANK = Communicator()
