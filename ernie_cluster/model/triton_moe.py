"""Triton fused-MoE kernels: grouped GEMMs over (token, slot) pairs laid out in per-expert tiles.

Owns two kernels and their launcher. `gate_up` reads each tile's token rows straight from x,
multiplies by the tile's expert gate and up weights and writes silu(gate) * up; `down` multiplies
that by the expert's down weights and writes each pair's output times its routing weight to the
pair's own row (`triton_router.combine` adds the k slots of a token afterwards, in order). The
tile layout comes from `triton_router.sort_to_tiles` (or `fused_moe.align_to_tiles`). Quantized
expert weights (quantization/weight) are dequantized in the kernels' weight tiles by the helpers
of quantization/triton_gemm, under constexpr flags, so the unquantized kernels compile as they
did; with W8A8 (e4m3 experts on sm_89+, quantization/fp8_activations) gate_up reads x quantized
per token and down reads the SwiGLU output quantized per row (quantization/triton_fp8_rows).
Triton is imported only when a kernel is first used, so the package imports without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ernie_cluster.quantization.weight import QuantizedWeight
from ernie_cluster.triton_env import dot_precision, interpreting


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one kernel: BLOCK_N output columns, BLOCK_K reduction step."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    """block_m rows per tile (shared by both kernels: it fixes the tile layout)."""

    block_m: int
    gate_up: KernelConfig
    down: KernelConfig


# Chosen for H100/H200 bf16 at the real shapes (H=2560, I=1536, 64 experts, top-6), keyed by
# the mean pairs per local expert. Few rows per expert: the step streams expert weights, so one
# tile per expert and narrow N tiles (more programs to fill the SMs). Many rows: compute-bound,
# larger tiles. gate_up keeps two accumulators (gate and up), hence its narrower N at the top.
# NOTE: untuned guesses until measured on a GPU (`python -m ernie_cluster.model.fused_moe`).
CONFIGS: tuple[tuple[float, MoeConfig], ...] = (
    (16, MoeConfig(16, KernelConfig(64, 128, 4, 4), KernelConfig(64, 128, 4, 4))),
    (32, MoeConfig(32, KernelConfig(64, 128, 4, 4), KernelConfig(128, 64, 4, 4))),
    (64, MoeConfig(64, KernelConfig(128, 64, 8, 3), KernelConfig(128, 64, 4, 4))),
    (float("inf"), MoeConfig(128, KernelConfig(64, 64, 8, 4), KernelConfig(128, 64, 8, 3))),
)


def pick_config(num_pairs: int, num_local: int) -> MoeConfig:
    """Config for `num_pairs` (token, slot) pairs over `num_local` experts (static shapes only,
    so the choice never depends on the routing). Padding pairs of a fixed-capacity buffer count
    too: a buffer sized for the worst case gets tiles sized for it."""
    per_expert = num_pairs / max(num_local, 1)
    return next(config for bound, config in CONFIGS if per_expert <= bound)


def shared_memory_bytes(block_m: int, kernel: KernelConfig, num_b_tiles: int, itemsize: int) -> int:
    """Pipelined operand buffers of one program: an A tile and `num_b_tiles` B tiles per stage."""
    per_stage = (
        block_m * kernel.block_k + num_b_tiles * kernel.block_k * kernel.block_n
    ) * itemsize
    return per_stage * kernel.num_stages


def for_operands(kernel: KernelConfig, wide: bool, accumulators: int) -> KernelConfig:
    """The table's config for 2-byte operands, or its float32 (`wide`) variant. NOTE: float32
    (tests, debugging) runs exact (ieee) dots on CUDA cores, whose registers the 2-byte tiles
    overflow (spills found by the AOT compile test on sm_80 and sm_90): K steps by 16, the
    tile keeps 64 accumulator columns in all (gate_up has two accumulators) and two stages."""
    if not wide:
        return kernel
    return KernelConfig(min(kernel.block_n, 64 // accumulators), 16, kernel.num_warps, 2)


@functools.cache
def is_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels():
    """Defines (once) the two kernels -> (gate_up, down, whether triton interprets them).

    NOTE: `triton.jit` reads TRITON_INTERPRET when it decorates, so the flag is taken here too.
    """
    import triton
    import triton.language as tl

    # NOTE: bound as module globals: the interpreter runs a kernel with its module's globals
    # only (no closure), and the helpers' module imports triton, so it loads here, not above.
    global channel_scaled, rows_scaled, weight_dot
    from ernie_cluster.quantization.triton_gemm import (
        channel_scaled,
        rows_scaled,
        weight_dot,
    )

    @triton.jit
    def gate_up_kernel(
        x_ptr,  # [M, H] (e4m3 for A_FP8)
        w_ptr,  # [E, 2I, H], gate rows first (quantized: qweight, H / 2 bytes for int4)
        s_ptr,  # [E, 2I, G] float32 scales (quantized only; None otherwise)
        xs_ptr,  # [M] float32 row scales of x (A_FP8 only; None otherwise)
        act_ptr,  # [T * BLOCK_M, I] out: silu(gate) * up per padded row, x.dtype
        tile_pairs_ptr,  # [T * BLOCK_M] pair id, num_pairs on padding rows
        tile_experts_ptr,  # [T] local expert, -1 on unused tiles
        num_pairs,
        hidden,
        inter,
        stride_xm,
        stride_we,
        stride_wn,
        stride_am,
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        WFORMAT: tl.constexpr,  # "" or a quantization/triton_gemm format
        GROUP_SIZE: tl.constexpr,  # columns per scale, 0: one per row
        A_FP8: tl.constexpr,  # W8A8: x and the weights are e4m3
    ):
        tile = tl.program_id(0)
        expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
        if expert < 0:
            return
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(tile_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WFORMAT == "":
            # B tiles read the [out, in] weight rows as [BK, BN] columns (in is contiguous).
            g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
            u_ptrs = g_ptrs + inter * stride_wn
            for k_start in range(0, hidden, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
                    u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < hidden - k_start
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
                acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)
                acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K
                u_ptrs += BLOCK_K
        else:
            # Quantized: [BN, BK] tiles of values (triton_gemm.dequant_dot), scales per row.
            # values per stored byte (annotated: the interpreter keeps it a Python int)
            PACK: tl.constexpr = 2 if WFORMAT == "int4" else 1
            offs_kq = tl.arange(0, BLOCK_K // PACK)
            g_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_kq[None, :]
            u_ptrs = g_ptrs + inter * stride_wn
            num_groups = hidden // GROUP_SIZE if GROUP_SIZE else 1
            gs_ptrs = s_ptr + (expert * 2 * inter + offs_n) * num_groups  # [BN]
            us_ptrs = gs_ptrs + inter * num_groups
            for k_start in range(0, hidden, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    q_mask = n_ok[:, None]
                else:
                    k_ok = offs_k < hidden - k_start
                    a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    q_mask = n_ok[:, None] & (offs_kq < (hidden - k_start) // PACK)[None, :]
                if UPCAST:
                    a = a.to(tl.float32)
                acc_gate = weight_dot(
                    acc_gate, a, g_ptrs, q_mask, gs_ptrs, n_ok, offs_k, k_start, hidden,
                    WFORMAT, GROUP_SIZE, BLOCK_N, BLOCK_K, PRECISION, UPCAST, A_FP8,
                )  # fmt: skip
                acc_up = weight_dot(
                    acc_up, a, u_ptrs, q_mask, us_ptrs, n_ok, offs_k, k_start, hidden,
                    WFORMAT, GROUP_SIZE, BLOCK_N, BLOCK_K, PRECISION, UPCAST, A_FP8,
                )  # fmt: skip
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K // PACK
                u_ptrs += BLOCK_K // PACK
            acc_gate = channel_scaled(acc_gate, gs_ptrs, n_ok, WFORMAT, GROUP_SIZE)
            acc_up = channel_scaled(acc_up, us_ptrs, n_ok, WFORMAT, GROUP_SIZE)
            if A_FP8:  # each pair's row is its token's
                acc_gate = rows_scaled(acc_gate, xs_ptr + tokens, row_ok)
                acc_up = rows_scaled(acc_up, xs_ptr + tokens, row_ok)
        # Rounded where the unfused ops round (gate, up, silu(gate)), to stay close to them.
        dtype = act_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        act = silu * acc_up.to(dtype).to(tl.float32)
        # Padding rows are written too (as zeros: their A rows loaded as zeros), so the down
        # kernel reads whole tiles without a row mask.
        act_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :]
        tl.store(act_ptrs, act.to(dtype), mask=n_ok[None, :])

    @triton.jit
    def down_kernel(
        act_ptr,  # [T * BLOCK_M, I] (e4m3 for A_FP8)
        w_ptr,  # [E, H, I] (quantized: qweight, I / 2 bytes for int4)
        s_ptr,  # [E, H, G] float32 scales (quantized only; None otherwise)
        as_ptr,  # [T * BLOCK_M] float32 row scales of act (A_FP8 only; None otherwise)
        out_ptr,  # [P, H] out, the activation dtype: weighted output of each owned pair
        tile_pairs_ptr,
        tile_experts_ptr,
        weights_ptr,  # [P] routing weight of each pair (unused without HAS_WEIGHTS)
        num_pairs,
        hidden,
        inter,
        stride_am,
        stride_we,
        stride_wn,
        stride_om,
        HAS_WEIGHTS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
        WFORMAT: tl.constexpr,
        GROUP_SIZE: tl.constexpr,
        A_FP8: tl.constexpr,
    ):
        tile = tl.program_id(0)
        expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
        if expert < 0:
            return
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(tile_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WFORMAT == "":
            b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
            for k_start in range(0, inter, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
                else:
                    k_ok = offs_k < inter - k_start
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K
        else:
            # values per stored byte (annotated: the interpreter keeps it a Python int)
            PACK: tl.constexpr = 2 if WFORMAT == "int4" else 1
            offs_kq = tl.arange(0, BLOCK_K // PACK)
            q_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_kq[None, :]
            num_groups = inter // GROUP_SIZE if GROUP_SIZE else 1
            s_ptrs = s_ptr + (expert * hidden + offs_n) * num_groups  # [BN]
            for k_start in range(0, inter, BLOCK_K):
                if EVEN_K:
                    a = tl.load(a_ptrs)
                    q_mask = n_ok[:, None]
                else:
                    k_ok = offs_k < inter - k_start
                    a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                    q_mask = n_ok[:, None] & (offs_kq < (inter - k_start) // PACK)[None, :]
                if UPCAST:
                    a = a.to(tl.float32)
                acc = weight_dot(
                    acc, a, q_ptrs, q_mask, s_ptrs, n_ok, offs_k, k_start, inter,
                    WFORMAT, GROUP_SIZE, BLOCK_N, BLOCK_K, PRECISION, UPCAST, A_FP8,
                )  # fmt: skip
                a_ptrs += BLOCK_K
                q_ptrs += BLOCK_K // PACK
            acc = channel_scaled(acc, s_ptrs, n_ok, WFORMAT, GROUP_SIZE)
            if A_FP8:
                acc = rows_scaled(acc, as_ptr + offs_m, row_ok)
        # NOTE: the expert output and its weighted product are each rounded to the activation
        # dtype (out's), as fused_moe.fused_experts specifies, so every path and every world
        # size adds the same float32 products.
        dtype = out_ptr.dtype.element_ty
        out = acc.to(dtype)
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(dtype)
            out = (out.to(tl.float32) * weight.to(tl.float32)[:, None]).to(dtype)
        out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, out, mask=row_ok[:, None] & n_ok[None, :])

    return gate_up_kernel, down_kernel, interpreting()


def run_experts(
    x: torch.Tensor,
    tile_pairs: torch.Tensor,
    tile_experts: torch.Tensor,
    topk_weights: torch.Tensor | None,
    gate_up: torch.Tensor | QuantizedWeight,
    down: torch.Tensor | QuantizedWeight,
    top_k: int,
    config: MoeConfig,
) -> torch.Tensor:
    """x [M, H], tiles from `align_to_tiles(block_m=config.block_m)`, topk_weights [M, k] or
    None, gate_up [E, 2I, H], down [E, H, I] (plain, or quantized: dequantized in the kernels)
    -> [M * k, H] in x's dtype (float32 when interpreted): w * expert(x) per owned pair; rows
    of pairs not owned here are left unset (`combine` skips them). A W8A8 weight
    (triton_gemm.runs_w8a8) takes its input quantized per row: one launch more each."""
    gate_up_kernel, down_kernel, interpreted = _kernels()
    num_pairs = x.shape[0] * top_k
    hidden, inter = x.shape[1], down.shape[2]
    num_tiles = tile_experts.numel()
    block_m = config.block_m
    x = x.contiguous()
    gate_up, gate_up_scale, gate_up_format, gate_up_group, gate_up_fp8 = _weight_operands(
        gate_up, x.device
    )
    down, down_scale, down_format, down_group, down_fp8 = _weight_operands(down, x.device)
    # The interpreter computes bfloat16 wrongly (dots, and casts truncate), so under it the
    # kernels upcast their operands and keep act and out in float32, which also turns the
    # in-kernel roundings to act's dtype into no-ops. float32 operands get exact (not TF32) dots.
    upcast = interpreted
    act_dtype = torch.float32 if upcast else x.dtype
    out = torch.empty(num_pairs, hidden, dtype=act_dtype, device=x.device)
    if num_tiles == 0:
        return out
    act = torch.empty(num_tiles * block_m, inter, dtype=act_dtype, device=x.device)
    precision = "ieee" if upcast else dot_precision(x.dtype)
    wide = x.element_size() > 2
    x_scale = None
    if gate_up_fp8:  # each token's row quantized once, for all of its k pairs
        x, x_scale = _quantize_rows(x)  # [M, H] e4m3, [M]
    cfg = _fit_groups(
        for_operands(config.gate_up, wide and not gate_up_fp8, accumulators=2), gate_up_group
    )
    gate_up_kernel[(num_tiles, -(-inter // cfg.block_n))](
        x,
        gate_up,
        gate_up_scale,
        x_scale,
        act,
        tile_pairs,
        tile_experts,
        num_pairs,
        hidden,
        inter,
        x.stride(0),
        gate_up.stride(0),
        gate_up.stride(1),
        act.stride(0),
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=hidden % cfg.block_k == 0,
        UPCAST=upcast,
        PRECISION=precision,
        WFORMAT=gate_up_format,
        GROUP_SIZE=gate_up_group,
        A_FP8=gate_up_fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    weights = out if topk_weights is None else topk_weights.reshape(-1).contiguous()
    act_scale = None
    if down_fp8:  # the rows of used tiles; padding rows are zeros
        act, act_scale = _quantize_rows(act, tile_experts, block_m)  # [T * BM, I] e4m3, [T * BM]
    cfg = _fit_groups(for_operands(config.down, wide and not down_fp8, accumulators=1), down_group)
    down_kernel[(num_tiles, -(-hidden // cfg.block_n))](
        act,
        down,
        down_scale,
        act_scale,
        out,
        tile_pairs,
        tile_experts,
        weights,
        num_pairs,
        hidden,
        inter,
        act.stride(0),
        down.stride(0),
        down.stride(1),
        out.stride(0),
        HAS_WEIGHTS=topk_weights is not None,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=inter % cfg.block_k == 0,
        UPCAST=upcast,
        PRECISION=precision,
        WFORMAT=down_format,
        GROUP_SIZE=down_group,
        A_FP8=down_fp8,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _weight_operands(
    weight: torch.Tensor | QuantizedWeight, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, str, int, bool]:
    """(weight or qweight, scales or None, WFORMAT, GROUP_SIZE, A_FP8) of a kernel's expert
    weights."""
    if isinstance(weight, torch.Tensor):
        return weight.contiguous(), None, "", 0, False
    from ernie_cluster.quantization.triton_gemm import kernel_operands, runs_w8a8

    qweight, scale, fmt, group_size = kernel_operands(weight, None, device)
    return qweight, scale, fmt, group_size, runs_w8a8(weight, group_size, device)


def _quantize_rows(x: torch.Tensor, *tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activation rows (quantization/triton_fp8_rows), imported with triton."""
    from ernie_cluster.quantization.triton_fp8_rows import quantize_rows

    return quantize_rows(x, *tiles)


def _fit_groups(kernel: KernelConfig, group_size: int) -> KernelConfig:
    """The K step for scale groups of `group_size` (quantization/triton_gemm.fit_block_k)."""
    if group_size == 0:
        return kernel
    from ernie_cluster.quantization.triton_gemm import fit_block_k

    return replace(kernel, block_k=fit_block_k(kernel.block_k, group_size))
