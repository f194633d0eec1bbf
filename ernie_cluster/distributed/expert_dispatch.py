"""Expert-parallel MoE: send each (token, expert) pair to the rank owning the expert, run the
experts there, bring the results back and combine them with the routing weights.

Pairs are ordered by expert id before the exchange, which also groups them by destination
rank (experts are split into contiguous ranges), so the combine adds each token's expert
outputs in ascending expert order on every world size: one rank reproduces the reference
implementation's summation order exactly. All ranks must call `dispatch_combine` every MoE
layer, also with no local tokens (the collectives need everyone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ernie_cluster.distributed.communicator import Communicator

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(rows [R, H], global expert ids [R] all owned by this rank) -> unweighted outputs [R, H]."""


def dispatch_combine(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    run_experts: ExpertFn,
    experts_per_rank: int,
    comm: Communicator,
) -> torch.Tensor:
    """hidden [n, H]; expert_ids/weights [n, k] -> weighted sum of expert outputs [n, H]."""
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [n*k]
    order = torch.argsort(flat_ids, stable=True)  # by expert, so also by destination rank
    token_of_pair = order // top_k  # [n*k]
    send_ids = flat_ids[order]
    send_rows = hidden[token_of_pair]  # [n*k, H]
    send_counts = torch.bincount(
        torch.div(send_ids, experts_per_rank, rounding_mode="floor"), minlength=comm.world_size
    )
    recv_counts = comm.exchange_counts(send_counts)
    send_list, recv_list = send_counts.tolist(), recv_counts.tolist()
    recv_rows = comm.all_to_all_rows(send_rows, send_list, recv_list)  # [R, H]
    recv_ids = comm.all_to_all_rows(send_ids, send_list, recv_list)  # [R]
    expert_out = run_experts(recv_rows, recv_ids)  # [R, H], unweighted
    returned = comm.all_to_all_rows(expert_out, recv_list, send_list)  # [n*k, H]
    returned = returned * weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(hidden)
    out.index_add_(0, token_of_pair, returned)
    return out
