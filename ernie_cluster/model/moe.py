"""The ERNIE-4.5 mixture-of-experts FFN: float32 router, grouped experts, shared experts.

Routing: softmax over float32 router logits; top-k chosen on (probabilities + correction
bias); combine weights are the UNBIASED probabilities of the chosen experts, renormalised (one
Triton kernel on the GPU path, model/triton_router).
Experts run grouped without host syncs (model/fused_moe): (token, slot) pairs are sorted by
expert on the device and go through grouped GEMMs. This module holds this rank's experts
[expert_start, expert_stop); `forward_pairs` takes rows with their routing, wherever they came
from (see distributed/expert_dispatch), and ignores slots routed elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.distributed.communicator import Communicator
from ernie_cluster.distributed.expert_dispatch import dispatch_combine
from ernie_cluster.model.fused_moe import fused_experts
from ernie_cluster.model.layers import SwiGLUMLP, use_triton
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.model.weights import WeightTarget, elsewhere, whole


class Ernie4_5_MoeRouter(nn.Module):
    def __init__(self, config: ErnieMoeConfig) -> None:
        super().__init__()
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        self.weight = nn.Parameter(
            torch.empty(config.moe_num_experts, config.hidden_size, dtype=torch.float32),
            requires_grad=False,
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(1, config.moe_num_experts, dtype=torch.float32), requires_grad=False
        )
        self.method = "auto"  # layers.KERNEL_METHODS

    def forward(
        self, hidden: torch.Tensor, is_real: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, H], is_real [N] bool or None -> (expert ids [N, k] int64, -1 on rows
        that are not real; combine weights [N, k] in hidden's dtype)."""
        if use_triton(self.method, hidden):
            from ernie_cluster.model.triton_router import route

            bias = self.e_score_correction_bias[0]
            return route(hidden, self.weight, bias, self.top_k, self.norm_min, is_real)
        probs = F.softmax(F.linear(hidden.float(), self.weight), dim=-1)  # [N, E] float32
        _, expert_ids = torch.topk(probs + self.e_score_correction_bias[0], self.top_k, dim=-1)
        weights = probs.gather(-1, expert_ids)  # [N, k], unbiased
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        if is_real is not None:
            expert_ids = torch.where(is_real[:, None], expert_ids, -1)
        return expert_ids, weights.to(hidden.dtype)


class Ernie4_5_MoeExperts(nn.Module):
    """This rank's routed experts, stacked: gate_up [E_local, 2I, H], down [E_local, H, I]."""

    def __init__(self, config: ErnieMoeConfig, shard: ShardSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.expert_start, self.expert_stop = shard.experts(config)
        num_local = self.expert_stop - self.expert_start
        inter, hidden = config.moe_intermediate_size, config.hidden_size
        self.intermediate_size = inter
        self.hidden_size = hidden
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_local, 2 * inter, hidden, dtype=dtype), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_local, hidden, inter, dtype=dtype), requires_grad=False
        )
        # fused_moe.METHODS; "auto" picks the fastest sync-free path for the device.
        self.method = "auto"
        # Tokens routed to each global expert, accumulated since the last reset (load stats);
        # only this rank's range is updated, on the device.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.long), persistent=False
        )

    def forward_pairs(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor | None,
        all_owned: bool = False,
        add_to: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [M, H], topk_ids [M, k] global expert ids, topk_weights [M, k] or None (weight 1)
        -> [M, H]: out[m] = sum over slots j of w[m, j] * expert_{ids[m, j]}(x[m]), plus
        add_to[m] when given. `all_owned` promises every id is an expert held here (one
        rank, router output).

        Slots whose id is -1 or not owned by this rank add nothing (and cost no GEMM work). The
        sum runs in float32 in slot order, then casts to x's dtype. No host sync (see
        fused_moe for the opt-in exception), and the same ops whatever the routing.
        """
        out, _ = fused_experts(
            x,
            topk_ids,
            topk_weights,
            self.gate_up_proj,
            self.down_proj,
            self.expert_start,
            self.method,
            all_owned=all_owned,
            expert_counts=self.tokens_per_expert[self.expert_start : self.expert_stop],
            add_to=add_to,
        )
        return out

    def quantizable_weights(self) -> dict[str, tuple[int, int]]:
        """Weight -> (first checkpoint column held here, checkpoint columns): whole experts."""
        return {"gate_up_proj": (0, self.hidden_size), "down_proj": (0, self.intermediate_size)}

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        inter, hidden = self.intermediate_size, self.hidden_size
        targets: dict[str, WeightTarget] = {}
        for expert in range(self.num_experts):
            name = f"{prefix}.{expert}"
            if not self.expert_start <= expert < self.expert_stop:
                targets[f"{name}.gate_proj.weight"] = elsewhere((inter, hidden))
                targets[f"{name}.up_proj.weight"] = elsewhere((inter, hidden))
                targets[f"{name}.down_proj.weight"] = elsewhere((hidden, inter))
                continue
            local = expert - self.expert_start
            targets[f"{name}.gate_proj.weight"] = whole(self.gate_up_proj.data[local, :inter])
            targets[f"{name}.up_proj.weight"] = whole(self.gate_up_proj.data[local, inter:])
            targets[f"{name}.down_proj.weight"] = whole(self.down_proj.data[local])
        return targets


class Ernie4_5_MoeSparseMoeBlock(nn.Module):
    """Router + routed experts (expert-parallel over the ranks) + shared experts (replicated).

    Runs on this rank's slice of the token batch; every rank calls it every MoE layer.
    """

    def __init__(
        self, config: ErnieMoeConfig, shard: ShardSpec, dtype: torch.dtype, comm: Communicator
    ) -> None:
        super().__init__()
        self.comm = comm
        self.experts_per_rank = config.moe_num_experts // shard.world_size
        self.gate = Ernie4_5_MoeRouter(config)
        self.experts = Ernie4_5_MoeExperts(config, shard, dtype)
        self.shared_experts = (
            SwiGLUMLP(config.hidden_size, config.shared_intermediate_size, dtype)
            if config.moe_num_shared_experts > 0
            else None
        )

    def forward(
        self,
        hidden: torch.Tensor,
        max_local_tokens: int | None = None,
        is_real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden [n, H] (this rank's tokens, possibly none) -> [n, H]. `max_local_tokens`:
        the most tokens any rank holds this step (a host int, equal on every rank); given, the
        expert-parallel exchange needs no host sync (see distributed/expert_dispatch).
        `is_real` [n] bool: rows that are not CUDA-graph padding; padding takes no expert."""
        expert_ids, weights = self.gate(hidden, is_real)
        if self.comm.world_size == 1:
            # Every expert is here; router ids are all real ones unless padding was masked.
            # The shared experts' output is added by the routed experts' combine.
            all_owned = is_real is None
            shared = None if self.shared_experts is None else self.shared_experts(hidden)
            return self.experts.forward_pairs(
                hidden, expert_ids, weights, all_owned=all_owned, add_to=shared
            )
        out = dispatch_combine(
            hidden,
            expert_ids,
            weights,
            self.experts.forward_pairs,
            self.experts_per_rank,
            self.comm,
            max_local_tokens=max_local_tokens,
        )
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = {
            f"{prefix}.gate.weight": whole(self.gate.weight.data),
            f"{prefix}.moe_statics.e_score_correction_bias": whole(
                self.gate.e_score_correction_bias.data
            ),
            **self.experts.weight_targets(f"{prefix}.experts"),
        }
        if self.shared_experts is not None:
            targets.update(self.shared_experts.weight_targets(f"{prefix}.shared_experts"))
        return targets
