"""Rounding to a tensor's storage dtype inside Triton kernels, the same compiled or interpreted.

A GPU rounds float32 to bfloat16 to nearest even when it casts or stores; Triton's CPU
interpreter truncates instead. Kernels that keep their math in float32 call `rounded` where the
torch reference rounds, so interpreted results match the reference and store exactly. Imports
triton: load it only on the Triton path.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded(x, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 x -> float32 holding x rounded to DTYPE (to nearest even), which then stores
    into a DTYPE pointer exactly."""
    if INTERPRETED and DTYPE == tl.bfloat16:  # noqa: SIM300 (a Triton dtype, not a constant)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)
