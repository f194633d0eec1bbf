"""fp8 weights on each device: which kernel variant runs them, and the torch definition of the
dynamic per-token activation quantization that the W8A8 variant's Triton kernels reproduce.

The one place that decides by device (the Triton GEMM, the fused MoE and the AOT compile test
all ask `fp8_variant`):
* "w8a8": CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell: fp8 tensor cores, Triton's
  fp8e4nv type): each activation row is quantized to e4m3 with its own scale, the GEMM runs
  e4m3 x e4m3 with float32 accumulation and scales the result by the row's and the weight's;
* "w8a16-bytes": older GPUs (sm_80): e4m3 weights decoded from their bytes, model-dtype
  activations;
* "w8a16": the CPU (only Triton's interpreter runs the kernels there; CPU inference keeps fp8
  weights dequantized, quantization/weight): e4m3 loaded as it is, model-dtype activations.
Imports no triton.
"""

from __future__ import annotations

import functools

import torch

from ernie_cluster.quantization.schemes import FP8_MAX

W8A8_MIN_CAPABILITY = (8, 9)
FP8_VARIANTS = ("w8a8", "w8a16", "w8a16-bytes")
MIN_ROW_SCALE = 2.0**-126
"""The smallest row scale: float32's smallest normal number. An all-zero row gets it (its values
quantize to 0 whatever the scale; 0 would divide 0 by 0), and no scale is ever subnormal, which
a GPU may flush to 0."""
MIN_GROUP_FOR_W8A8 = 32
"""Scale groups of a W8A8 weight are whole multiples of this: each K step must lie in one group
(its partial product takes one scale per row), and an fp8 tl.dot needs K >= 32."""


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_variant(device: torch.device) -> str:
    """How the Triton kernels run e4m3 weights on `device` (see the module docstring)."""
    if device.type != "cuda":
        return "w8a16"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "w8a8" if _cuda_capability(index) >= W8A8_MIN_CAPABILITY else "w8a16-bytes"


def takes_fp8_activations(group_size: int) -> bool:
    """Whether an e4m3 weight with `group_size` columns per scale (0: one per row) can run
    W8A8 where the device does; other groups (only from odd tensor-parallel slices) run W8A16."""
    return group_size % MIN_GROUP_FOR_W8A8 == 0


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] in any float dtype -> (e4m3 [M, K], scale [M] float32): each row's scale is
    max(|row|) / 448 (at least MIN_ROW_SCALE), its values e4m3(clamp(x / scale, +-448)) rounded
    to nearest even. The kernels compute exactly this (float32 divisions rounded as IEEE)."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_ROW_SCALE)  # [M]
    values = (x32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values, scale


def dequantize_rows_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(e4m3 [M, K], scale [M]) -> [M, K] float32: what a W8A8 GEMM multiplies."""
    return values.float() * scale[:, None]
