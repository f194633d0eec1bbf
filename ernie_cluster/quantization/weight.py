"""A quantized weight in a model: its buffers, its matmul on each device, its byte count.

`QuantizedWeight` replaces one nn.Parameter of a module (qkv_proj, o_proj, gate_up_proj,
down_proj: [N, K], or stacked experts [E, N, K]) and holds the canonical layout of
quantization/schemes as buffers, so `.to(device)` and `state_dict` see them. Modules call
`linear(x, weight)`, which takes either kind.

Per device:
* CUDA: the Triton GEMM that dequantizes in the kernel (quantization/triton_gemm); e4m3
  weights with per-token e4m3 activations (W8A8) from sm_89 (quantization/fp8_activations).
* CPU: wint8 runs torch's weight-only int8 kernel (`_weight_int8pack_mm`: int8 weights,
  per-channel scales, activations in the model dtype); wint4 runs torch's int4 CPU kernel on a
  copy packed for it once, here, at quantization time (`_weight_int4pack_mm_for_cpu`); fp8 has
  no CPU kernel faster than bfloat16 (torch._scaled_mm on CPU measured 50x slower than a
  bfloat16 linear at decode sizes), so on CPU an fp8 weight is kept dequantized once, at load,
  in the model dtype: the same values as the GPU's W8A16, without the memory saving. So is an
  int8 weight with several scales per row (a grouped W8A16 checkpoint), which torch's int8
  kernel does not take, and every weight of a float32 model (the int8/int4 kernels are fast
  for bfloat16 and float16 activations only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster import cpu_bf16
from ernie_cluster.quantization.schemes import Scheme, dequantize, quantized_values

CPU_INT4_GROUPS = (32, 64, 128, 256)


class QuantizedWeight(nn.Module):
    """qweight and scale of a logical weight [*, N, K] (see quantization/schemes)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        scheme: Scheme,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        prepack_for_cpu: bool = True,  # False: canonical layout only (Triton tests on CPU)
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.shape = tuple(shape)  # logical [*, N, K]
        self.dtype = dtype  # the model's (activation) dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        # CPU-only prepacked forms (None elsewhere): see the module docstring.
        self.cpu_int4: torch.Tensor | None = None  # [*, N, K/2] uint8, torch's CPU int4 layout
        self.cpu_scale_zeros: torch.Tensor | None = None  # [*, G, N, 2] in dtype
        self.cpu_dense: torch.Tensor | None = None  # [*, N, K] in dtype (fp8 on CPU)
        self.cpu_row_scale: torch.Tensor | None = None  # [*, N] in dtype (wint8's kernel)
        if prepack_for_cpu and qweight.device.type == "cpu":
            self._prepack_for_cpu()

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scale.shape[-1]

    def extra_repr(self) -> str:
        return f"{self.scheme.name}, shape={self.shape}, group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reference weight [*, N, K] in `dtype` (default the model's)."""
        if self.cpu_dense is not None:
            return self.cpu_dense.to(dtype or self.dtype)
        return dequantize(self.qweight, self.scale, self.scheme, dtype or self.dtype)

    def nbytes(self) -> int:
        """Bytes of the canonical layout (what a GPU holds): quantized values and scales."""
        values = math.prod(self.shape) // self.scheme.values_per_byte
        return values * self.scheme.storage.itemsize + self.scale.numel() * 4

    def resident_bytes(self) -> int:
        """Bytes this weight holds on its device now, prepacked copies included."""
        extra = (self.cpu_int4, self.cpu_scale_zeros, self.cpu_row_scale)
        if self.cpu_dense is not None:  # fp8 on CPU keeps only the dense copy
            return self.cpu_dense.numel() * self.cpu_dense.element_size()
        return self.nbytes() + sum(t.numel() * t.element_size() for t in extra if t is not None)

    def _prepack_for_cpu(self) -> None:
        grouped_int8 = self.scheme.name == "wint8" and self.scale.shape[-1] > 1
        # torch's int8/int4 CPU kernels are vectorised for 16-bit activations only (float32
        # measured 12x slower than the unquantized model), so a float32 model keeps its
        # dequantized weights too.
        if (
            self.scheme.storage == torch.float8_e4m3fn
            or grouped_int8
            or self.dtype == torch.float32
        ):
            self.cpu_dense = self.dequantize()
            # No CPU kernel for these (fp8; int8 with several scales per row, from a
            # checkpoint): the values stay reachable through cpu_dense alone.
            self.qweight = self.qweight.new_empty((0,))
            return
        if self.scheme.name == "wint8":
            # Cast once here, not on every step's call.
            self.cpu_row_scale = self.scale[..., 0].to(self.dtype).contiguous()
            return
        if self.scheme.name != "wint4":
            return
        if self.group_size not in CPU_INT4_GROUPS or self.shape[-1] % 2:
            return  # the dequantizing fallback of `linear` serves odd shapes
        # torch's CPU int4 layout: values 0..15 as int32 [N, K], dequantized as
        # (v - 8) * scale + zero; ours is v = q + 8 with zero 0.
        biased = quantized_values(self.qweight, self.scheme).to(torch.int32) + 8  # [*, N, K]
        flat = biased.reshape(-1, *self.shape[-2:])
        packed = [torch._convert_weight_to_int4pack_for_cpu(w.contiguous(), 1) for w in flat]
        self.cpu_int4 = torch.stack(packed).reshape(*self.shape[:-2], *packed[0].shape)
        scale = self.scale.to(self.dtype).transpose(-1, -2)  # [*, G, N]
        self.cpu_scale_zeros = torch.stack((scale, torch.zeros_like(scale)), dim=-1).contiguous()

    def expert(self, index: int) -> ExpertView:
        """One expert of a stacked [E, N, K] weight, for per-expert CPU matmuls."""
        return ExpertView(self, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] (a 2-D weight)."""
        return _matmul(self, None, x)


class ExpertView:
    """Expert `index` of a stacked QuantizedWeight; `linear(x, view)` multiplies by it."""

    def __init__(self, weight: QuantizedWeight, index: int) -> None:
        self.weight = weight
        self.index = index


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight | ExpertView) -> torch.Tensor:
    """x [*, K] times weight [N, K]^T -> [*, N], for a plain, quantized or expert weight."""
    if isinstance(weight, torch.Tensor):
        return cpu_bf16.linear(x, weight) if x.device.type == "cpu" else F.linear(x, weight)
    if isinstance(weight, ExpertView):
        return _matmul(weight.weight, weight.index, x)
    return _matmul(weight, None, x)


def _matmul(weight: QuantizedWeight, expert: int | None, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.is_cuda:
        from ernie_cluster.quantization.triton_gemm import quantized_matmul

        out = quantized_matmul(x2d, weight, expert)
    else:
        out = _cpu_matmul(weight, expert, x2d)
    return out.reshape(*lead, out.shape[-1])


def _pick(tensor: torch.Tensor, expert: int | None) -> torch.Tensor:
    return tensor if expert is None else tensor[expert]


def _cpu_matmul(weight: QuantizedWeight, expert: int | None, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] in the model dtype -> [M, N] in x's dtype."""
    if weight.cpu_dense is not None:
        return cpu_bf16.linear(x, _pick(weight.cpu_dense, expert))
    if weight.cpu_row_scale is not None:
        row_scale = _pick(weight.cpu_row_scale, expert)
        return torch._weight_int8pack_mm(x, _pick(weight.qweight, expert), row_scale)
    scale = _pick(weight.scale, expert)  # [N, G]
    if weight.cpu_int4 is not None:
        return torch._weight_int4pack_mm_for_cpu(
            x,
            _pick(weight.cpu_int4, expert),
            weight.group_size,
            _pick(weight.cpu_scale_zeros, expert),
        )
    # Shapes no CPU kernel takes: dequantize this weight for this call.
    dense = dequantize(_pick(weight.qweight, expert), scale, weight.scheme, x.dtype)
    return cpu_bf16.linear(x, dense)
