"""Triton prefill/extend attention over the paged KV cache: the spans after the decodes.

Owns the kernel and launcher for a ragged batch of chunks, each causal among its own tokens
and fully attending to its cached prefix. A program serves one kv head: its tile rows are the
query heads of that KV group for a run of tokens (GQA packing), so each K/V tile is read once
for the whole group, not once per query head. Every key, the chunk's own included, is read from
the cache through the block table (the backend writes this step's K/V first), and the
offset-causal mask is computed in the kernel; nothing is gathered or materialised per step.
The grid is sized from host ints only, so launching never syncs with the device.
An fp8 cache (attention/kv_quant) is dequantized to q's dtype tile by tile as it is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.attention.kv_quant import is_fp8, kv_scales
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.triton_decode import LOG2E
from ernie_cluster.attention.triton_kv_quant import dequantize_e4m3, kv_load_stages
from ernie_cluster.triton_env import dot_precision, interpreting
from ernie_cluster.triton_rounding import rounded


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, BLOCK_D]
    acc,  # [BLOCK_M, BLOCK_D] fp32
    m_i,  # [BLOCK_M] fp32 running max (base 2)
    l_i,  # [BLOCK_M] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    table_row,  # block-table row of this sequence
    kv_head_off,
    stride_kv_slot,
    tile_start,
    query_pos,  # [BLOCK_M] absolute position of each query
    seq_len,
    qk_scale,
    k_scale,
    v_scale,
    offs_d,
    mask_d,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,  # False for tiles every query of the program may see in full
    UPCAST: tl.constexpr,
    KV_FP8: tl.constexpr,
    Q_DTYPE: tl.constexpr,  # the compute dtype fp8 keys and values are dequantized to
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    mask_n = offs_n < seq_len
    # One block-table lookup per key: the page size need not equal BLOCK_N.
    block_ids = tl.load(table_row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
    slots = block_ids.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
    kv_offs = slots[:, None] * stride_kv_slot + kv_head_off + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    if KV_FP8:
        k = dequantize_e4m3(k, k_scale, Q_DTYPE, UPCAST)
        v = dequantize_e4m3(v, v_scale, Q_DTYPE, UPCAST)
    elif UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    if CAUSAL:
        visible = (offs_n[None, :] <= query_pos[:, None]) & mask_n[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    # NOTE: the first tile a program reads holds a key every query may see (see the caller),
    # so m_i is finite from then on and fully masked rows of later tiles add exp2(-inf) == 0.
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# NOTE: num_decodes and the block table's row stride change from step to step; Triton would
# otherwise compile a variant per divisibility class of each.
@triton.jit(do_not_specialize=["num_decodes", "stride_table_seq"])
def _prefill_kernel(
    q_ptr,  # [N, Hq, D]
    k_cache_ptr,  # [num_slots, Hkv, D]
    v_cache_ptr,
    out_ptr,  # [N, Hq, D]
    query_start_loc_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32
    block_table_ptr,  # [B, max_blocks] int32
    num_decodes,
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
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows: BLOCK_Q tokens x NUM_QUERY_PER_KV heads, padded
    BLOCK_Q: tl.constexpr,  # tokens per program
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache is e4m3: dequantize each tile to q's dtype
    DOT_PRECISION: tl.constexpr,
):
    seq = num_decodes + tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # The grid covers the longest span; shorter spans have nothing in their late tiles.
    if m_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    # GQA packing: row r of the tile is token r // G of the block and query head r % G of
    # this kv head (G = NUM_QUERY_PER_KV), so the G heads share every K/V tile read.
    rows = tl.arange(0, BLOCK_M)
    offs_m = m_block * BLOCK_Q + rows // NUM_QUERY_PER_KV  # [BLOCK_M] tokens within the span
    heads = kv_head * NUM_QUERY_PER_KV + rows % NUM_QUERY_PER_KV  # [BLOCK_M] query heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = (offs_m < q_len) & (rows < BLOCK_Q * NUM_QUERY_PER_KV)
    mask_d = offs_d < HEAD_DIM
    query_pos = prefix_len + offs_m  # absolute positions: query i sees keys <= its own

    q_ptrs = (
        q_ptr
        + (q_start + offs_m)[:, None].to(tl.int64) * stride_q_tok
        + heads[:, None] * stride_q_head
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_table_ptr + seq * stride_table_seq
    kv_head_off = kv_head * stride_kv_head

    # Keys before the tile's first query position are visible to every row: no mask. The
    # rest, up to the tile's last query (or the context end), are masked causally. Both
    # ranges start at a key every row may see (0, or a position <= the first query's).
    first_query_pos = prefix_len + m_block * BLOCK_Q
    full_end = (first_query_pos // BLOCK_N) * BLOCK_N
    causal_end = tl.minimum(first_query_pos + BLOCK_Q, seq_len)
    for tile_start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head_off,
            stride_kv_slot, tile_start, query_pos, seq_len, qk_scale, k_scale, v_scale, offs_d,
            mask_d, PAGE_SIZE, BLOCK_N, False, UPCAST, KV_FP8, q_ptr.dtype.element_ty,
            DOT_PRECISION,
        )  # fmt: skip
    for tile_start in range(full_end, causal_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_row, kv_head_off,
            stride_kv_slot, tile_start, query_pos, seq_len, qk_scale, k_scale, v_scale, offs_d,
            mask_d, PAGE_SIZE, BLOCK_N, True, UPCAST, KV_FP8, q_ptr.dtype.element_ty,
            DOT_PRECISION,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    out_ptrs = (
        out_ptr
        + (q_start + offs_m)[:, None].to(tl.int64) * stride_out_tok
        + heads[:, None] * stride_out_head
        + offs_d[None, :]
    )
    out = rounded(acc, out_ptr.dtype.element_ty, UPCAST)
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_d[None, :])


def prefill_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for one program: BLOCK_M rows of (token, query head of the group).
    64 x 64 keeps the Q, K and V tiles of D=128 in bf16 at 16 KB each (80 KB of shared memory
    with the K/V pipeline); the launcher gives it eight warps (at four it spills on sm_80, per
    the AOT compile test). Wider heads get narrower key tiles. fp32 runs exact (ieee) dots on
    CUDA cores, whose tiles spill from 16 x 32 up: it gets 16 x 16."""
    if dtype == torch.float32:
        return 16, 16
    return (64, 64) if head_dim <= 128 else (64, 32)


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """Attend the span rows [num_decodes' rows, N) of q [N, Hq, D], written into the same rows
    of out [N, Hq, D]. kv_cache [2, num_slots, Hkv, D] (q's dtype, or fp8 with its scales)
    already holds this step's keys."""
    num_spans = meta.num_prefills
    if num_spans == 0:
        return
    _, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[2]
    group = num_heads // num_kv_heads
    default_m, default_n = prefill_tiles(head_dim, q.dtype)
    block_m, block_n = block_m or default_m, block_n or default_n
    block_m = max(block_m, triton.next_power_of_2(group))  # room for one token's heads
    block_q = block_m // group  # tokens per program: their G heads fill the rows
    k_cache, v_cache = kv_cache[0], kv_cache[1]  # [num_slots, Hkv, D]
    k_scale, v_scale = kv_scales(kv_cache)
    grid = (num_spans, num_kv_heads, triton.cdiv(meta.max_prefill_query_len, block_q))
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens_tensor,
        meta.block_table,
        meta.num_decodes,
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
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        UPCAST=interpreting(),
        KV_FP8=is_fp8(kv_cache),
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m * block_n >= 64 * 64 else 4,
        num_stages=kv_load_stages(q, kv_cache),
    )
