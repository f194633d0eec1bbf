"""Attention over the paged KV cache: the backend interface and the torch reference.

A backend writes the step's new K/V into the cache, then attends every new query to its
sequence's cached keys. The cache of one layer is one tensor [2, num_slots, kv_heads, head_dim]
(slot = block_id * block_size + offset). A GPU kernel plugs in by implementing `forward`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ernie_cluster.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D], kv_cache [2, slots, Hkv, D] -> [N, Hq, D]."""
        ...


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    kv_cache[0].index_copy_(0, slots, k.to(kv_cache.dtype))
    kv_cache[1].index_copy_(0, slots, v.to(kv_cache.dtype))


class TorchPagedAttention:
    """Reference backend: scaled_dot_product_attention on keys gathered from the cache."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        num_slots, num_kv_heads, head_dim = kv_cache.shape[1:]
        # [2, num_blocks, block_size, Hkv, D]: a free view of the slot layout
        blocks = kv_cache.view(
            2, num_slots // meta.block_size, meta.block_size, num_kv_heads, head_dim
        )
        for span in meta.prefills:
            keys = blocks[0, span.block_ids].flatten(0, 1)[: span.context_len]  # [ctx, Hkv, D]
            values = blocks[1, span.block_ids].flatten(0, 1)[: span.context_len]
            queries = q[span.start : span.stop].transpose(0, 1)[None]  # [1, Hq, n, D]
            attn = F.scaled_dot_product_attention(
                queries,
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                attn_mask=span.mask,
                is_causal=span.mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[span.start : span.stop] = attn[0].transpose(0, 1)
        if meta.num_decodes:
            table = meta.decode_block_table
            keys = blocks[0, table].flatten(1, 2).transpose(1, 2)  # [B, Hkv, nb * bs, D]
            values = blocks[1, table].flatten(1, 2).transpose(1, 2)
            queries = q[meta.decode_rows].unsqueeze(2)  # [B, Hq, 1, D]
            mask = meta.decode_mask[:, None, None, :]  # [B, 1, 1, nb * bs]
            attn = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[meta.decode_rows] = attn.squeeze(2)
        return out
