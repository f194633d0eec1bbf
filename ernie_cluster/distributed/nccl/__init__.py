"""NCCL over ctypes, for collectives captured in CUDA graphs (the torch.distributed NCCL group's
host-side bookkeeping is not capture-safe)."""

from ernie_cluster.distributed.nccl.communicator import NcclCommunicator
from ernie_cluster.distributed.nccl.library import NcclLibrary

__all__ = ["NcclCommunicator", "NcclLibrary"]
