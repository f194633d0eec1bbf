"""fp8 KV cache math inside the Triton attention kernels: quantize on write, dequantize on
read, equal to attention/kv_quant's torch definitions whether compiled or interpreted.

A GPU rounds float32 to e4m3 to nearest even (with saturation). Triton's CPU interpreter
does not (Triton 3.9): its float32 -> fp8 cast rounds ties up (100 -> 104, not 96), lets a
mantissa carry corrupt the exponent (7.77 -> 4) and misrounds near subnormals. So when
interpreting, values are first rounded to e4m3 in float32 here, and the cast then only
re-encodes exact values, which it does right; its fp8 -> float32 decode is exact. Also owns
the one launch setting an fp8 cache changes (pipeline stages). Imports triton: load it only
on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ernie_cluster.attention.kv_quant import is_fp8
from ernie_cluster.triton_rounding import rounded


@triton.jit
def _round_to_e4m3(x):
    """float32 x, |x| <= 448 -> float32 holding x rounded to e4m3fn (to nearest even)."""
    # Normal range: keep 3 of the 23 mantissa bits; a carry runs into the exponent as on
    # the GPU (|x| <= 448 never carries past e4m3's top binade).
    bits = x.to(tl.uint32, bitcast=True)
    normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20 << 20
    # Subnormals (|x| < 2**-6) are multiples of 2**-9; in [2**14, 2**15) float32's own
    # spacing is 2**-9, so the add rounds |x| to that grid (to nearest even) and the
    # subtraction is exact. The sign goes back on as a bit, so -0.0 stays -0.0.
    magnitude = tl.abs(x)
    tiny = ((magnitude + 16384.0) - 16384.0).to(tl.uint32, bitcast=True)
    tiny = tiny | (bits & 0x80000000)
    return tl.where(magnitude < 0.015625, tiny, normal).to(tl.float32, bitcast=True)


@triton.jit
def quantize_e4m3(x, scale, INTERPRETED: tl.constexpr):
    """x [...] (any float dtype) -> e4m3fn [...] of clamp(x / scale, -448, 448)."""
    x = x.to(tl.float32)
    # NOTE: `/` compiles to an approximate division on NVIDIA GPUs, which can move a
    # quotient across an e4m3 rounding boundary; div_rn rounds as torch does.
    x = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if INTERPRETED:
        x = _round_to_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def dequantize_e4m3(x, scale, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """e4m3fn x [...] -> x * scale rounded to DTYPE (the compute dtype). Interpreted, the
    result stays float32 holding the DTYPE value, as the kernels' upcast path computes."""
    x = x.to(tl.float32) * scale
    if INTERPRETED:
        return rounded(x, DTYPE, True)
    else:
        return x.to(DTYPE)


def kv_load_stages(q: torch.Tensor, kv_cache: torch.Tensor) -> int:
    """Software-pipeline stages (`num_stages`) of the decode and prefill kernels: 2, but 1 for
    float32 compute over an fp8 cache, where pipelined e4m3 tiles spill (compiled for sm_90:
    255 registers and a 176 to 232 byte stack, against 64 to 72 registers and none with one
    stage)."""
    return 1 if is_fp8(kv_cache) and q.dtype == torch.float32 else 2
