"""Weight quantization schemes: the canonical storage layout, quantize and the reference dequantize.

Every scheme stores a logical weight W [*, N, K] (out features, in features; `*` stacks experts)
as two tensors:

* `qweight`: int8 [*, N, K] (wint8), uint8 [*, N, K/2] (wint4: two 4-bit values per byte, the
  even column in the low nibble, each stored as q + 8 for q in [-8, 7]), float8_e4m3fn
  [*, N, K] (fp8, block_wise_fp8);
* `scale`: float32 [*, N, G], one symmetric scale per row and group of K/G consecutive columns
  (G = 1: per output channel).

W[n, k] = q[n, k] * scale[n, k // (K / G)]. The Triton kernels read this layout; CPU kernels may
keep an extra prepacked copy (quantization/weight). The scales are rounded to the model's dtype
when they are made, so a kernel that takes its scales in the activation dtype computes with the
very values this reference does.

Online quantization finds each scale from the absolute maximum of its cell: a cell is one row
and one group of `group_size` columns of the CHECKPOINT tensor, in its global coordinates, so
a rank that holds a slice of the columns (a row-parallel o_proj) agrees with one rank that holds
them all (`cell_absmax` + a MAX all-reduce, see quantization/apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


@dataclass(frozen=True)
class Scheme:
    """How one method stores weights: storage dtype, values per byte, the largest magnitude a
    quantized value takes (scale = absmax / qmax), and the column group of a scale cell
    (None: a whole row, per output channel)."""

    name: str
    storage: torch.dtype
    values_per_byte: int
    qmax: float
    group_size: int | None


def scheme_for(method: str, group_size: int | None = None) -> Scheme:
    """The storage scheme of a --quantization method (see quantization/config)."""
    if method == "wint8":
        return Scheme("wint8", torch.int8, 1, INT8_MAX, None)
    if method == "wint4":
        return Scheme("wint4", torch.uint8, 2, INT4_MAX, group_size or 128)
    if method == "fp8":
        return Scheme("fp8", torch.float8_e4m3fn, 1, FP8_MAX, None)
    if method == "block_wise_fp8":
        return Scheme("block_wise_fp8", torch.float8_e4m3fn, 1, FP8_MAX, group_size or 128)
    raise ValueError(f"unknown quantization method {method!r}")


def local_group_size(scheme: Scheme, local_cols: int, col_start: int, full_cols: int) -> int:
    """Columns per stored scale on a rank holding columns [col_start, col_start + local_cols) of
    a checkpoint tensor with `full_cols` columns: the scheme's group where the slice is cut on
    group borders, else the largest size that divides both (scales repeat within a group), so
    a slice never needs a group that spans two ranks."""
    group = scheme.group_size or full_cols
    size = math.gcd(group, local_cols, col_start) if col_start else math.gcd(group, local_cols)
    if scheme.name == "wint4" and size % 2:
        raise ValueError(
            f"wint4 needs an even number of columns per scale group; columns "
            f"[{col_start}, {col_start + local_cols}) of {full_cols} with group {group} give {size}"
        )
    return size


def cell_absmax(
    weight: torch.Tensor, scheme: Scheme, col_start: int, full_cols: int
) -> torch.Tensor:
    """weight [*, N, k] (columns [col_start, col_start + k) of a tensor with `full_cols`) ->
    [*, N, C] float32: each global cell's absolute maximum over the columns held here, 0 for
    cells with none. C = ceil(full_cols / group). A MAX over ranks gives the global maxima."""
    group = scheme.group_size or full_cols
    num_cells = -(-full_cols // group)
    local_cols = weight.shape[-1]
    cell_of_col = (torch.arange(local_cols, device=weight.device) + col_start) // group  # [k]
    out = torch.zeros(*weight.shape[:-1], num_cells, dtype=torch.float32, device=weight.device)
    index = cell_of_col.expand(*weight.shape[:-1], local_cols)
    return out.scatter_reduce_(-1, index, weight.float().abs(), reduce="amax")


def scales_from_absmax(
    absmax: torch.Tensor,
    scheme: Scheme,
    col_start: int,
    local_cols: int,
    full_cols: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """absmax [*, N, C] (global cells) -> scale [*, N, G] float32 for the columns held here,
    G = local_cols / local_group_size, each rounded to `dtype` (the model's)."""
    group = scheme.group_size or full_cols
    size = local_group_size(scheme, local_cols, col_start, full_cols)
    first_cols = torch.arange(0, local_cols, size, device=absmax.device) + col_start  # [G]
    cell = absmax.index_select(-1, first_cols // group)  # [*, N, G]
    scale = (cell / scheme.qmax).to(dtype).float()
    # An all-zero cell (or one rounding to 0) quantizes to zeros with any scale; 1 avoids 0/0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_with_scales(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """weight [*, N, K], scale [*, N, G] -> qweight in the scheme's storage layout."""
    groups = scale.shape[-1]
    size = weight.shape[-1] // groups
    w32 = weight.float().unflatten(-1, (groups, size)) / scale.unsqueeze(-1)  # [*, N, G, size]
    w32 = w32.flatten(-2)
    if scheme.storage == torch.float8_e4m3fn:
        return w32.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if scheme.name == "wint8":
        # -128 is reached only with scales from a checkpoint (llm-compressor's range).
        return w32.round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return pack_int4(w32.round().clamp(INT4_MIN, INT4_MAX).to(torch.int8))


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """values [*, N, K] int8 in [-8, 7] -> [*, N, K/2] uint8: column 2j in the low nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"wint4 packs two columns per byte; got {values.shape[-1]} columns")
    biased = (values + 8).to(torch.uint8)
    return biased[..., 0::2] | (biased[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[*, N, K/2] uint8 -> [*, N, K] int8 in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantized_values(qweight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """qweight -> [*, N, K] float32 of the quantized values q (before the scale)."""
    if scheme.name == "wint4":
        return unpack_int4(qweight).float()
    return qweight.float()


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme, dtype: torch.dtype
) -> torch.Tensor:
    """The reference: q * scale in float32, rounded once to `dtype`. [*, N, K]."""
    values = quantized_values(qweight, scheme)
    groups = scale.shape[-1]
    grouped = values.unflatten(-1, (groups, values.shape[-1] // groups)) * scale.unsqueeze(-1)
    return grouped.flatten(-2).to(dtype)


def quantize(
    weight: torch.Tensor, scheme: Scheme, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole tensor (no slicing) -> (qweight, scale) in the canonical layout."""
    full_cols = weight.shape[-1]
    absmax = cell_absmax(weight, scheme, 0, full_cols)
    scale = scales_from_absmax(absmax, scheme, 0, full_cols, full_cols, dtype or weight.dtype)
    return quantize_with_scales(weight, scale, scheme), scale
