"""Expert-parallel MoE exchange: send each (token, slot) pair to the rank that owns its expert,
run the experts there, bring the rows back and combine them with the routing weights.

The exchange is a fixed-capacity all-to-all: every rank sends C rows to every rank (a [W * C, H]
buffer, padding rows carry expert id -1), so the split sizes are host ints and no counts are
exchanged. Given the step's largest local batch, C is the worst case for it, nothing is ever
dropped and nothing reads the device: the same ops for 1 or 256 tokens. Without it, or with a
configured smaller C, the ranks agree on C with one sync, never below what the step needs.
A token's k weighted slots (each product rounded to the activation dtype) are summed in
float32 in slot order on every world size, as `run_experts` does on one rank, so W = 1, 2, 4
give the same bits.
All ranks must call `dispatch_combine` every MoE layer, also with no local tokens. Holds no state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ernie_cluster.distributed.communicator import Communicator

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""run_experts(x [M, H], topk_ids [M, k] int64 GLOBAL expert ids, topk_weights [M, k] | None)
-> [M, H]: out[m] = sum_j w[m, j] * expert_{ids[m, j]}(x[m]), where ids of -1 or not owned by
this rank contribute 0, weights None means 1, each weighted product is rounded to x.dtype and
the k slots are summed in float32 in slot order, then cast to x.dtype."""


def worst_case_capacity(max_local_tokens: int, top_k: int, experts_per_rank: int) -> int:
    """Rows one rank can send to one destination: every local token puts at most
    min(top_k, experts_per_rank) pairs on one rank (a token's top-k experts are distinct)."""
    return max_local_tokens * min(top_k, experts_per_rank)


def dispatch_combine(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    run_experts: ExpertFn,
    experts_per_rank: int,
    comm: Communicator,
    *,
    max_local_tokens: int | None = None,
    capacity: int | None = None,
) -> torch.Tensor:
    """hidden [n, H]; expert_ids [n, k] int64 (distinct per row, -1 = none); weights [n, k]
    -> sum_j weights[:, j] * expert_{ids[:, j]}(hidden) [n, H] in hidden's dtype.

    `max_local_tokens`: the largest n on any rank this step, the same int on every rank (with
    the token-sharded residual, ceil(N / W)). Given, every buffer has the worst-case capacity
    and nothing syncs. Without it the ranks cannot agree on a size from their own n (ranks hold
    different n: the last ones have fewer or none), so they agree on the exact need with one
    all-reduce and one host sync. `capacity`: rows per destination to use when the worst case
    is larger; one sync to check, and a step that needs more sends exactly what it needs.
    """
    if comm.world_size == 1:
        return run_experts(hidden, expert_ids, weights)
    num_tokens, top_k = expert_ids.shape
    if max_local_tokens is not None and num_tokens > max_local_tokens:
        raise ValueError(f"{num_tokens} local tokens but max_local_tokens is {max_local_tokens}")
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    world = comm.world_size
    num_pairs = num_tokens * top_k
    device = hidden.device

    flat_ids = expert_ids.reshape(-1)  # [P], pair p = token p // k, slot p % k
    # Destination rank of each pair; `world` marks a pair routed nowhere (id -1).
    dest = torch.where(flat_ids >= 0, flat_ids.div(experts_per_rank, rounding_mode="floor"), world)
    # A pair's slot inside its destination's block: its rank among the pairs with the same
    # destination, in (token, slot) order (a stable sort keeps that order within a destination).
    order = torch.argsort(dest, stable=True)  # [P]
    sorted_dest = dest[order]
    starts = torch.searchsorted(sorted_dest, torch.arange(world + 1, device=device))  # [W + 1]
    slot_sorted = torch.arange(num_pairs, device=device) - starts[sorted_dest]  # [P]
    slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # [P], pair order

    worst = None
    if max_local_tokens is not None:
        worst = worst_case_capacity(max_local_tokens, top_k, experts_per_rank)
    if worst is not None and (capacity is None or capacity >= worst):
        cap = worst  # host-known on every rank: no sync
    else:
        cap = _agreed_capacity(starts, capacity or 0, comm)
    if cap == 0:  # no rank has a pair to send (cap is the same int on every rank)
        return torch.zeros_like(hidden)

    # Buffer row of each pair; row W * C is scratch for the pairs routed nowhere.
    buffer_row = torch.where(dest < world, dest * cap + slot, world * cap)  # [P]
    token_of_pair = torch.arange(num_pairs, device=device).div(top_k, rounding_mode="floor")
    # Each buffer row's source token; padding rows read row n, an appended zero row.
    source_token = torch.full((world * cap + 1,), num_tokens, dtype=torch.long, device=device)
    source_token = source_token.index_copy_(0, buffer_row, token_of_pair)[: world * cap]
    send_rows = F.pad(hidden, (0, 0, 0, 1))[source_token]  # [W * C, H]
    send_ids = torch.full((world * cap + 1,), -1, dtype=torch.int32, device=device)
    send_ids = send_ids.index_copy_(0, buffer_row, flat_ids.int())[: world * cap]  # [W * C]

    # Pairs bound to other ranks (a device scalar: bytes_sent counts payload, not padding).
    sent_elsewhere = starts[world] - starts[comm.rank + 1] + starts[comm.rank]
    recv_rows = comm.all_to_all_fixed(send_rows, sent_elsewhere)  # [W * C, H], block s from s
    recv_ids = comm.all_to_all_fixed(send_ids, sent_elsewhere)  # [W * C]
    expert_out = run_experts(recv_rows, recv_ids.long().unsqueeze(1), None)  # [W * C, H]

    is_pair = (recv_ids >= 0).view(world, cap)
    returned_elsewhere = is_pair.sum() - is_pair[comm.rank].sum()
    returned = comm.all_to_all_fixed(expert_out, returned_elsewhere)  # [W * C, H], as sent
    # Pairs routed nowhere read the appended zero row.
    pair_out = F.pad(returned, (0, 0, 0, 1))[buffer_row].view(num_tokens, top_k, hidden.shape[1])
    # NOTE: summed slot by slot, not with .sum(dim=1), whose reduction order is unspecified:
    # this is the order run_experts uses on one rank, so every world size gives the same bits.
    # NOTE: each weighted product is rounded to the activation dtype before the float32 sum,
    # as run_experts (and the reference implementation) round it.
    out = (pair_out[:, 0] * weights[:, 0, None]).float()  # [n, H] float32
    for j in range(1, top_k):
        out.add_(pair_out[:, j] * weights[:, j, None])  # widened to float32 inside the add
    return out.to(hidden.dtype)


def _agreed_capacity(starts: torch.Tensor, capacity: int, comm: Communicator) -> int:
    """Capacity every rank uses: `capacity`, or the largest count any rank sends to any one
    destination when that is more (exact, nothing dropped). The module's only host sync."""
    counts = starts[1:] - starts[:-1]  # [W] pairs for each destination rank
    need = comm.all_reduce(counts.max(), op=dist.ReduceOp.MAX)
    return max(capacity, int(need))
