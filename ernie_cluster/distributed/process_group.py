"""Setting up torch.distributed among the ranks of one model instance.

Rank 0 picks a free TCP port on its own host at run time (so several instances share a host)
and every rank joins with that address. NCCL on CUDA devices, gloo on CPU. With
`graph_safe_collectives` on CUDA (W > 1 CUDA graphs), the model's collectives run on the
ctypes NCCL communicator (distributed/nccl) instead, set up over an extra gloo group.
"""

from __future__ import annotations

import datetime
import logging
import socket

import torch
import torch.distributed as dist

from ernie_cluster.distributed.communicator import Communicator

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    device: torch.device,
    timeout_s: float = 600.0,
    graph_safe_collectives: bool = False,
) -> Communicator:
    """Join the instance's process group (no-op for one rank) and return its communicator.

    `graph_safe_collectives`: on CUDA, carry the collectives on the NCCL communicator, which
    CUDA graphs can capture (ignored on CPU: gloo is never captured)."""
    if world_size == 1:
        return Communicator(0, 1)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    backend = backend_for(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    logger.info("rank %d/%d joined %s process group at %s", rank, world_size, backend, init_method)
    if not (graph_safe_collectives and device.type == "cuda"):
        return Communicator(rank, world_size)
    from ernie_cluster.distributed.nccl import NcclCommunicator

    # NOTE: the unique id travels over gloo: a CPU broadcast needs no NCCL of its own.
    cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    nccl = NcclCommunicator.from_group(cpu_group, device)
    logger.info(
        "rank %d/%d: collectives on NCCL %d.%d.%d (ctypes)",
        rank,
        world_size,
        *nccl.library.version(),
    )
    return Communicator(rank, world_size, collectives=nccl)
