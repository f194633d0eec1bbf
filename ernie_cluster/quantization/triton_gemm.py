"""Triton GEMM by a quantized weight, dequantized inside the kernel: x [M, K] in the model dtype
times W [N, K]^T stored in the canonical layout of quantization/schemes, with float32
accumulation, for the CUDA path of quantization/weight.

Owns the dense kernel, its tile configs and the `tl` helpers that load and scale a weight tile,
which the fused-MoE kernels (model/triton_moe) share. W8A16 / W4A16: one scale per row: the dot
takes the exact quantized values (int8, int4 and e4m3 are exact in bf16, fp16 and fp32) and the
scales multiply the float32 accumulator. Scale groups: each weight tile is dequantized in
float32 and rounded once to the activation dtype for the dot (a second accumulator per group
measured as register spills in the AOT compile). W8A8 (e4m3 weights where
quantization/fp8_activations.fp8_variant says so): x comes quantized per row
(quantization/triton_fp8_rows), the dot is e4m3 x e4m3, and the accumulator is scaled by the row's
scale and the weight's (per row, or per group on each K step's partial product). Imports
triton: load it only on the Triton path (on CPU tensors only under TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ernie_cluster.quantization import fp8_activations
from ernie_cluster.quantization.schemes import Scheme
from ernie_cluster.quantization.triton_fp8_rows import quantize_rows
from ernie_cluster.quantization.weight import QuantizedWeight
from ernie_cluster.triton_env import dot_precision, interpreting
from ernie_cluster.triton_rounding import rounded


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes of the dense kernel: BLOCK_M rows of x, BLOCK_N weight rows, BLOCK_K step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Keyed by the largest M each serves. Decode-sized M streams the weights: narrow N tiles give
# more programs to spread the stream over the SMs (qkv 3072 / 32 = 96 programs) and a deep K
# step keeps many bytes in flight. Large M is compute-bound: square tiles, fewer stages.
# NOTE: untuned guesses until measured on a GPU; shared memory and spills are checked by
# tests/model/test_triton_aot.py on sm_80 and sm_90.
CONFIGS: tuple[tuple[float, GemmConfig], ...] = (
    (16, GemmConfig(16, 32, 128, 4, 4)),
    (64, GemmConfig(64, 64, 128, 4, 3)),
    (float("inf"), GemmConfig(128, 128, 64, 8, 3)),
)


def pick_config(num_rows: int) -> GemmConfig:
    return next(config for bound, config in CONFIGS if num_rows <= bound)


def fit_block_k(block_k: int, group_size: int) -> int:
    """The K step for scale groups of `group_size` columns (0: one scale per row): the config's
    when it divides the group, else the group's largest power-of-two factor when that is at
    least 16 (tl.dot's minimum), so each K step lies in one group and loads one scale per row.
    Smaller groups keep the step and gather a scale per element."""
    if group_size == 0 or group_size % block_k == 0:
        return block_k
    return min(block_k, group_size & -group_size) if group_size & -group_size >= 16 else block_k


def for_operands(config: GemmConfig, wide: bool) -> GemmConfig:
    """The config for 2-byte activations, or its float32 (`wide`) variant: exact float32 dots
    run on CUDA cores, whose registers the 2-byte tiles overflow, so K steps by 16 over at most
    64 columns in two stages (as model/triton_moe.for_operands)."""
    if not wide:
        return config
    return replace(config, block_n=min(config.block_n, 64), block_k=16, num_stages=2)


def weight_format(scheme: Scheme, device: torch.device) -> str:
    """The kernels' WFORMAT for a scheme's storage on `device`: "int8" and "fp8" load as they
    are, "int4" two per byte, "fp8bits" decodes e4m3 from its bytes where Triton has no e4m3
    type (fp8_activations.fp8_variant "w8a16-bytes"). (The MoE kernels take "" for an
    unquantized weight.)"""
    if scheme.name == "wint8":
        return "int8"
    if scheme.name == "wint4":
        return "int4"
    return "fp8bits" if fp8_activations.fp8_variant(device) == "w8a16-bytes" else "fp8"


def runs_w8a8(weight: QuantizedWeight, group_size: int, device: torch.device) -> bool:
    """Whether the kernels multiply `weight` (GROUP_SIZE `group_size`) by fp8 activations on
    `device`: an e4m3 weight where the device's variant is "w8a8" and each K step lies in one
    scale group (fp8_activations.MIN_GROUP_FOR_W8A8)."""
    return (
        weight.scheme.storage == torch.float8_e4m3fn
        and fp8_activations.fp8_variant(device) == "w8a8"
        and group_size % fp8_activations.MIN_GROUP_FOR_W8A8 == 0
    )


def kernel_operands(
    weight: QuantizedWeight, expert: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    """(qweight, scale, WFORMAT, GROUP_SIZE) as the kernels take them: contiguous, one expert's
    when `expert` is given, e4m3 viewed as bytes for "fp8bits", GROUP_SIZE 0 for one scale per
    row. Raises for a CPU-prepacked fp8 weight, which dropped its canonical qweight."""
    if weight.qweight.numel() == 0 and weight.scale.numel():
        raise ValueError(
            f"{weight.scheme.name} weight {weight.shape} holds no canonical qweight (prepacked "
            "for the CPU); build it with prepack_for_cpu=False for the Triton kernels"
        )
    qweight, scale = weight.qweight, weight.scale
    if expert is not None:
        qweight, scale = qweight[expert], scale[expert]
    fmt = weight_format(weight.scheme, device)
    if fmt == "fp8bits":
        qweight = qweight.view(torch.uint8)
    group_size = 0 if scale.shape[-1] == 1 else weight.group_size
    return qweight.contiguous(), scale.contiguous(), fmt, group_size


@triton.jit
def _weight_values(
    q_ptrs, q_mask, WFORMAT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """q_ptrs [BN, BK] ([BN, BK / 2] bytes for int4) -> the quantized values [BN, BK] exactly,
    in a type that converts to the dot's exactly (int8, e4m3), or for "fp8bits" the values over
    `_unit` (float16)."""
    if WFORMAT == "int4":
        packed = tl.load(q_ptrs, mask=q_mask, other=0)  # [BN, BK / 2] uint8
        low = (packed & 0xF).to(tl.int8) - 8  # column 2j
        high = (packed >> 4).to(tl.int8) - 8  # column 2j + 1
        # join puts each pair last, so the row-major reshape interleaves them in column order.
        values = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    elif WFORMAT == "fp8bits":
        # e4m3 (bias 7) moved bit for bit into float16's fields (bias 15) is the value / 2^8,
        # subnormals included. NaN (0x7F) never occurs: quantize clamps.
        bits = tl.load(q_ptrs, mask=q_mask, other=0).to(tl.uint16)
        fields = (((bits & 0x7F) << 7) | ((bits & 0x80) << 8)).to(tl.uint16)
        values = fields.to(tl.float16, bitcast=True)
    elif WFORMAT == "fp8":
        values = tl.load(q_ptrs, mask=q_mask, other=0.0)
    else:  # int8
        values = tl.load(q_ptrs, mask=q_mask, other=0)
    return values


@triton.jit
def dequant_dot(
    acc,  # [BM, BN] float32
    a,  # [BM, BK] activations, in the dot's dtype
    q_ptrs,  # [BN, BK] weight values ([BN, BK / 2] bytes for int4), rows n, columns k_start..
    q_mask,
    s_ptrs,  # [BN] float32: first scale of each row n
    n_ok,  # [BN]
    offs_k,  # [BK]
    k_start,
    num_cols,  # K
    WFORMAT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # 0: one scale per row, applied by `channel_scaled`
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + a @ W[n, k_start:k_start + BK]^T, W = q * scale."""
    values = _weight_values(q_ptrs, q_mask, WFORMAT, BLOCK_N, BLOCK_K)
    if GROUP_SIZE == 0:
        weight = values.to(a.dtype)  # exact; `channel_scaled` applies the scales
    elif GROUP_SIZE % BLOCK_K == 0:  # the step lies in one group: one scale per row
        scale = tl.load(s_ptrs + k_start // GROUP_SIZE, mask=n_ok, other=0.0)  # [BN]
        scale = scale * _unit(WFORMAT)
        weight = (values.to(tl.float32) * scale[:, None]).to(a.dtype)
    else:  # groups smaller than a step: a scale per element
        cols = k_start + offs_k
        s_mask = n_ok[:, None] & (cols < num_cols)[None, :]
        scale = tl.load(s_ptrs[:, None] + (cols // GROUP_SIZE)[None, :], mask=s_mask, other=0.0)
        weight = (values.to(tl.float32) * (scale * _unit(WFORMAT))).to(a.dtype)  # [BN, BK]
    return tl.dot(a, tl.trans(weight), acc, input_precision=PRECISION)


@triton.jit
def channel_scaled(acc, s_ptrs, n_ok, WFORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """acc [BM, BN] times each row's one scale (GROUP_SIZE 0); as it is otherwise."""
    if GROUP_SIZE == 0:
        scale = tl.load(s_ptrs, mask=n_ok, other=0.0) * _unit(WFORMAT)  # [BN]
        acc = acc * scale[None, :]
    return acc


@triton.jit
def fp8_dot(
    acc,  # [BM, BN] float32
    a,  # [BM, BK] e4m3 activation values (float32 holding them when UPCAST)
    q_ptrs,  # [BN, BK] e4m3 weight values, rows n, columns k_start..
    q_mask,
    s_ptrs,  # [BN] float32: first scale of each row n
    n_ok,  # [BN]
    k_start,
    GROUP_SIZE: tl.constexpr,  # 0: one scale per row, applied by `channel_scaled`
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """W8A8: acc + a @ q[n, k_start:k_start + BK]^T in float32; with scale groups, the step's
    product times each row's scale of its group (a step lies in one group)."""
    values = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BN, BK] e4m3
    if UPCAST:
        # The interpreter: e4m3 products and their sums are exact in an ieee float32 dot.
        product = tl.dot(a, tl.trans(values.to(tl.float32)), input_precision="ieee")
    else:
        # NOTE: Hopper's fp8 MMA adds into an accumulator narrower than float32, and Triton's
        # sm_90 default promotes it never; here it is added into float32 every K step.
        product = tl.dot(a, tl.trans(values), max_num_imprecise_acc=BLOCK_K)
    if GROUP_SIZE == 0:
        return acc + product
    scale = tl.load(s_ptrs + k_start // GROUP_SIZE, mask=n_ok, other=0.0)  # [BN]
    return acc + product * scale[None, :]


@triton.jit
def weight_dot(
    acc, a, q_ptrs, q_mask, s_ptrs, n_ok, offs_k, k_start, num_cols,
    WFORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, A_FP8: tl.constexpr,
):  # fmt: skip
    """One K step of any quantized kernel: `fp8_dot` when the activations are e4m3 (W8A8),
    else `dequant_dot` (arguments as theirs)."""
    if A_FP8:
        return fp8_dot(acc, a, q_ptrs, q_mask, s_ptrs, n_ok, k_start, GROUP_SIZE, BLOCK_K, UPCAST)
    return dequant_dot(
        acc, a, q_ptrs, q_mask, s_ptrs, n_ok, offs_k, k_start, num_cols,
        WFORMAT, GROUP_SIZE, BLOCK_N, BLOCK_K, PRECISION,
    )  # fmt: skip


@triton.jit
def rows_scaled(acc, a_scale_ptrs, row_ok):
    """W8A8: acc [BM, BN] times each activation row's scale ([BM] pointers)."""
    a_scale = tl.load(a_scale_ptrs, mask=row_ok, other=0.0)  # [BM]
    return acc * a_scale[:, None]


@triton.jit
def _unit(WFORMAT: tl.constexpr):
    """What `_weight_values` leaves out of a value: 2^8 for "fp8bits" (a power of two, exact
    on the scales, where it costs one multiply per row instead of one per weight), else 1."""
    return 256.0 if WFORMAT == "fp8bits" else 1.0


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # [M, K] (e4m3 for A_FP8)
    q_ptr,  # [N, K] (int8, e4m3) or [N, K / 2] (int4 bytes, e4m3 bytes for fp8bits: [N, K])
    s_ptr,  # [N, G] float32
    xs_ptr,  # [M] float32 row scales of x (A_FP8 only; None otherwise)
    out_ptr,  # [M, N], the model's dtype
    num_rows,
    num_out,
    num_cols,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    WFORMAT: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    A_FP8: tl.constexpr,  # W8A8: x and the weight are e4m3 (WFORMAT "fp8")
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # M tiles vary fastest, so the programs running together share their weight tiles.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < num_rows
    n_ok = offs_n < num_out
    offs_k = tl.arange(0, BLOCK_K)
    # values per stored byte (annotated: the interpreter keeps it a Python int)
    PACK: tl.constexpr = 2 if WFORMAT == "int4" else 1
    offs_kq = tl.arange(0, BLOCK_K // PACK)
    a_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn + offs_kq[None, :]  # [BN, BK / PACK]
    s_ptrs = s_ptr + offs_n * stride_sn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, num_cols, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            q_mask = n_ok[:, None]
        else:
            k_ok = offs_k < num_cols - k_start
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q_mask = n_ok[:, None] & (offs_kq < (num_cols - k_start) // PACK)[None, :]
        if UPCAST:
            a = a.to(tl.float32)
        acc = weight_dot(
            acc, a, q_ptrs, q_mask, s_ptrs, n_ok, offs_k, k_start, num_cols,
            WFORMAT, GROUP_SIZE, BLOCK_N, BLOCK_K, PRECISION, UPCAST, A_FP8,
        )  # fmt: skip
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // PACK
    acc = channel_scaled(acc, s_ptrs, n_ok, WFORMAT, GROUP_SIZE)
    if A_FP8:
        acc = rows_scaled(acc, xs_ptr + offs_m, m_ok)
    dtype = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, rounded(acc, dtype, INTERPRETED), mask=m_ok[:, None] & n_ok[None, :])


def quantized_matmul(
    x: torch.Tensor, weight: QuantizedWeight, expert: int | None = None
) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32) times W^T -> [M, N] in x's dtype; W [N, K] is `weight`,
    or expert `expert` of a stacked [E, N, K] one. CUDA tensors, or CPU ones under
    TRITON_INTERPRET=1 (built with prepack_for_cpu=False). W8A8 (`runs_w8a8`) quantizes x's
    rows to e4m3 first, one launch more."""
    interpreted = interpreting()
    if x.device.type == "cpu" and not interpreted:
        raise ValueError(f"quantized_matmul runs on CUDA tensors; got x on {x.device}")
    stacked = len(weight.shape) == 3
    if stacked != (expert is not None):
        raise ValueError(f"expert={expert} for a weight of shape {weight.shape}")
    num_out, num_cols = weight.shape[-2:]
    if x.dim() != 2 or x.shape[1] != num_cols:
        raise ValueError(f"x {tuple(x.shape)} does not multiply a weight {weight.shape}")
    qweight, scale, fmt, group_size = kernel_operands(weight, expert, x.device)
    num_rows = x.shape[0]
    out = torch.empty(num_rows, num_out, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    a_fp8 = runs_w8a8(weight, group_size, x.device)
    x_scale = None
    if a_fp8:
        x, x_scale = quantize_rows(x)  # [M, K] e4m3, [M]
    # The interpreter computes bfloat16 wrongly (dots, and casts truncate): it upcasts the
    # operands, runs exact dots and rounds the result as a GPU would (triton_rounding).
    config = for_operands(pick_config(num_rows), wide=x.element_size() > 2)
    block_k = fit_block_k(config.block_k, group_size)
    grid = (triton.cdiv(num_rows, config.block_m), triton.cdiv(num_out, config.block_n))
    _quant_matmul_kernel[grid](
        x,
        qweight,
        scale,
        x_scale,
        out,
        num_rows,
        num_out,
        num_cols,
        x.stride(0),
        qweight.stride(0),
        scale.stride(0),
        out.stride(0),
        WFORMAT=fmt,
        GROUP_SIZE=group_size,
        A_FP8=a_fp8,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        EVEN_K=num_cols % block_k == 0,
        UPCAST=interpreted,
        INTERPRETED=interpreted,
        PRECISION="ieee" if interpreted else dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
