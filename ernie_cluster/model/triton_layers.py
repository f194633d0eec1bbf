"""Triton kernels for the decoder's small layers: RMSNorm (with the residual add fused in), RoPE
on q and k in place, and SwiGLU's SiLU·mul. One launch each where the torch reference
(model/layers) runs 7-18 elementwise ops. Used on the GPU path only; the CPU path keeps the
torch reference. Every kernel computes in float32 and rounds where the reference rounds.
Imports triton: model/layers loads this module only when a kernel is first used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.triton_env import interpreting
from ernie_cluster.triton_rounding import rounded


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [N, H]
    residual_ptr,  # [N, H] (HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [N, H] normed
    sum_ptr,  # [N, H] out: x + residual (HAS_RESIDUAL)
    hidden,
    eps,
    stride_x,
    stride_res,
    stride_out,
    stride_sum,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = rounded(x + res.to(tl.float32), dtype, INTERPRETED)  # the reference's add, rounded
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=mask)
    mean_sq = tl.sum(x * x, axis=0) / hidden
    # NOTE: normalise in float32, round, THEN scale (and round again), as RMSNorm.forward.
    normed = rounded(x * tl.rsqrt(mean_sq + eps), dtype, INTERPRETED)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, rounded(normed * weight, dtype, INTERPRETED), mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> normed [N, H]; with residual [N, H]: (normed(x + residual), x + residual)."""
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    total = out if residual is None else torch.empty_like(out)
    if num_tokens:
        block_h = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_tokens,)](
            x,
            x if residual is None else residual,
            weight,
            out,
            total,
            hidden,
            eps,
            x.stride(0),
            x.stride(0) if residual is None else residual.stride(0),
            out.stride(0),
            total.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=block_h,
            INTERPRETED=interpreting(),
            num_warps=8 if block_h >= 2048 else 4,
        )
    return out if residual is None else (out, total)


@triton.jit
def _rotate_heads(
    x_ptr,  # row of one token: [heads, D] with stride_head between heads
    cos,  # [1, BLOCK_HALF] fp32
    sin,
    num_heads,
    stride_head,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)
    pairs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (pairs[None, :] < HALF)
    even_ptrs = x_ptr + heads[:, None] * stride_head + 2 * pairs[None, :]  # [BH, BHALF]
    even = tl.load(even_ptrs, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(even_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(even_ptrs, rounded(even * cos - odd * sin, dtype, INTERPRETED), mask=mask)
    tl.store(even_ptrs + 1, rounded(odd * cos + even * sin, dtype, INTERPRETED), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # [N, Hq, D], rotated in place
    k_ptr,  # [N, Hkv, D], rotated in place
    cos_sin_ptr,  # [N, 2, D/2] fp32 contiguous
    num_q_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_KV_HEADS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, BLOCK_HALF)
    cs_ptrs = cos_sin_ptr + token * 2 * HALF + pairs
    cos = tl.load(cs_ptrs, mask=pairs < HALF, other=0.0)[None, :]
    sin = tl.load(cs_ptrs + HALF, mask=pairs < HALF, other=0.0)[None, :]
    _rotate_heads(
        q_ptr + token * stride_q_tok, cos, sin, num_q_heads, stride_q_head,
        HALF, BLOCK_Q_HEADS, BLOCK_HALF, INTERPRETED,
    )  # fmt: skip
    _rotate_heads(
        k_ptr + token * stride_k_tok, cos, sin, num_kv_heads, stride_k_head,
        HALF, BLOCK_KV_HEADS, BLOCK_HALF, INTERPRETED,
    )  # fmt: skip


def rope_inplace(
    cos_sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J RoPE of q [N, Hq, D] and k [N, Hkv, D] (views with unit stride along D, such as
    the slices of a fused qkv projection) in place, with cos_sin [N, 2, D/2] float32."""
    num_tokens, num_q_heads, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k need unit stride along head_dim, got {q.stride()}, {k.stride()}")
    if num_tokens:
        half = head_dim // 2
        _rope_kernel[(num_tokens,)](
            q,
            k,
            cos_sin.contiguous(),
            num_q_heads,
            k.shape[1],
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            HALF=half,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_Q_HEADS=triton.next_power_of_2(num_q_heads),
            BLOCK_KV_HEADS=triton.next_power_of_2(k.shape[1]),
            INTERPRETED=interpreting(),
            num_warps=4,
        )
    return q, k


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [N, 2I]: gate columns first
    out_ptr,  # [N, I]
    inter,
    stride_in,
    stride_out,
    BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter + offs, mask=mask, other=0.0)
    silu = rounded(gate * tl.sigmoid(gate), dtype, INTERPRETED)  # F.silu rounds its output
    tl.store(
        out_ptr + row * stride_out + offs,
        rounded(silu * up.to(tl.float32), dtype, INTERPRETED),
        mask,
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] -> silu(gate) * up [N, I], rounded as the two torch ops round."""
    num_tokens, width = gate_up.shape
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens:
        block = min(triton.next_power_of_2(inter), 1024)
        _silu_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            gate_up,
            out,
            inter,
            gate_up.stride(0),
            out.stride(0),
            BLOCK=block,
            INTERPRETED=interpreting(),
            num_warps=4,
        )
    return out
