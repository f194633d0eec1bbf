"""Expert-parallel dispatch/combine over gloo against a single-process reference, with
skewed routing (one rank receives every token, another none) and ranks without tokens."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.distributed.expert_dispatch import dispatch_combine
from ernie_cluster.distributed.process_group import free_port

HIDDEN, NUM_EXPERTS, TOP_K = 8, 8, 2


def expert_weights() -> torch.Tensor:
    return torch.randn(NUM_EXPERTS, HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(0))


def make_case(name: str, world: int):
    """Per-rank (hidden [n, H], expert ids [n, k], weights [n, k])."""
    gen = torch.Generator().manual_seed(1)
    per_rank = []
    for rank in range(world):
        n = {"skewed": 5, "empty-ranks": 3 if rank == 0 else 0, "uniform": 6}[name]
        hidden = torch.randn(n, HIDDEN, generator=gen)
        if name == "skewed":  # every token to rank 0's experts: rank 0 gets all, others none
            ids = (
                torch.stack(
                    [torch.randperm(NUM_EXPERTS // world, generator=gen)[:TOP_K] for _ in range(n)]
                )
                if n
                else torch.zeros(0, TOP_K, dtype=torch.long)
            )
        else:
            ids = (
                torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:TOP_K] for _ in range(n)])
                if n
                else torch.zeros(0, TOP_K, dtype=torch.long)
            )
        weights = torch.rand(n, TOP_K, generator=gen)
        per_rank.append((hidden, ids, weights))
    return per_rank


def reference(hidden, ids, weights, experts):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(TOP_K):
            out[t] += weights[t, j] * (hidden[t] @ experts[ids[t, j]].T)
    return out


def _rank_main(rank: int, world: int, port: int, name: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        experts = expert_weights()
        per_rank = experts.shape[0] // world
        received = []

        def run_experts(rows, expert_ids):
            received.append(int(rows.shape[0]))
            assert ((expert_ids // per_rank) == rank).all()
            return (
                torch.stack(
                    [r @ experts[e].T for r, e in zip(rows, expert_ids.tolist(), strict=True)]
                )
                if rows.shape[0]
                else rows.clone()
            )

        hidden, ids, weights = make_case(name, world)[rank]
        out = dispatch_combine(
            hidden, ids, weights, run_experts, per_rank, Communicator(rank, world)
        )
        results[rank] = (out, received[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["skewed", "empty-ranks", "uniform"])
def test_dispatch_combine_matches_reference(world, name):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(
        _rank_main,
        args=(world, free_port(), name, results),
        nprocs=world,
        start_method="spawn",
        join=True,
    )
    experts = expert_weights()
    received = []
    for rank, (hidden, ids, weights) in enumerate(make_case(name, world)):
        out, num_received = results[rank]
        received.append(num_received)
        assert torch.allclose(out, reference(hidden, ids, weights, experts), atol=1e-5)
    if name == "skewed":
        assert (
            received[0] == sum(make_case(name, world)[r][0].shape[0] for r in range(world)) * TOP_K
        )
        assert all(r == 0 for r in received[1:])
