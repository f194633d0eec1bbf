"""Triton kernels for MoE routing and its inverse: the router (gate GEMM, softmax, bias-corrected
top-k, renormalisation) in one launch, the sort of (token, slot) pairs into per-expert tiles in
another, and the combine that adds each token's weighted slots back (with the shared experts'
output) in a third. The GPU counterparts of `moe.Ernie4_5_MoeRouter.forward`,
`fused_moe.sort_pairs` + `fused_moe.align_to_tiles` and `fused_moe.sum_slots`, which the CPU
path keeps; the tile layout and the slot sum are exactly the torch ops', the routing is up to
float32 summation order.
Imports triton: model/moe and model/fused_moe load it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.triton_env import interpreting
from ernie_cluster.triton_rounding import rounded

ROUTER_BLOCK_M = 16  # tokens per program (a tl.dot needs >= 16 rows)
ROUTER_BLOCK_K = 64  # hidden columns per step of the gate GEMM


@triton.jit
def _router_kernel(
    x_ptr,  # [N, H] hidden rows, any float dtype
    w_ptr,  # [E, H] fp32 gate weight
    bias_ptr,  # [E] fp32 score correction bias
    is_real_ptr,  # [N] bool (HAS_IS_REAL): padding rows get expert -1
    ids_ptr,  # [N, TOP_K] int64 out
    weights_ptr,  # [N, TOP_K] out, x's dtype
    num_tokens,
    hidden,
    num_experts,
    norm_min,
    stride_x,
    stride_w,
    TOP_K: tl.constexpr,
    HAS_IS_REAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOP: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < num_tokens
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < num_experts
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + experts[None, :] * stride_w + offs_k[:, None]  # [BK, BE]
    logits = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for k_start in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k_start
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & e_ok[None, :], other=0.0)
        # NOTE: exact float32 products, as F.linear on x.float() (no TF32).
        logits = tl.dot(x, w, logits, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    top = tl.max(logits, axis=1)
    exps = tl.exp(logits - top[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]  # [BM, BE], zero on padding experts
    bias = tl.load(bias_ptr + experts, mask=e_ok, other=0.0)
    scores = tl.where(e_ok[None, :], probs + bias[None, :], float("-inf"))
    slots = tl.arange(0, BLOCK_TOP)
    chosen = tl.zeros((BLOCK_M, BLOCK_TOP), dtype=tl.int32)
    picked = tl.zeros((BLOCK_M, BLOCK_TOP), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(scores, axis=1)
        # The lowest expert id among equal scores.
        expert = tl.min(tl.where(scores == best[:, None], experts[None, :], BLOCK_E), axis=1)
        hit = experts[None, :] == expert[:, None]  # [BM, BE]
        prob = tl.sum(tl.where(hit, probs, 0.0), axis=1)  # unbiased probability
        scores = tl.where(hit, float("-inf"), scores)
        chosen = tl.where(slots[None, :] == slot, expert[:, None], chosen)
        picked = tl.where(slots[None, :] == slot, prob[:, None], picked)
    total = tl.maximum(tl.sum(picked, axis=1), norm_min)
    weights = rounded(picked / total[:, None], weights_ptr.dtype.element_ty, INTERPRETED)
    if HAS_IS_REAL:
        real = tl.load(is_real_ptr + offs_m, mask=row_ok, other=0) != 0
        chosen = tl.where(real[:, None], chosen, -1)
    out_offs = offs_m.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(ids_ptr + out_offs, chosen.to(tl.int64), mask=out_mask)
    tl.store(weights_ptr + out_offs, weights, mask=out_mask)


def route(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    norm_min: float,
    is_real: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [E, H] fp32, bias [E] fp32, is_real [N] bool or None -> (expert
    ids [N, k] int64, -1 on rows that are not real; combine weights [N, k] in hidden's
    dtype): the top-k of softmax(hidden @ weight.T) + bias, weighted by the unbiased
    probabilities renormalised (their sum clamped below at norm_min)."""
    num_tokens, hidden_size = hidden.shape
    num_experts = weight.shape[0]
    ids = torch.empty((num_tokens, top_k), dtype=torch.int64, device=hidden.device)
    weights = torch.empty((num_tokens, top_k), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return ids, weights
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    _router_kernel[(triton.cdiv(num_tokens, ROUTER_BLOCK_M),)](
        hidden,
        weight,
        bias,
        hidden if is_real is None else is_real,
        ids,
        weights,
        num_tokens,
        hidden_size,
        num_experts,
        norm_min,
        hidden.stride(0),
        weight.stride(0),
        TOP_K=top_k,
        HAS_IS_REAL=is_real is not None,
        BLOCK_M=ROUTER_BLOCK_M,
        BLOCK_K=ROUTER_BLOCK_K,
        BLOCK_E=max(triton.next_power_of_2(num_experts), 16),
        BLOCK_TOP=triton.next_power_of_2(top_k),
        INTERPRETED=interpreting(),
        num_warps=4,
    )
    return ids, weights


SORT_BLOCK_P = 128  # pairs per step of the sort kernel's loops


@triton.jit
def _sort_to_tiles_kernel(
    ids_ptr,  # [P] global expert id of each (token, slot) pair
    tile_pairs_ptr,  # [T * BLOCK_M] int32 out: pair id, num_pairs on padding rows
    tile_experts_ptr,  # [T] int32 out: local expert, -1 past the last used tile
    counts_ptr,  # [E] int64: pairs per local expert are ADDED here
    num_pairs,
    num_tiles,
    expert_start,
    num_local,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # One program: the whole layout is a few passes over P pairs with per-expert state in
    # registers, which at decode sizes beats any multi-launch scan.
    experts = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    # Pass 1: pairs per local expert.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        pair = start + offs_p
        local = tl.load(ids_ptr + pair, mask=pair < num_pairs, other=-1) - expert_start
        hit = (local[:, None] == experts[None, :]) & (local[:, None] < num_local)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    tiles = (counts + BLOCK_M - 1) // BLOCK_M  # [BE]
    tile_end = tl.cumsum(tiles, axis=0)
    first_row = (tile_end - tiles) * BLOCK_M  # first padded row of each expert
    # Pass 2: each owned pair to its row, in pair order within an expert (a stable sort).
    taken = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        pair = start + offs_p
        local = tl.load(ids_ptr + pair, mask=pair < num_pairs, other=-1) - expert_start
        hit = (local[:, None] == experts[None, :]) & (local[:, None] < num_local)  # [BP, BE]
        hit_i = hit.to(tl.int32)
        before = tl.cumsum(hit_i, axis=0) - hit_i  # same-expert pairs earlier in this block
        row = tl.sum(tl.where(hit, first_row[None, :] + taken[None, :] + before, 0), axis=1)
        owned = tl.sum(hit_i, axis=1) > 0
        tl.store(tile_pairs_ptr + row, pair.to(tl.int32), mask=owned)
        taken += tl.sum(hit_i, axis=0)
    # Padding rows of each used tile, then every row of the unused tiles.
    lanes = tl.arange(0, BLOCK_M)
    pad_rows = first_row[:, None] + counts[:, None] + lanes[None, :]  # [BE, BM]
    pad_ok = counts[:, None] + lanes[None, :] < tiles[:, None] * BLOCK_M
    tl.store(tile_pairs_ptr + pad_rows, num_pairs, mask=pad_ok)
    used_rows = tl.sum(tiles, axis=0) * BLOCK_M
    for start in range(used_rows, num_tiles * BLOCK_M, BLOCK_P):
        rows = start + offs_p
        tl.store(tile_pairs_ptr + rows, num_pairs, mask=rows < num_tiles * BLOCK_M)
    # The expert of each tile: how many experts end at or before it (searchsorted, right).
    for start in range(0, num_tiles, BLOCK_P):
        tile = start + offs_p
        expert = tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), axis=1)
        expert = tl.where(expert < num_local, expert, -1)
        tl.store(tile_experts_ptr + tile, expert, mask=tile < num_tiles)
    e_ok = experts < num_local
    old = tl.load(counts_ptr + experts, mask=e_ok, other=0)
    tl.store(counts_ptr + experts, old + counts.to(tl.int64), mask=e_ok)


