"""This rank's host KV pool and the copies the scheduler asks for (the host tier's data path).

Each rank keeps host blocks in the same per-rank layout as its device shard (its own kv heads)
and runs the step's copies on its own shard: saves (device -> host) then loads (host ->
device). On CUDA the host pool is pinned and the copies run non-blocking on a side stream; the
step's forward waits (on the GPU, never the host) for the saves, because it overwrites the
saved blocks, and the next step's forward waits for the loads, so loading one request's blocks
overlaps the other requests' forward. On CPU the copies are plain tensor copies. Blocks move as
they are stored: an fp8 cache's blocks are copied as bytes (its scales stay with the layer, so a
block comes back bit-exact). Never decides which blocks move.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ernie_cluster.attention.kv_quant import is_fp8

GIB = 1 << 30


def kv_block_bytes(kv_caches: Sequence[torch.Tensor], block_size: int) -> int:
    """Bytes of one block of this rank's KV, all layers (K and V)."""
    return sum(block_size * c[0, 0].numel() * 2 * c.element_size() for c in kv_caches)


def runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(src, dst, length) runs of consecutive ids on both sides, in the pairs' order."""
    merged: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if merged:
            first_src, first_dst, length = merged[-1]
            if src == first_src + length and dst == first_dst + length:
                merged[-1] = (first_src, first_dst, length + 1)
                continue
        merged.append((src, dst, 1))
    return merged


class HostKVPool:
    """`num_host_blocks` blocks per layer on the host, shaped like the device blocks."""

    def __init__(
        self, kv_caches: list[torch.Tensor], block_size: int, num_host_blocks: int
    ) -> None:
        if num_host_blocks < 1:
            raise ValueError(f"num_host_blocks must be >= 1, got {num_host_blocks}")
        self.device = kv_caches[0].device
        # (2, slots, H, D) -> (2, blocks, block_size, H, D): a block is one index of dim 1.
        self.device_blocks = [
            _copyable(c).view(2, c.shape[1] // block_size, block_size, *c.shape[2:])
            for c in kv_caches
        ]
        pin = self.device.type == "cuda"
        # NOTE: empty, not zeros: a slot is read only after a save wrote it, and zeroing tens of
        # GiB of pinned memory would delay start-up.
        self.host_blocks = [
            torch.empty(
                (2, num_host_blocks, *d.shape[2:]), dtype=d.dtype, device="cpu", pin_memory=pin
            )
            for d in self.device_blocks
        ]
        self.num_host_blocks = num_host_blocks
        self.block_bytes = kv_block_bytes(kv_caches, block_size)
        self._stream = torch.cuda.Stream(self.device) if pin else None
        self._loaded: torch.cuda.Event | None = None

    @classmethod
    def sized(
        cls,
        kv_caches: list[torch.Tensor],
        block_size: int,
        offload_gib: float,
        num_host_blocks: int | None = None,
    ) -> HostKVPool | None:
        """The pool `--kv-offload-gb` asks for (an explicit block count wins); None if off."""
        if num_host_blocks is None:
            num_host_blocks = int(offload_gib * GIB) // kv_block_bytes(kv_caches, block_size)
            if offload_gib > 0 and num_host_blocks < 1:
                raise ValueError(
                    f"kv_offload_gb={offload_gib} holds no KV block of "
                    f"{kv_block_bytes(kv_caches, block_size)} bytes"
                )
        return cls(kv_caches, block_size, num_host_blocks) if num_host_blocks else None

    def execute(self, saves: Sequence[tuple[int, int]], loads: Sequence[tuple[int, int]]) -> None:
        """Run one step's copies; on return the step's forward may be issued."""
        if self._stream is None:
            self._copy_cpu(saves, loads)
            return
        compute = torch.cuda.current_stream(self.device)
        if self._loaded is not None:  # last step's loads feed this step's forward
            compute.wait_event(self._loaded)
            self._loaded = None
        if not saves and not loads:
            return
        # NOTE: earlier forwards wrote the blocks we save and read the blocks we load into.
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            self._copy_runs(saves, to_host=True)
            saved = torch.cuda.Event()
            saved.record(self._stream)
            self._copy_runs(loads, to_host=False)
            if loads:
                self._loaded = torch.cuda.Event()
                self._loaded.record(self._stream)
        compute.wait_event(saved)  # this step's forward overwrites the saved blocks

    def _copy_runs(self, pairs: Sequence[tuple[int, int]], to_host: bool) -> None:
        for src, dst, n in runs(pairs):
            for device, host in zip(self.device_blocks, self.host_blocks, strict=True):
                for kv in (0, 1):  # K and V apart: each run is one contiguous memcpy
                    if to_host:
                        host[kv, dst : dst + n].copy_(device[kv, src : src + n], non_blocking=True)
                    else:
                        device[kv, dst : dst + n].copy_(host[kv, src : src + n], non_blocking=True)

    def _copy_cpu(self, saves: Sequence[tuple[int, int]], loads: Sequence[tuple[int, int]]) -> None:
        # One gather and one scatter per layer and direction, however scattered the ids.
        if saves:
            device_ids, host_ids = (torch.tensor(ids) for ids in zip(*saves, strict=True))
            for device, host in zip(self.device_blocks, self.host_blocks, strict=True):
                host.index_copy_(1, host_ids, device.index_select(1, device_ids))
        if loads:
            host_ids, device_ids = (torch.tensor(ids) for ids in zip(*loads, strict=True))
            for device, host in zip(self.device_blocks, self.host_blocks, strict=True):
                device.index_copy_(1, device_ids, host.index_select(1, host_ids))


def _copyable(cache: torch.Tensor) -> torch.Tensor:
    """The cache, or a byte view of an fp8 one (CPU index_select / index_copy_ have no float8
    kernels; a byte copy is exact)."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache
