"""Triton write of a step's new K/V into the paged cache: one launch for keys and values.

The GPU counterpart of `backend.write_kv` (two index_copy_ ops): program t copies token t's
key and value rows [Hkv, D] to its slot, quantizing them to e4m3 with the layer's scales when
the cache is fp8 (attention/kv_quant). Reads k and v where they lie (views of the fused qkv
projection are fine: unit stride along head_dim), and never syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.attention.kv_quant import is_fp8, kv_scales
from ernie_cluster.attention.triton_kv_quant import quantize_e4m3
from ernie_cluster.triton_env import interpreting


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [N, Hkv, D]
    v_ptr,  # [N, Hkv, D]
    k_cache_ptr,  # [num_slots, Hkv, D]
    v_cache_ptr,
    slots_ptr,  # [N] int64 cache slot of each token
    num_kv_heads,
    k_scale,  # fp8 caches only: stored = k / k_scale
    v_scale,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cache_slot,
    stride_cache_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is e4m3: quantize with the scales
    INTERPRETED: tl.constexpr,  # interpreter only: round to e4m3 in software
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)
    cache_offs = slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
    k = tl.load(k_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :], mask)
    v = tl.load(v_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :], mask)
    if KV_FP8:
        k = quantize_e4m3(k, k_scale, INTERPRETED)
        v = quantize_e4m3(v, v_scale, INTERPRETED)
    tl.store(k_cache_ptr + cache_offs, k, mask=mask)
    tl.store(v_cache_ptr + cache_offs, v, mask=mask)


def write_kv_triton(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """kv_cache [2, num_slots, Hkv, D] <- k, v [N, Hkv, D] (the cache's dtype, or any float
    dtype into an fp8 cache, quantized with its scales) at slots [N]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    k_scale, v_scale = kv_scales(kv_cache)
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        num_kv_heads,
        k_scale,
        v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=is_fp8(kv_cache),
        INTERPRETED=interpreting(),
        num_warps=4,
    )