def sort_to_tiles(
    topk_ids: torch.Tensor,
    expert_start: int,
    num_local: int,
    block_m: int,
    num_tiles: int,
    counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [M, k] global ids -> (tile_pairs [T * block_m] int32, tile_experts [T] int32),
    the layout of `fused_moe.align_to_tiles(*fused_moe.sort_pairs(...))` with T = num_tiles;
    the pairs routed to each local expert are added into counts [num_local] int64."""
    device = topk_ids.device
    tile_pairs = torch.empty(num_tiles * block_m, dtype=torch.int32, device=device)
    tile_experts = torch.empty(num_tiles, dtype=torch.int32, device=device)
    ids = topk_ids.reshape(-1)
    _sort_to_tiles_kernel[(1,)](
        ids if ids.is_contiguous() else ids.contiguous(),
        tile_pairs,
        tile_experts,
        counts,
        ids.numel(),
        num_tiles,
        expert_start,
        num_local,
        BLOCK_M=block_m,
        BLOCK_E=max(triton.next_power_of_2(num_local), 16),
        BLOCK_P=SORT_BLOCK_P,
        num_warps=8,
    )
    return tile_pairs, tile_experts


@triton.jit
def _combine_kernel(
    weighted_ptr,  # [M * TOP_K, H] from down_kernel; rows of pairs not owned here unset
    ids_ptr,  # [M, TOP_K] global expert ids
    shared_ptr,  # [M, H] added after the slot sum (HAS_SHARED)
    out_ptr,  # [M, H] out
    hidden,
    expert_start,
    num_local,
    stride_weighted,
    stride_shared,
    stride_out,
    TOP_K: tl.constexpr,
    ALL_OWNED: tl.constexpr,
    HAS_SHARED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < hidden
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # NOTE: float32 adds in slot order from 0, as fused_moe.sum_slots: the same bits.
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        part_mask = mask
        if not ALL_OWNED:
            # The slot's id, read once per lane (a broadcast load) to mask whole rows.
            local = tl.load(ids_ptr + pair + 0 * offs) - expert_start  # [BLOCK_H]
            part_mask = mask & (local >= 0) & (local < num_local)
        part = tl.load(weighted_ptr + pair * stride_weighted + offs, mask=part_mask, other=0.0)
        total += part.to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out = rounded(total, dtype, INTERPRETED)
    if HAS_SHARED:
        shared = tl.load(shared_ptr + token * stride_shared + offs, mask=mask, other=0.0)
        out = rounded(out + shared.to(tl.float32), dtype, INTERPRETED)
    tl.store(out_ptr + token * stride_out + offs, out, mask=mask)


def combine(
    weighted: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int,
    num_local: int,
    dtype: torch.dtype,
    all_owned: bool = False,
    add_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """weighted [M * k, H] from `run_experts`, topk_ids [M, k] -> [M, H] in `dtype`: the owned
    slots of each token added in float32 in slot order, rounded (as fused_moe.sum_slots), then
    add_to [M, H] added (rounded again, as a torch add in `dtype`)."""
    num_tokens, top_k = topk_ids.shape
    hidden = weighted.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=weighted.device)
    if num_tokens == 0:
        return out
    block_h = min(triton.next_power_of_2(hidden), 1024)
    _combine_kernel[(num_tokens, -(-hidden // block_h))](
        weighted,
        topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous(),
        weighted if add_to is None else add_to,
        out,
        hidden,
        expert_start,
        num_local,
        weighted.stride(0),
        0 if add_to is None else add_to.stride(0),
        out.stride(0),
        TOP_K=top_k,
        ALL_OWNED=all_owned,
        HAS_SHARED=add_to is not None,
        BLOCK_H=block_h,
        INTERPRETED=interpreting(),
        num_warps=4,
    )
    return out
