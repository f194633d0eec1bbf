"""A thin NCCL communicator whose collectives a CUDA graph can capture.

Each call checks its tensors and launches one NCCL kernel (or one group of send/recv) on the
caller's stream, torch.cuda.current_stream() by default: inside `torch.cuda.graph` that is
the capture stream, so the collective is recorded into the graph. Nothing else happens on
the host (no work objects, watchdog or events, as torch.distributed's NCCL group keeps), which
is what makes it safe under capture. The unique id travels over a CPU (gloo) group at init.
Never allocates outputs or counts bytes (distributed/communicator.Communicator does).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
import torch.distributed as dist

from ernie_cluster.distributed.nccl.library import (
    UNIQUE_ID_BYTES,
    NcclLibrary,
    cudaStream_t,
    nccl_dtype,
    nccl_reduce_op,
    ncclUniqueId,
    unique_id_from_bytes,
)


class NcclCommunicator:
    """One rank's NCCL communicator over `world_size` ranks, bound to one CUDA device."""

    def __init__(
        self,
        library: NcclLibrary,
        unique_id: ncclUniqueId,
        rank: int,
        world_size: int,
        device: torch.device | str,
    ) -> None:
        """Join the communicator every rank creates with the same `unique_id` (a collective:
        returns once all `world_size` ranks have called it)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
        self.library = library
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        # NOTE: ncclCommInitRank binds the communicator to the CURRENT CUDA device.
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else None
        with on_device or contextlib.nullcontext():
            self.comm = library.comm_init_rank(world_size, unique_id, rank)

    @classmethod
    def from_group(
        cls,
        group: dist.ProcessGroup,
        device: torch.device | str,
        library: NcclLibrary | None = None,
    ) -> NcclCommunicator:
        """The group's first rank makes the unique id and broadcasts it over `group` (a CPU
        group, gloo); every rank of the group then joins. A collective over `group`."""
        library = library or NcclLibrary()
        rank = dist.get_rank(group)
        world_size = dist.get_world_size(group)
        id_bytes = torch.zeros(UNIQUE_ID_BYTES, dtype=torch.uint8)
        if rank == 0:
            id_bytes.copy_(torch.frombuffer(bytearray(library.unique_id()), dtype=torch.uint8))
        dist.broadcast(id_bytes, src=dist.get_global_rank(group, 0), group=group)
        unique_id = unique_id_from_bytes(id_bytes.numpy().tobytes())
        return cls(library, unique_id, rank, world_size, device)

    # ------------------------------------------------------------------ collectives

    def all_reduce(
        self, x: torch.Tensor, op=dist.ReduceOp.SUM, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Reduce `x` across ranks in place."""
        pointer = self._pointer(x, "x")
        self.library.call(
            "ncclAllReduce",
            pointer,
            pointer,
            x.numel(),
            nccl_dtype(x.dtype),
            nccl_reduce_op(op),
            self.comm,
            self._stream(stream),
        )

    def all_gather(
        self, out: torch.Tensor, x: torch.Tensor, stream: torch.cuda.Stream | None = None
    ) -> None:
        """`out` [W * n elements] = every rank's `x` [n elements], in rank order."""
        self._check_pair(out, x, out.numel(), x.numel() * self.world_size)
        self.library.call(
            "ncclAllGather",
            self._pointer(x, "x"),
            self._pointer(out, "out"),
            x.numel(),
            nccl_dtype(x.dtype),
            self.comm,
            self._stream(stream),
        )

    def reduce_scatter(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        op=dist.ReduceOp.SUM,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """`out` [n elements] = this rank's block of the reduction of every rank's `x`."""
        self._check_pair(out, x, x.numel(), out.numel() * self.world_size)
        self.library.call(
            "ncclReduceScatter",
            self._pointer(x, "x"),
            self._pointer(out, "out"),
            out.numel(),
            nccl_dtype(x.dtype),
            nccl_reduce_op(op),
            self.comm,
            self._stream(stream),
        )

    def broadcast(self, x: torch.Tensor, src: int, stream: torch.cuda.Stream | None = None) -> None:
        """`x` of rank `src` into `x` of every rank, in place."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"source rank {src} is outside a world of {self.world_size} ranks")
        pointer = self._pointer(x, "x")
        self.library.call(
            "ncclBroadcast",
            pointer,
            pointer,
            x.numel(),
            nccl_dtype(x.dtype),
            src,
            self.comm,
            self._stream(stream),
        )

    def send(self, x: torch.Tensor, peer: int, stream: torch.cuda.Stream | None = None) -> None:
        self._point_to_point("ncclSend", x, peer, stream)

    def recv(self, x: torch.Tensor, peer: int, stream: torch.cuda.Stream | None = None) -> None:
        self._point_to_point("ncclRecv", x, peer, stream)

    def _point_to_point(
        self, function: str, x: torch.Tensor, peer: int, stream: torch.cuda.Stream | None
    ) -> None:
        self.library.call(
            function,
            self._pointer(x, "x"),
            x.numel(),
            nccl_dtype(x.dtype),
            peer,
            self.comm,
            self._stream(stream),
        )

    def all_to_all(
        self, out: torch.Tensor, x: torch.Tensor, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Equal blocks along dim 0: block d of `x` goes to rank d, block s of `out` came from
        rank s. One NCCL group of W sends and W receives, as torch.distributed's all-to-all."""
        if x.shape[0] % self.world_size:
            raise ValueError(f"{x.shape[0]} rows do not split evenly over {self.world_size} ranks")
        self._check_pair(out, x, out.numel(), x.numel())
        # Device and contiguity first: view() below needs contiguous tensors.
        self._pointer(x, "x")
        self._pointer(out, "out")
        stream = self._stream(stream)
        # [W, block elements]: row d is rank d's block (chunk() would drop empty blocks)
        sends, recvs = x.view(self.world_size, -1), out.view(self.world_size, -1)
        self.library.call("ncclGroupStart")
        try:
            for peer in range(self.world_size):
                self.send(sends[peer], peer, stream)
                self.recv(recvs[peer], peer, stream)
        finally:
            # NOTE: a group left open would swallow every later NCCL call of this process.
            self.library.call("ncclGroupEnd")

    def close(self) -> None:
        """Destroy the communicator. NOTE: not in __del__: destruction is collective-ish and
        Python's finaliser order at exit is arbitrary."""
        if self.comm is not None:
            self.library.call("ncclCommDestroy", self.comm)
            self.comm = None

    # ------------------------------------------------------------------ checks

    def _pointer(self, tensor: torch.Tensor, what: str) -> ctypes.c_void_p:
        if tensor.device != self.device:
            raise ValueError(
                f"{what} is on {tensor.device}; this NCCL communicator is on {self.device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(
                f"{what} must be contiguous (shape {tuple(tensor.shape)}, stride {tensor.stride()})"
            )
        return ctypes.c_void_p(tensor.data_ptr())

    @staticmethod
    def _check_pair(out: torch.Tensor, x: torch.Tensor, have: int, need: int) -> None:
        if out.dtype != x.dtype:
            raise ValueError(f"out is {out.dtype} but x is {x.dtype}")
        if have != need:
            raise ValueError(f"{have} elements where the collective needs {need}")

    def _stream(self, stream: torch.cuda.Stream | cudaStream_t | None) -> cudaStream_t:
        if isinstance(stream, cudaStream_t):  # already a handle (all_to_all's inner calls)
            return stream
        if stream is None:
            stream = torch.cuda.current_stream(self.device)
        return cudaStream_t(stream.cuda_stream)
