"""The ERNIE-4.5 mixture-of-experts FFN: float32 router, grouped experts, shared experts.

Routing: softmax over float32 router logits; top-k chosen on (probabilities + correction
bias); combine weights are the UNBIASED probabilities of the chosen experts, renormalised.
Experts run grouped: tokens are sorted by expert and each active expert does one matmul over
its tokens. This module holds this rank's experts [expert_start, expert_stop); `experts_forward`
takes already-routed (token, expert, weight) assignments so the expert-parallel dispatcher can
feed it tokens that arrived from other ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.layers import SwiGLUMLP
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

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, H] -> (expert ids [N, k] int64, combine weights [N, k] in hidden's dtype)."""
        probs = F.softmax(F.linear(hidden.float(), self.weight), dim=-1)  # [N, E] float32
        _, expert_ids = torch.topk(probs + self.e_score_correction_bias[0], self.top_k, dim=-1)
        weights = probs.gather(-1, expert_ids)  # [N, k], unbiased
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
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
        # Tokens routed to each global expert, accumulated since the last reset (load stats).
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.long), persistent=False
        )

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of local experts' outputs for each row of `hidden`.

        hidden [M, H]; expert_ids [M, k] (global ids; those outside this rank are ignored);
        weights [M, k] -> [M, H].
        """
        _num_rows, top_k = expert_ids.shape
        out = torch.zeros_like(hidden)
        flat_experts = expert_ids.reshape(-1)  # [M*k]
        local = (flat_experts >= self.expert_start) & (flat_experts < self.expert_stop)
        assignment = local.nonzero().squeeze(-1)  # [A] indices into the flat (row, slot) pairs
        if assignment.numel() == 0:
            return out
        local_expert = flat_experts[assignment] - self.expert_start
        order = torch.argsort(local_expert, stable=True)
        assignment, local_expert = assignment[order], local_expert[order]
        counts = torch.bincount(local_expert, minlength=self.expert_stop - self.expert_start)
        self.tokens_per_expert[self.expert_start : self.expert_stop] += counts
        token_rows = assignment // top_k
        token_weights = weights.reshape(-1)[assignment].unsqueeze(-1)  # [A, 1]
        gathered = hidden[token_rows]  # [A, H]
        offset = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            chunk = gathered[offset : offset + count]
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(F.silu(gate) * up, self.down_proj[expert])
            gathered[offset : offset + count] = expert_out * token_weights[offset : offset + count]
            offset += count
        out.index_add_(0, token_rows, gathered)
        return out

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
    """Router + routed experts + shared experts, single-rank form (W = 1)."""

    def __init__(self, config: ErnieMoeConfig, shard: ShardSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Ernie4_5_MoeRouter(config)
        self.experts = Ernie4_5_MoeExperts(config, shard, dtype)
        self.shared_experts = (
            SwiGLUMLP(config.hidden_size, config.shared_intermediate_size, dtype)
            if config.moe_num_shared_experts > 0
            else None
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.gate(hidden)
        out = self.experts(hidden, expert_ids, weights)
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
