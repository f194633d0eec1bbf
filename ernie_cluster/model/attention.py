"""ERNIE-4.5 self-attention on a flat token batch: fused QKV, interleaved RoPE, paged cache.

Holds this rank's query and kv heads (a contiguous slice when tensor-parallel) and the layer's
KV cache tensor, bound by the runner. The output is this rank's partial o_proj sum; the caller
reduces it across ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from ernie_cluster.attention.backend import AttentionBackend
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.layers import InterleavedRotaryEmbedding
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.model.weights import WeightTarget, cols, rows
from ernie_cluster.quantization.weight import linear


class Ernie4_5_MoeAttention(nn.Module):
    def __init__(
        self,
        config: ErnieMoeConfig,
        shard: ShardSpec,
        backend: AttentionBackend,
        rotary: InterleavedRotaryEmbedding,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.q_head_start, q_head_stop = shard.q_heads(config)
        self.kv_head_start, kv_head_stop = shard.kv_heads(config)
        self.num_heads = q_head_stop - self.q_head_start
        self.num_kv_heads = kv_head_stop - self.kv_head_start
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.rotary = rotary
        hidden = config.hidden_size
        self.qkv_proj = nn.Parameter(
            torch.empty(self.q_size + 2 * self.kv_size, hidden, dtype=dtype), requires_grad=False
        )
        self.o_proj = nn.Parameter(
            torch.empty(hidden, self.q_size, dtype=dtype), requires_grad=False
        )
        self.kv_cache: torch.Tensor | None = None  # [2, num_slots, kv_heads, head_dim]

    def forward(
        self, cos_sin: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """cos_sin [N, 2, D/2] (the step's RoPE rows), hidden [N, H] -> partial o_proj [N, H]."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound: call bind_kv_caches before forward")
        qkv = linear(hidden, self.qkv_proj)  # [N, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(cos_sin, q, k)
        attn = self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)  # [N, Hq, D]
        return linear(attn.reshape(-1, self.q_size), self.o_proj)

    def quantizable_weights(self) -> dict[str, tuple[int, int]]:
        """Weight -> (first checkpoint column held here, checkpoint columns); quantization/apply.
        o_proj holds this rank's slice of the head columns (row-parallel)."""
        hidden = self.config.hidden_size
        return {
            "qkv_proj": (0, hidden),
            "o_proj": (self.q_head_start * self.head_dim, self.config.q_size),
        }

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        cfg, d = self.config, self.head_dim
        hidden = cfg.hidden_size
        q, kv = self.q_size, self.kv_size
        qkv = self.qkv_proj.data
        return {
            f"{prefix}.q_proj.weight": rows(qkv[:q], (cfg.q_size, hidden), self.q_head_start * d),
            f"{prefix}.k_proj.weight": rows(
                qkv[q : q + kv], (cfg.kv_size, hidden), self.kv_head_start * d
            ),
            f"{prefix}.v_proj.weight": rows(
                qkv[q + kv :], (cfg.kv_size, hidden), self.kv_head_start * d
            ),
            f"{prefix}.o_proj.weight": cols(
                self.o_proj.data, (hidden, cfg.q_size), self.q_head_start * d
            ),
        }
