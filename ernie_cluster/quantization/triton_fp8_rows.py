"""Triton kernel that quantizes activation rows to e4m3 with one dynamic scale per row: the
A operand of the W8A8 GEMMs (quantization/triton_gemm, the fused MoE's gate_up input and its
SwiGLU output before down). Equal, bit for bit, to fp8_activations.quantize_rows_fp8 whether
compiled or interpreted (the e4m3 rounding is attention/triton_kv_quant's, which rounds as a GPU
does under the interpreter too). Imports triton: load it only on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.attention.triton_kv_quant import quantize_e4m3
from ernie_cluster.quantization.fp8_activations import MIN_ROW_SCALE
from ernie_cluster.quantization.schemes import FP8_MAX
from ernie_cluster.triton_env import interpreting

MAX_BLOCK_K = 1024
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_MAX)
_MIN_ROW_SCALE: tl.constexpr = tl.constexpr(MIN_ROW_SCALE)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # [R, K] float
    q_ptr,  # [R, K] out: e4m3
    s_ptr,  # [R] out: float32 row scales
    tile_experts_ptr,  # [R / ROWS_PER_TILE] local expert of each tile, -1 unused (or None)
    num_cols,
    stride_xm,
    stride_qm,
    ROWS_PER_TILE: tl.constexpr,  # 0: every row is quantized
    BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0)
    # NOTE: nested, not `and`: the load must not be traced without a tile table.
    if ROWS_PER_TILE:  # noqa: SIM102
        # Rows of the MoE's unused tiles were never written (and down never reads them).
        if tl.load(tile_experts_ptr + row // ROWS_PER_TILE) < 0:
            return
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    peak = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k_start in range(0, num_cols, BLOCK_K):
        x = tl.load(x_row + k_start + offs, mask=offs < num_cols - k_start, other=0.0)
        peak = tl.maximum(peak, tl.abs(x.to(tl.float32)))
    amax = tl.max(peak, axis=0)
    # NOTE: `/` compiles to an approximate division on NVIDIA GPUs; div_rn rounds as torch.
    scale = tl.maximum(tl.math.div_rn(amax, amax * 0.0 + _FP8_MAX), _MIN_ROW_SCALE)
    tl.store(s_ptr + row, scale)
    for k_start in range(0, num_cols, BLOCK_K):
        k_ok = offs < num_cols - k_start
        x = tl.load(x_row + k_start + offs, mask=k_ok, other=0.0)
        tl.store(q_row + k_start + offs, quantize_e4m3(x, scale, INTERPRETED), mask=k_ok)


def quantize_rows(
    x: torch.Tensor, tile_experts: torch.Tensor | None = None, rows_per_tile: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] (unit column stride) -> (e4m3 [R, K], scale [R] float32), as
    fp8_activations.quantize_rows_fp8. Given `tile_experts` [R / rows_per_tile] (the fused
    MoE's tile layout), the rows of tiles marked -1 are skipped and left unset."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(
            f"quantize_rows takes [rows, cols] with unit column stride; got {tuple(x.shape)} "
            f"with strides {x.stride()}"
        )
    num_rows, num_cols = x.shape
    values = torch.empty(num_rows, num_cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return values, scale
    if tile_experts is not None and num_rows != tile_experts.numel() * rows_per_tile:
        raise ValueError(
            f"{num_rows} rows are not {tile_experts.numel()} tiles of {rows_per_tile} rows"
        )
    _quantize_rows_kernel[(num_rows,)](
        x,
        values,
        scale,
        tile_experts,
        num_cols,
        x.stride(0),
        values.stride(0),
        ROWS_PER_TILE=rows_per_tile if tile_experts is not None else 0,
        BLOCK_K=min(triton.next_power_of_2(num_cols), MAX_BLOCK_K),
        INTERPRETED=interpreting(),
        num_warps=4,
    )
    return values, scale
