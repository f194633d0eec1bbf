"""Attention over the paged KV cache: the backend interface and the torch reference.

A backend writes the step's new K/V into the cache, then attends every new query to its
sequence's cached keys. The cache of one layer is one tensor [2, num_slots, kv_heads, head_dim]
(slot = block_id * block_size + offset), in the model dtype or in fp8 e4m3 with the layer's
scales (attention/kv_quant): then writes quantize and reads dequantize to q's dtype. A GPU
kernel plugs in by implementing `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
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
        self.block_shape = (block_size, num_kv_heads, head_dim)
        # [2, num_blocks, block_size * Hkv * D]: a free view of the slot layout, a block per row
        self.blocks = storage.view(2, num_slots // block_size, -1)

    def __call__(self, kv: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Blocks `block_ids` [...] of K (kv=0) or V (kv=1) -> [..., block_size, Hkv, D]."""
        # NOTE: index_select copies whole rows (one memcpy per block): on CPU 2-2.5x faster
        # than advanced indexing, which computes an offset per element.
        rows = self.blocks[kv].index_select(0, block_ids.reshape(-1))
        rows = rows.view(*block_ids.shape, *self.block_shape)
        if not self.fp8:
            return rows.to(self.dtype)
        return dequantize_fp8(rows.view(FP8_KV_DTYPE), self.scales[kv], self.dtype)


@dataclass
class DecodeGroup:
    """Decode rows attended together, padded to the longest one's blocks."""

    rows: slice | torch.Tensor  # a slice, or [Bg] int64 rows (= their sequence indices)
    num_blocks: int

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The group's rows of x [B, ...] -> [Bg, ...]."""
        return x[self.rows] if isinstance(self.rows, slice) else x.index_select(0, self.rows)

    def put(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out [B, ...] <- x [Bg, ...] at the group's rows."""
        if isinstance(self.rows, slice):
            out[self.rows] = x
        else:
            out.index_copy_(0, self.rows, x.to(out.dtype))


_GROUP_OVERHEAD_KEYS = 512
"""What one more gather-and-SDPA call costs, in keys read (tens of microseconds)."""


def decode_groups(meta: AttentionMetadata) -> list[DecodeGroup]:
    """The step's decode rows in groups of similar length, so padding each group to its
    longest row wastes little (rows of 64 to 640 tokens padded to the longest: ~40% of the
    keys read are padding). Rows sorted by length are cut where the padding saved pays for one
    more call (an exact split on host ints, quadratic in the distinct block counts). Cached on
    `meta` for every layer."""
    cached = meta.__dict__.get("_decode_groups")
    if cached is not None:
        return cached
    count, block = meta.num_decodes, meta.block_size
    device = meta.block_table.device
    # NOTE: the split is built from host lists, so only where a host-built tensor is free
    # (a CUDA graph capture may run this backend too).
    if device.type != "cpu" or not cpu_bf16.cpu_paths():
        longest = -(-meta.max_decode_seq_len // block)
        groups = [DecodeGroup(slice(0, count), longest)] if count else []
        meta.__dict__["_decode_groups"] = groups
        return groups
    order = sorted(range(count), key=meta.seq_lens.__getitem__)
    # Runs of rows with the same block count: a cut inside a run never pays, so the split
    # chooses among run ends only (at most one per distinct block count).
    run_blocks: list[int] = []  # ascending block count of each run
    run_ends: list[int] = []  # end of each run in `order`
    for position, row in enumerate(order):
        blocks = -(-meta.seq_lens[row] // block)
        if run_blocks and run_blocks[-1] == blocks:
            run_ends[-1] = position + 1
        else:
            run_blocks.append(blocks)
            run_ends.append(position + 1)
    # best[r]: least cost (keys read plus calls) of rows up to run r's end, cut[r] the run
    # before its group; a group of runs (c, r] pads every row to run r's blocks
    ends = [0, *run_ends]
    best, cut = [0] * len(ends), [0] * len(ends)
    for r in range(1, len(ends)):
        keys = run_blocks[r - 1] * block
        best[r], cut[r] = min(
            (best[c] + (ends[r] - ends[c]) * keys + _GROUP_OVERHEAD_KEYS, c) for c in range(r)
        )
    groups = []
    r = len(ends) - 1
    while r > 0:
        c = cut[r]
        whole = c == 0 and r == len(ends) - 1
        rows = slice(0, count) if whole else torch.tensor(order[ends[c] : ends[r]])
        groups.append(DecodeGroup(rows, run_blocks[r - 1]))
        r = c
    meta.__dict__["_decode_groups"] = groups
    return groups


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
        for group in decode_groups(meta):
            # NOTE: the reference gathers whole padded blocks; the Triton backend reads them
            # in place (attention/triton_backend).
            table = group.take(meta.block_table)[:, : group.num_blocks]  # [Bg, nb]
            keys = read(0, table).flatten(1, 2).transpose(1, 2)  # [Bg, Hkv, nb * bs, D]
            values = read(1, table).flatten(1, 2).transpose(1, 2)
            key_pos = torch.arange(group.num_blocks * meta.block_size, device=q.device)
            seq_lens = group.take(meta.seq_lens_tensor)  # [Bg]
            mask = key_pos[None, :] < seq_lens[:, None]  # [Bg, nb * bs]
            # NOTE: the g query heads of each kv head stacked as g queries of one head: the
            # same scores as enable_gqa, which CPU SDPA runs ~1.3x slower with a mask.
            num_kv_heads, head_dim = keys.shape[1], keys.shape[3]
            queries = group.take(q).reshape(len(seq_lens), num_kv_heads, -1, head_dim)
            attn = F.scaled_dot_product_attention(
                queries,  # [Bg, Hkv, g, D]
                keys,
                values,
                attn_mask=mask[:, None, None, :],
                scale=scale,
            )  # [Bg, Hkv, g, D]
            group.put(out, attn.reshape(len(seq_lens), -1, head_dim))
        return out
