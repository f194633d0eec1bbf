"""Collectives between the ranks of one model instance, over rows of token tensors.

The model calls these and nothing else of torch.distributed, so one rank (W = 1) runs the same
code with every collective an identity. Works on NCCL (GPU) and gloo (CPU). Every split is
even, so no collective needs sizes read back from the device. Never holds model state.
What carries the bytes is a `Collectives`, chosen once at worker start: torch.distributed,
or the graph-safe NCCL communicator (distributed/nccl) when W > 1 graphs are captured.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist

from ernie_cluster.distributed.layout import ring_all_reduce_bytes

# NOTE: torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor; older releases
# (the GPU image) lack the new names. Both take (output, input, ...).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Collectives(Protocol):
    """The wire under a Communicator: collectives of every rank of the instance, into buffers
    the caller made (same dtype, contiguous, equal splits)."""

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp) -> None: ...

    def all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None: ...

    def reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None: ...

    def all_to_all(self, out: torch.Tensor, x: torch.Tensor) -> None: ...

    def broadcast(self, x: torch.Tensor, src: int) -> None: ...


class TorchCollectives:
    """Collectives of torch.distributed's default process group (NCCL or gloo)."""

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp) -> None:
        dist.all_reduce(x, op=op)

    def all_gather(self, out: torch.Tensor, x: torch.Tensor) -> None:
        _all_gather_single(out, x)

    def reduce_scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        _reduce_scatter_single(out, x)

    def all_to_all(self, out: torch.Tensor, x: torch.Tensor) -> None:
        dist.all_to_all_single(out, x)

    def broadcast(self, x: torch.Tensor, src: int) -> None:
        dist.broadcast(x, src=src)


class Communicator:
    """Collectives of every rank of the instance, over `collectives` (torch.distributed's
    default process group unless given)."""

    def __init__(
        self, rank: int = 0, world_size: int = 1, collectives: Collectives | None = None
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.collectives = collectives or TorchCollectives()
        # Bytes this rank sent to OTHER ranks, by collective, known on the host ...
        self._host_bytes: dict[str, int] = {
            "all_gather": 0,
            "reduce_scatter": 0,
            "all_to_all": 0,
            "all_to_all_padded": 0,
            "all_reduce": 0,
        }
        # ... and counted on the device where the count is a device value (0-dim int64, made
        # on first use); added to in place, so CUDA-graph replays count too.
        self._device_bytes: dict[str, torch.Tensor] = {}

    @property
    def bytes_sent(self) -> dict[str, int]:
        """Bytes this rank has sent to OTHER ranks, by collective (benchmarks and stats).

        "all_to_all" counts the rows that carry data, "all_to_all_padded" the whole fixed
        buffers (what crossed the wire). Reading this waits for the device: read it between
        steps, never inside one.
        """
        totals = dict(self._host_bytes)
        for name, count in self._device_bytes.items():
            totals[name] += int(count)
        return totals

    def host_bytes_snapshot(self) -> dict[str, int]:
        """The host-side counts alone (what a CUDA-graph capture adds, see add_host_bytes)."""
        return dict(self._host_bytes)

    def add_host_bytes(self, delta: dict[str, int]) -> None:
        """Count a graph replay's collectives: Python does not run them, so the host-side
        counts of its capture are added again per replay."""
        for name, count in delta.items():
            self._host_bytes[name] += count

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
        self.collectives.all_gather(out, x.contiguous())
        self._host_bytes["all_gather"] += x.numel() * x.element_size() * (self.world_size - 1)
        return out

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[W * n, ...] partial sums on each rank -> this rank's [n, ...] block of the sum."""
        if self.world_size == 1:
            return x
        out = x.new_empty((x.shape[0] // self.world_size, *x.shape[1:]))
        self.collectives.reduce_scatter(out, x.contiguous())
        self._host_bytes["reduce_scatter"] += (
            out.numel() * out.element_size() * (self.world_size - 1)
        )
        return out

    def all_reduce(self, x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `x` across ranks in place (sum by default) and return it. Counted as a
        ring all-reduce sends: 2 (W - 1) / W of the payload (distributed/layout)."""
        if self.world_size > 1:
            self.collectives.all_reduce(x, op)
            payload = x.numel() * x.element_size()
            self._host_bytes["all_reduce"] += ring_all_reduce_bytes(payload, self.world_size)
        return x

    def all_to_all_fixed(
        self, x: torch.Tensor, valid_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[W * C, ...]: block d (rows d*C .. d*C + C) goes to rank d -> [W * C, ...] where block
        s came from rank s. Equal splits, so no sizes are exchanged and nothing is synced.

        `valid_rows` (0-dim integer tensor on x's device): rows of `x` bound to other ranks that
        carry data, counted into bytes_sent["all_to_all"] on the device; without it every row
        bound to another rank counts. bytes_sent["all_to_all_padded"] counts the whole buffer.
        """
        if self.world_size == 1:
            return x
        if x.shape[0] % self.world_size:
            raise ValueError(f"{x.shape[0]} rows do not split evenly over {self.world_size} ranks")
        out = torch.empty_like(x)
        self.collectives.all_to_all(out, x.contiguous())
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        remote_rows = x.shape[0] // self.world_size * (self.world_size - 1)
        self._host_bytes["all_to_all_padded"] += remote_rows * row_bytes
        if valid_rows is None:
            self._host_bytes["all_to_all"] += remote_rows * row_bytes
        else:
            self._device_counter("all_to_all", x.device).add_(valid_rows, alpha=row_bytes)
        return out

    def _device_counter(self, name: str, device: torch.device) -> torch.Tensor:
        counter = self._device_bytes.get(name)
        if counter is None:
            # NOTE: a normal tensor even when first used under inference_mode, so the in-place
            # adds also work outside it (an inference tensor refuses them there).
            with torch.inference_mode(False):
                counter = torch.zeros((), dtype=torch.long, device=device)
            self._device_bytes[name] = counter
        return counter

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on rank 0 (others get None).
        NOTE: always torch.distributed: it gathers logits after the forward, never captured."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            self.collectives.broadcast(x, 0)
        return x


SINGLE_RANK = Communicator()
