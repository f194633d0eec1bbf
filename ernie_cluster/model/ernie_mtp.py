"""ERNIE-4.5's multi-token-prediction (MTP) layer: the `model.mtp_*` weights of a PT checkpoint.

The math is vLLM's `ernie_mtp` (the reference the tests hold it to). For a row at position p
with the target's FINAL-NORMED hidden state h_p and the token that follows it, x_{p+1}:

    e   = embed(x_{p+1}), zeroed where p == 0
    u   = mtp_linear_proj([mtp_emb_norm(e); mtp_hidden_norm(h_p)])     # [2H] -> [H]
    out = mtp_block(u)   # one dense pre-norm decoder layer (attention + SwiGLU), its own KV at p
    next-next token logits = lm_head(out)                               # no final norm

The block's RoPE rotates halves (vLLM builds it as a Llama layer), not the adjacent pairs of
the target's layers. The embedding and lm_head are the target's (the caller passes rows in and
takes logits from the target). A second proposal feeds the first proposal and `out` back in at
p + 1. Owns no weights loading (worker/mtp_runner) and never samples.
"""

from __future__ import annotations

import torch
from torch import nn

from ernie_cluster.attention.backend import AttentionBackend, TorchPagedAttention
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.model.attention import Ernie4_5_MoeAttention
from ernie_cluster.model.layers import InterleavedRotaryEmbedding, RMSNorm, SwiGLUMLP
from ernie_cluster.model.sharding import ShardSpec
from ernie_cluster.model.weights import WeightTarget, whole
from ernie_cluster.quantization.weight import linear

MTP_PREFIX = "model.mtp_"
"""Every MTP tensor of a checkpoint starts with this (`model.mtp_block.0.mlp.up_proj.weight`)."""


class NeoxRotaryEmbedding(InterleavedRotaryEmbedding):
    """RoPE over the halves (i, i + D/2) of each head, in float32; the same table as the
    target's. Always torch ops: the Triton kernel rotates pairs."""

    def forward(
        self, cos_sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # cos_sin [N, 2, D/2]; q [N, Hq, D]; k [N, Hkv, D]
        cos = cos_sin[:, None, 0]  # [N, 1, D/2]
        sin = cos_sin[:, None, 1]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # [N, H, D/2] each; float32 at least (a float64 test model keeps its precision)
        first, second = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
        out = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return out.to(x.dtype)


class ErnieMTPBlock(nn.Module):
    """The dense decoder layer inside the MTP: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(
        self,
        config: ErnieMoeConfig,
        backend: AttentionBackend,
        rotary: NeoxRotaryEmbedding,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Ernie4_5_MoeAttention(config, ShardSpec(0, 1), backend, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # NOTE: config.intermediate_size, the dense layers' width (vLLM's Llama layer reads it).
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(
        self, cos_sin: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        attn = self.self_attn(cos_sin, self.input_layernorm(hidden), meta)  # [N, H]
        normed, hidden = self.post_attention_layernorm.add_and_norm(attn, hidden)
        return hidden + self.mlp(normed)

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        targets = {
            f"{prefix}.input_layernorm.weight": whole(self.input_layernorm.weight.data),
            f"{prefix}.post_attention_layernorm.weight": whole(
                self.post_attention_layernorm.weight.data
            ),
        }
        targets.update(self.self_attn.weight_targets(f"{prefix}.self_attn"))
        targets.update(self.mlp.weight_targets(f"{prefix}.mlp"))
        return targets


class ErnieMTP(nn.Module):
    """The checkpoint's one MTP layer (index 0), unsharded; `layers` is its one block, so the
    KV-cache helpers that size and allocate a model's caches take it as they take a model."""

    def __init__(
        self,
        config: ErnieMoeConfig,
        dtype: torch.dtype = torch.bfloat16,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        hidden = config.hidden_size
        self.rotary = NeoxRotaryEmbedding(
            config.head_dim, config.rope_theta, config.max_position_embeddings
        )
        self.mtp_emb_norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.mtp_hidden_norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.mtp_linear_proj = nn.Parameter(
            torch.empty(hidden, 2 * hidden, dtype=dtype), requires_grad=False
        )
        block = ErnieMTPBlock(config, backend or TorchPagedAttention(), self.rotary, dtype)
        self.mtp_block = nn.ModuleList([block])

    @property
    def layers(self) -> nn.ModuleList:
        return self.mtp_block

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        """One cache, [2, num_slots, kv_heads, head_dim]."""
        if len(kv_caches) != 1:
            raise ValueError(f"got {len(kv_caches)} KV caches for the MTP's 1 layer")
        self.mtp_block[0].self_attn.kv_cache = kv_caches[0]

    @torch.inference_mode()
    def forward(
        self,
        next_embeds: torch.Tensor,
        positions: torch.Tensor,
        target_hidden: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """next_embeds [N, H] (embeddings of the tokens AFTER each row), positions [N],
        target_hidden [N, H] (final-normed) -> [N, H] the MTP's rows, for the target's lm_head
        as they are and as the hidden input of a further proposal."""
        # NOTE: position 0 has no predecessor in training; vLLM zeroes its embedding.
        embeds = next_embeds.masked_fill((positions == 0)[:, None], 0)
        joined = torch.cat((self.mtp_emb_norm(embeds), self.mtp_hidden_norm(target_hidden)), -1)
        hidden = linear(joined, self.mtp_linear_proj)  # [N, 2H] -> [N, H]
        return self.mtp_block[0](self.rotary.cos_sin(positions), hidden, meta)

    def weight_targets(self) -> dict[str, WeightTarget]:
        """Checkpoint names -> parameters, vLLM's names for ERNIE-4.5's MTP layer 0."""
        targets = {
            f"{MTP_PREFIX}emb_norm.0.weight": whole(self.mtp_emb_norm.weight.data),
            f"{MTP_PREFIX}hidden_norm.0.weight": whole(self.mtp_hidden_norm.weight.data),
            f"{MTP_PREFIX}linear_proj.0.weight": whole(self.mtp_linear_proj.data),
        }
        targets.update(self.mtp_block[0].weight_targets(f"{MTP_PREFIX}block.0"))
        return targets
