"""bfloat16 on a CPU without native bfloat16 support: GEMMs and attention computed in float32.

torch runs a CPU bfloat16 GEMM through oneDNN. With AVX512-BF16 or AMX that is the fastest
path there is; without them (AVX2 parts: AMD Zen 2/3, older Xeons) oneDNN falls back to
kernels 5-8x slower than float32 at prefill sizes (a 256 x 640 x 384 GEMM: 14 ms against
1.7 ms). There, bfloat16 weights are widened to float32 a slab at a time into a small scratch
buffer and multiplied by MKL's float32 GEMM while the slab is still in cache: DRAM traffic
stays that of bfloat16 weights and the arithmetic is float32. Attention (torch's CPU flash
kernel) is as slow in bfloat16 there, and its operands are small: the torch backend widens them
(attention/backend).

Numerics are those of a bfloat16 GEMM: bfloat16 x bfloat16 products are exact in float32,
they are added in float32 and the result is rounded to bfloat16 once, as oneDNN does; only
the order of the additions differs.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

_SLAB_ELEMENTS = 1 << 19
"""Weight elements widened per GEMM call: 2 MiB of float32, which stays in L2/L3 for the
multiply (smaller slabs cost more calls; whole large weights spill to DRAM twice)."""

_scratch = threading.local()
_cpu_paths = True
"""CPU-only fast paths (this widening, model/cpu_head's prepacked lm_head). Off only while
tools run the GPU step's code path on CPU tensors (kernel counts): a GPU takes neither, so
neither may its stand-in."""


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU runs bfloat16 GEMMs natively (AVX512-BF16 or AMX, as oneDNN sees it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def widens_bf16(x: torch.Tensor) -> bool:
    """Whether a CPU op on bfloat16 `x` should compute in float32 (module docstring)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and _cpu_paths and not native_bf16()


def cpu_paths() -> bool:
    """Whether CPU-only fast paths may run (see `_cpu_paths`)."""
    return _cpu_paths


def set_cpu_paths(enabled: bool) -> None:
    """Allow (the default) or forbid the CPU-only fast paths; see `_cpu_paths`."""
    global _cpu_paths
    _cpu_paths = enabled


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [*, K] times weight [N, K]^T -> [*, N] in x's dtype, as F.linear."""
    if not (widens_bf16(x) and weight.dtype == torch.bfloat16):
        return F.linear(x, weight)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    num_out, width = weight.shape
    out = torch.empty(x2d.shape[0], num_out, dtype=torch.float32)  # [M, N]
    step = max(1, _SLAB_ELEMENTS // width)
    slab_buffer = _slab_buffer(min(step, num_out) * width)
    for start in range(0, num_out, step):
        stop = min(num_out, start + step)
        slab = slab_buffer[: (stop - start) * width].view(stop - start, width)
        slab.copy_(weight[start:stop])  # widened, [n, K]
        torch.mm(x2d, slab.t(), out=out[:, start:stop])
    return out.to(x.dtype).reshape(*lead, num_out)


def _slab_buffer(elements: int) -> torch.Tensor:
    """This thread's float32 scratch of at least `elements` (grown, never shrunk)."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < elements:
        # NOTE: a normal tensor even when first asked for under inference_mode: an inference
        # tensor could not be written outside it later.
        with torch.inference_mode(False):
            buffer = torch.empty(elements, dtype=torch.float32)
        _scratch.buffer = buffer
    return buffer
