"""Spawning a small gloo world of test ranks on 127.0.0.1: bounded, and never left running."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp


def spawn_ranks(main: Callable, world: int, args: tuple, timeout_s: float) -> None:
    """Run `main(rank, world, port, *args)` in `world` spawned processes (a free port picked
    now) and wait at most `timeout_s` for all of them; stragglers are killed."""
    from ernie_cluster.distributed.process_group import free_port

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    context = mp.start_processes(
        main, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=10)


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """Join the spawned ranks' gloo group (one compute thread per rank: they share the CPU)."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
