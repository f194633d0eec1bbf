"""Triton decode attention over the paged KV cache: one new query token per sequence.

Owns the split-K (flash-decoding) kernel, its log-sum-exp merge kernel and their launcher.
K/V are read in place through the block table, one key at a time mapped to its page, so rows
are never gathered or padded to the longest context. The grid is sized from host ints only
(batch size, head counts, the most splits any sequence may use), never from device data: no
host syncs, and the same grid replays under a CUDA graph whatever the sequences' lengths.
Each sequence picks its own split count on the device from its length, so a long row among
short ones gets many programs while the short ones use one (the rest exit at once).
An fp8 cache (attention/kv_quant) is dequantized to q's dtype tile by tile as it is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.attention.kv_quant import is_fp8, kv_scales
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.triton_kv_quant import dequantize_e4m3, kv_load_stages
from ernie_cluster.triton_env import dot_precision, interpreting
from ernie_cluster.triton_rounding import rounded

# NOTE: scores are kept in base 2 (exp2 is one instruction); the merge kernel and the stored
# log-sum-exps use the same base, so nothing converts back.
LOG2E = 1.4426950408889634

# Fewest keys a split is worth: below this, the merge costs more than the parallelism buys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


# NOTE: the block table's row stride follows the step's widest row; not specialising on it
# keeps one compiled kernel across steps.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _decode_split_kernel(
    q_ptr,  # [N, Hq, D]
    k_cache_ptr,  # [num_slots, Hkv, D]
    v_cache_ptr,
    out_ptr,  # [N, Hq, D] (MAX_SPLITS == 1) or unused
    mid_out_ptr,  # [Bd, Hq, MAX_SPLITS, D] fp32, normalised per split (MAX_SPLITS > 1)
    mid_lse_ptr,  # [Bd, Hq, MAX_SPLITS] fp32 base-2 log-sum-exp per split
    num_splits_ptr,  # [Bd] int32 out: the splits each sequence used (MAX_SPLITS > 1)
    seq_lens_ptr,  # [B] int32
    block_table_ptr,  # [B, max_blocks] int32
    qk_scale,  # softmax scale * log2(e)
    k_scale,  # fp8 caches only: key = stored * k_scale
    v_scale,
    stride_q_tok,
    stride_q_head,
    stride_kv_slot,
    stride_kv_head,
    stride_out_tok,
    stride_out_head,
    stride_table_seq,
    NUM_QUERY_PER_KV: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two >= 16
    BLOCK_G: tl.constexpr,  # query heads of one kv head, padded to a power of two >= 16
    BLOCK_N: tl.constexpr,  # keys per tile
    MAX_SPLITS: tl.constexpr,  # the grid's third dimension
    MIN_KEYS: tl.constexpr,  # fewest keys per split
    UPCAST: tl.constexpr,  # interpreter only: compute in fp32 (it mishandles bf16 dots)
    KV_FP8: tl.constexpr,  # the cache is e4m3: dequantize each tile to q's dtype
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)  # decode rows are sequences [0, num_decodes), row == seq
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # This sequence's own split count: one per MIN_KEYS keys, at most the grid's.
    num_splits = tl.minimum(tl.cdiv(seq_len, MIN_KEYS), MAX_SPLITS)
    if MAX_SPLITS > 1:
        tl.store(num_splits_ptr + seq, num_splits, mask=(kv_head == 0) & (split == 0))
    if split >= num_splits:
        return
    # Splits cover whole tiles so no tile straddles two programs.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < NUM_QUERY_PER_KV
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * NUM_QUERY_PER_KV + offs_g  # [BLOCK_G] query heads sharing this kv head

    q_ptrs = (
        q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :]
    )  # [BLOCK_G, BLOCK_D]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_table_ptr + seq * stride_table_seq
    kv_head_off = kv_head * stride_kv_head

    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        mask_n = offs_n < end
        # NOTE: one block-table lookup per key, so the cache page size and BLOCK_N are
        # independent; int64 because slot * stride can pass 2**31 in a large cache.
        block_ids = tl.load(table_row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
        slots = block_ids.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE  # [BLOCK_N]
        kv_offs = slots[:, None] * stride_kv_slot + kv_head_off + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if KV_FP8:
            k = dequantize_e4m3(k, k_scale, q_ptr.dtype.element_ty, UPCAST)
            v = dequantize_e4m3(v, v_scale, q_ptr.dtype.element_ty, UPCAST)
        elif UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))  # [BLOCK_G, BLOCK_N]
        # Every tile holds at least one live key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # A split past the keys (rounding split_len up to whole tiles can leave the last one
    # empty) keeps l_i == 0: it stores zeros and a log-sum-exp of -inf, which the merge
    # weighs by exp2(-inf) == 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    out_mask = mask_g[:, None] & mask_d[None, :]
    if MAX_SPLITS == 1:
        out_ptrs = (
            out_ptr + seq * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :]
        )
        tl.store(out_ptrs, rounded(acc, out_ptr.dtype.element_ty, UPCAST), mask=out_mask)
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # [BLOCK_G]
        row = (seq * NUM_QUERY_PER_KV * tl.num_programs(1) + heads) * MAX_SPLITS + split
        tl.store(mid_lse_ptr + row, lse, mask=mask_g)
        mid_ptrs = mid_out_ptr + row[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :]
        tl.store(mid_ptrs, acc, mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    mid_out_ptr,  # [Bd, Hq, MAX_SPLITS, D] fp32
    mid_lse_ptr,  # [Bd, Hq, MAX_SPLITS] fp32
    num_splits_ptr,  # [Bd] int32: the splits of each sequence (the rest were never written)
    out_ptr,  # [N, Hq, D]
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # MAX_SPLITS rounded up to a power of two
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < tl.load(num_splits_ptr + seq)
    mask_d = offs_d < HEAD_DIM
    row = (seq * tl.num_programs(1) + head) * MAX_SPLITS + offs_s  # [BLOCK_S]
    lse = tl.load(mid_lse_ptr + row, mask=mask_s, other=float("-inf"))
    # Split 0 always holds keys (every sequence has at least one), so the max is finite.
    weights = tl.exp2(lse - tl.max(lse, axis=0))  # [BLOCK_S]
    parts = tl.load(
        mid_out_ptr + row[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    merged = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)  # [BLOCK_D]
    out_ptrs = out_ptr + seq * stride_out_tok + head * stride_out_head + offs_d
    tl.store(out_ptrs, rounded(merged, out_ptr.dtype.element_ty, UPCAST), mask=mask_d)


def choose_num_splits(max_seq_len: int, min_keys: int = MIN_KEYS_PER_SPLIT) -> int:
    """The grid's splits per (sequence, kv head): enough for the longest context at `min_keys`
    keys per split, a power of two (few variants compile), at most MAX_SPLITS. From a host
    bound only: each sequence uses min(this, ceil(len / min_keys)) of them on the device."""
    by_length = triton.cdiv(max(max_seq_len, 1), min_keys)
    return min(triton.next_power_of_2(by_length), MAX_SPLITS)


def decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    num_splits: int | None = None,
    block_n: int | None = None,
    min_keys_per_split: int = MIN_KEYS_PER_SPLIT,
) -> torch.Tensor | None:
    """Attend rows [0, meta.num_decodes) of q [N, Hq, D] to their cached keys, written into
    the same rows of out [N, Hq, D]. kv_cache [2, num_slots, Hkv, D] (q's dtype, or fp8 with
    its scales) already holds this step's keys. `num_splits` fixes the grid's split count (the
    most any sequence uses); by default it follows meta.max_decode_seq_len. Returns the splits
    each sequence used [Bd] int32 (None when the grid has one: no merge)."""
    num_decodes = meta.num_decodes
    if num_decodes == 0:
        return None
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(meta.max_decode_seq_len, min_keys_per_split)
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_slots, Hkv, D]
    k_scale, v_scale = kv_scales(kv_cache)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    # NOTE: float32 runs exact (ieee) dots on CUDA cores; their 32-key tiles already spill
    # (the AOT compile test), so float32 reads 16 keys per tile.
    block_n = block_n or (16 if q.dtype == torch.float32 else 64)
    upcast = interpreting()
    device = q.device
    if num_splits > 1:
        mid_out = torch.empty(
            num_decodes, num_heads, num_splits, head_dim, dtype=torch.float32, device=device
        )
        mid_lse = torch.empty(
            num_decodes, num_heads, num_splits, dtype=torch.float32, device=device
        )
        used = torch.empty(num_decodes, dtype=torch.int32, device=device)
    else:
        mid_out = mid_lse = used = out  # never touched: the kernel writes out directly
    _decode_split_kernel[(num_decodes, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        mid_out,
        mid_lse,
        used,
        meta.seq_lens_tensor,
        meta.block_table,
        scale * LOG2E,
        k_scale,
        v_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        out.stride(0),
        out.stride(1),
        meta.block_table.stride(0),
        NUM_QUERY_PER_KV=group,
        PAGE_SIZE=meta.block_size,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=max(triton.next_power_of_2(group), 16),
        BLOCK_N=block_n,
        MAX_SPLITS=num_splits,
        MIN_KEYS=min_keys_per_split,
        UPCAST=upcast,
        KV_FP8=is_fp8(kv_cache),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=kv_load_stages(q, kv_cache),
    )
    if num_splits == 1:
        return None
    _merge_splits_kernel[(num_decodes, num_heads)](
        mid_out,
        mid_lse,
        used,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        MAX_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        UPCAST=upcast,
        num_warps=4,
    )
    return used
