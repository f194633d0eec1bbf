"""Attention over the paged KV cache: the backend interface and the torch reference.

A backend writes the step's new K/V into the cache, then attends every new query to its
sequence's cached keys. The cache of one layer is one tensor [2, num_slots, kv_heads, head_dim]
(slot = block_id * block_size + offset), in the model dtype or in fp8 e4m3 with the layer's
scales (attention/kv_quant): then writes quantize and reads dequantize to q's dtype. A GPU
kernel plugs in by implementing `forward`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ernie_cluster import cpu_bf16
from ernie_cluster.attention.kv_quant import (
    FP8_KV_DTYPE,
    dequantize_fp8,
    is_fp8,
    kv_scales,
    quantize_fp8,
)
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
        """q [N, Hq, D], k/v [N, Hkv, D], kv_cache [2, slots, Hkv, D] -> [N, Hq, D]. An fp8
        kv_cache (float8_e4m3fn) carries its scales (attention/kv_quant.kv_scales)."""
        ...


# NOTE: PyTorch's blocked CPU attention kernel, which also returns the log-sum-exp of each
# query's scores; private, so looked up once and optional.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prefix_then_causal(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of a prefill chunk after a cached prefix, without a mask.

    q [n, Hq, D]; keys/values [ctx, Hkv, D] whose last n rows are the chunk's own -> [n, Hq, D].
    A [n, ctx] mask would send SDPA to its unblocked math path, which materialises every
    score (2K x 32K per head for a late turn of a long chat). Instead: the prefix is attended
    without a mask (the g query heads of a kv head stacked along the query axis, so no key is
    copied), the chunk causally against itself, and the two merged by their log-sum-exps.
    """
    n, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    prefix_len = keys.shape[0] - n
    # [1, Hkv, g * n, D]: query heads h = kv * g + j, as enable_gqa pairs them
    grouped = q.transpose(0, 1).reshape(1, num_kv_heads, group * n, head_dim)
    prefix_out, prefix_lse = _CPU_FLASH(
        grouped,
        keys[:prefix_len].transpose(0, 1)[None],
        values[:prefix_len].transpose(0, 1)[None],
        scale=scale,
    )[:2]
    own_keys = keys[prefix_len:].repeat_interleave(group, dim=1)  # [n, Hq, D]
    own_values = values[prefix_len:].repeat_interleave(group, dim=1)
    own_out, own_lse = _CPU_FLASH(
        q.transpose(0, 1)[None],
        own_keys.transpose(0, 1)[None],
        own_values.transpose(0, 1)[None],
        is_causal=True,
        scale=scale,
    )[:2]
    prefix_out = prefix_out.reshape(num_heads, n, head_dim).float()  # [Hq, n, D]
    prefix_lse = prefix_lse.reshape(num_heads, n, 1).float()
    own_out, own_lse = own_out[0].float(), own_lse[0].unsqueeze(-1).float()
    top = torch.maximum(prefix_lse, own_lse)
    prefix_w, own_w = torch.exp(prefix_lse - top), torch.exp(own_lse - top)
    merged = (prefix_out * prefix_w + own_out * own_w) / (prefix_w + own_w)
    return merged.transpose(0, 1).to(q.dtype)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """kv_cache [2, slots, Hkv, D] <- k, v [N, Hkv, D] at slots [N], quantized if fp8."""
    if not is_fp8(kv_cache):
        kv_cache[0].index_copy_(0, slots, k.to(kv_cache.dtype))
        kv_cache[1].index_copy_(0, slots, v.to(kv_cache.dtype))
        return
    k_scale, v_scale = kv_scales(kv_cache)
    raw = kv_cache.view(torch.uint8)  # NOTE: CPU index kernels have no float8 variants
    raw[0].index_copy_(0, slots, quantize_fp8(k, k_scale).view(torch.uint8))
    raw[1].index_copy_(0, slots, quantize_fp8(v, v_scale).view(torch.uint8))


class _PagedReader:
    """Gathers whole blocks of one layer's cache in the compute dtype (dequantized if fp8)."""

    def __init__(self, kv_cache: torch.Tensor, block_size: int, dtype: torch.dtype) -> None:
        num_slots, num_kv_heads, head_dim = kv_cache.shape[1:]
        self.fp8 = is_fp8(kv_cache)
        self.scales = kv_scales(kv_cache)
        self.dtype = dtype
        # fp8 blocks are gathered as bytes (CPU indexing has no float8 kernels), then decoded
        storage = kv_cache.view(torch.uint8) if self.fp8 else kv_cache
        # [2, num_blocks, block_size, Hkv, D]: a free view of the slot layout
        self.blocks = storage.view(2, num_slots // block_size, block_size, num_kv_heads, head_dim)

    def __call__(self, kv: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Blocks `block_ids` [...] of K (kv=0) or V (kv=1) -> [..., block_size, Hkv, D]."""
        rows = self.blocks[kv, block_ids]
        if not self.fp8:
            return rows.to(self.dtype)
        return dequantize_fp8(rows.view(FP8_KV_DTYPE), self.scales[kv], self.dtype)


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
        if cpu_bf16.widens_bf16(q):  # results are rounded back as they are stored in `out`
            q = q.float()
        read = _PagedReader(kv_cache, meta.block_size, q.dtype)
        for span in meta.prefills:
            keys = read(0, span.block_ids).flatten(0, 1)[: span.context_len]  # [ctx, Hkv, D]
            values = read(1, span.block_ids).flatten(0, 1)[: span.context_len]
            if span.has_prefix and _CPU_FLASH is not None and q.device.type == "cpu":
                attn = prefix_then_causal(q[span.start : span.stop], keys, values, scale)
                out[span.start : span.stop] = attn
                continue
            queries = q[span.start : span.stop].transpose(0, 1)[None]  # [1, Hq, n, D]
            attn = F.scaled_dot_product_attention(
                queries,
                keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None],
                attn_mask=span.mask if span.has_prefix else None,
                is_causal=not span.has_prefix,
                scale=scale,
                enable_gqa=True,
            )
            out[span.start : span.stop] = attn[0].transpose(0, 1)
        num_decodes = meta.num_decodes
        if num_decodes:
            # NOTE: the reference gathers whole padded blocks; the Triton backend reads them
            # in place (attention/triton_backend).
            num_blocks = -(-meta.max_decode_seq_len // meta.block_size)
            table = meta.block_table[:num_decodes, :num_blocks].long()  # [Bd, nb]
            keys = read(0, table).flatten(1, 2).transpose(1, 2)  # [Bd, Hkv, nb * bs, D]
            values = read(1, table).flatten(1, 2).transpose(1, 2)
            key_pos = torch.arange(num_blocks * meta.block_size, device=q.device)
            mask = key_pos[None, :] < meta.seq_lens_tensor[:num_decodes, None]  # [Bd, nb*bs]
            # NOTE: the g query heads of each kv head stacked as g queries of one head: the
            # same scores as enable_gqa, which CPU SDPA runs ~1.3x slower with a mask.
            num_kv_heads, head_dim = keys.shape[1], keys.shape[3]
            queries = q[:num_decodes].reshape(num_decodes, num_kv_heads, -1, head_dim)
            attn = F.scaled_dot_product_attention(
                queries,  # [Bd, Hkv, g, D]
                keys,
                values,
                attn_mask=mask[:, None, None, :],
                scale=scale,
            )  # [Bd, Hkv, g, D]
            out[:num_decodes] = attn.reshape(num_decodes, -1, head_dim)
        return out
