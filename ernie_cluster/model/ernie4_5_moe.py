"""Ernie4_5_MoeForCausalLM on flat token batches (the engine's model).

Input is the step's tokens flattened across sequences: `input_ids` [N], `positions` [N] and an
`AttentionMetadata`; output is hidden states [N, H]. `compute_logits` runs the final head only
on the rows that are sampled. Module names mirror the checkpoint's so a weight name greps to
its module; `weight_targets` maps every checkpoint tensor to this rank's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster.attention.backend import AttentionBackend, TorchPagedAttention
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.attention import Ernie4_5_MoeAttention
from ernie_cluster.model.layers import InterleavedRotaryEmbedding, RMSNorm, SwiGLUMLP
from ernie_cluster.model.moe import Ernie4_5_MoeSparseMoeBlock
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.model.weights import WeightTarget, whole


class Ernie4_5_MoeDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ErnieMoeConfig,
        layer_idx: int,
        shard: ShardSpec,
        backend: AttentionBackend,
        rotary: InterleavedRotaryEmbedding,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Ernie4_5_MoeAttention(config, shard, backend, rotary, dtype)
        self.mlp: nn.Module = (
            Ernie4_5_MoeSparseMoeBlock(config, shard, dtype)
            if self.is_moe
            else SwiGLUMLP(config.hidden_size, config.intermediate_size, dtype)
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        return {
            f"{prefix}.input_layernorm.weight": whole(self.input_layernorm.weight.data),
            f"{prefix}.post_attention_layernorm.weight": whole(
                self.post_attention_layernorm.weight.data
            ),
            **self.self_attn.weight_targets(f"{prefix}.self_attn"),
            **self.mlp.weight_targets(f"{prefix}.mlp"),
        }


class Ernie4_5_MoeForCausalLM(nn.Module):
    def __init__(
        self,
        config: ErnieMoeConfig,
        dtype: torch.dtype = torch.bfloat16,
        shard: ShardSpec | None = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        shard = shard or ShardSpec()
        shard.check(config)
        self.config = config
        self.dtype = dtype
        self.shard = shard
        backend = backend or TorchPagedAttention()
        rotary = InterleavedRotaryEmbedding(config.head_dim, config.rope_theta)
        self.rotary = rotary
        self.embed_tokens = nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size, dtype=dtype), requires_grad=False
        )
        self.layers = nn.ModuleList(
            Ernie4_5_MoeDecoderLayer(config, i, shard, backend, rotary, dtype)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Parameter(
                torch.empty(config.vocab_size, config.hidden_size, dtype=dtype),
                requires_grad=False,
            )
        )

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """One cache per layer, each [2, num_slots, local_kv_heads, head_dim]."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            layer.self_attn.kv_cache = cache

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids [N], positions [N] -> final-normed hidden states [N, H]."""
        hidden = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            hidden = layer(positions, hidden, meta)
        return self.norm(hidden)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] -> float32 logits [M, vocab]."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()

    def weight_targets(self) -> dict[str, WeightTarget]:
        targets = {
            "model.embed_tokens.weight": whole(self.embed_tokens.data),
            "model.norm.weight": whole(self.norm.weight.data),
        }
        for i, layer in enumerate(self.layers):
            targets.update(layer.weight_targets(f"model.layers.{i}"))
        if self.lm_head is not None:
            targets["lm_head.weight"] = whole(self.lm_head.data)
        return targets
