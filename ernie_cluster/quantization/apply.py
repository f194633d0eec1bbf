"""Online quantization of a loaded rank: each quantizable weight becomes a QuantizedWeight.

Runs after the loader filled the rank's shard. A module offers its weights through
`quantizable_weights()` (parameter name -> the first checkpoint column it holds and the
checkpoint's column count): the attention projections, the dense and shared-expert MLPs and
the stacked routed experts. The router gate (float32 in the checkpoint), the norms and the tied
embedding are left as they are.

A weight holding only some of the checkpoint's columns (o_proj at tensor parallelism) agrees
on its scales with the other ranks through one MAX all-reduce of its cell maxima, so W ranks
quantize to the very values one rank does (see quantization/schemes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ernie_cluster.quantization.schemes import (
    Scheme,
    cell_absmax,
    local_group_size,
    quantize_with_scales,
    scales_from_absmax,
    scheme_for,
)
from ernie_cluster.quantization.weight import QuantizedWeight

logger = logging.getLogger(__name__)


@dataclass
class ScalePiece:
    """Scales a pre-quantized checkpoint gave for the rows one loader target copied into
    `dest` (a view of a module's parameter): [n, C] float32, one per row and group of
    `group_cols` checkpoint columns, for the checkpoint columns [col_start, col_stop)."""

    dest: torch.Tensor
    scale: torch.Tensor
    group_cols: int
    col_start: int
    col_stop: int


@dataclass
class QuantizationSummary:
    """What one rank's quantization did: weights replaced, bytes before and after."""

    method: str
    num_weights: int = 0
    bytes_before: int = 0
    bytes_after: int = 0  # canonical layout (what a GPU holds)
    by_weight: dict[str, int] = field(default_factory=dict)


def quantize_model(
    model: nn.Module, method: str, comm=None, given_scales: list[ScalePiece] | None = None
) -> QuantizationSummary:
    """Replace every quantizable weight of `model` in place; `comm` (the model's Communicator)
    is needed when a rank holds a column slice of a checkpoint tensor. With `given_scales` (a
    pre-quantized checkpoint), each weight is quantized with the checkpoint's scales instead,
    and a weight the checkpoint did not quantize stays as it is."""
    scheme = scheme_for(method)
    summary = QuantizationSummary(method)
    for module_name, module in list(model.named_modules()):
        offered = getattr(module, "quantizable_weights", None)
        if offered is None:
            continue
        for name, (col_start, full_cols) in offered().items():
            weight = getattr(module, name)
            if isinstance(weight, QuantizedWeight):
                raise ValueError(f"{module_name}.{name} is already quantized")
            if given_scales is None:
                quantized = quantize_weight(weight.data, scheme, col_start, full_cols, comm)
            else:
                scale = assemble_scales(weight.data, given_scales, f"{module_name}.{name}")
                if scale is None:
                    continue
                quantized = quantize_with_given(weight.data, scale, scheme)
            summary.num_weights += 1
            summary.bytes_before += weight.numel() * weight.element_size()
            summary.bytes_after += quantized.nbytes()
            summary.by_weight[f"{module_name}.{name}"] = quantized.nbytes()
            # Drops the parameter and with it the last reference to the full-precision tensor.
            del module._parameters[name]
            setattr(module, name, quantized)
    return summary


def quantize_weight(
    weight: torch.Tensor, scheme: Scheme, col_start: int, full_cols: int, comm=None
) -> QuantizedWeight:
    """weight [*, N, k]: columns [col_start, col_start + k) of a checkpoint tensor with
    `full_cols` columns (a stacked [E, N, K] is quantized one expert at a time, to bound the
    float32 temporaries)."""
    local_cols = weight.shape[-1]
    absmax = cell_absmax(weight, scheme, col_start, full_cols)  # [*, N, C]
    if local_cols != full_cols:
        if comm is None or comm.world_size == 1:
            raise ValueError(
                f"a weight holding columns [{col_start}, {col_start + local_cols}) of "
                f"{full_cols} needs the other ranks' maxima; no communicator was given"
            )
        absmax = comm.all_reduce(absmax, op=dist.ReduceOp.MAX)
    dtype = weight.dtype
    scale = scales_from_absmax(absmax, scheme, col_start, local_cols, full_cols, dtype)
    if weight.dim() == 3:
        qweight = torch.stack(
            [quantize_with_scales(w, s, scheme) for w, s in zip(weight, scale, strict=True)]
        )
    else:
        qweight = quantize_with_scales(weight, scale, scheme)
    return QuantizedWeight(qweight, scale, scheme, tuple(weight.shape), dtype)


def quantize_with_given(
    weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme
) -> QuantizedWeight:
    """weight [*, N, K] holding q * scale (rounded to its dtype) -> the QuantizedWeight of q."""
    if weight.dim() == 3:
        qweight = torch.stack(
            [quantize_with_scales(w, s, scheme) for w, s in zip(weight, scale, strict=True)]
        )
    else:
        qweight = quantize_with_scales(weight, scale, scheme)
    return QuantizedWeight(qweight, scale, scheme, tuple(weight.shape), weight.dtype)


def assemble_scales(
    weight: torch.Tensor, pieces: list[ScalePiece], name: str
) -> torch.Tensor | None:
    """The [*, N, G] scales of `weight` from the pieces whose dest lies in it (None: the
    checkpoint left this weight unquantized). Rows are placed by the pieces' storage offsets."""
    storage = weight.untyped_storage().data_ptr()
    mine = [p for p in pieces if p.dest.untyped_storage().data_ptr() == storage]
    if not mine:
        return None
    cols = weight.shape[-1]
    sizes = {
        math.gcd(p.group_cols, p.col_stop - p.col_start, p.col_start or p.group_cols) for p in mine
    }
    if len(sizes) != 1:
        raise ValueError(
            f"{name}: its checkpoint tensors use different scale groups {sorted(sizes)}"
        )
    size = sizes.pop()
    scale = torch.zeros(*weight.shape[:-1], cols // size, dtype=torch.float32, device=weight.device)
    flat = scale.view(-1, cols // size)  # [* x N, G]
    covered = 0
    for piece in mine:
        offset = piece.dest.storage_offset() - weight.storage_offset()
        if offset % cols or piece.dest.shape[-1] != cols:
            raise ValueError(f"{name}: a checkpoint tensor fills only some of its columns")
        first_row = offset // cols
        first_cols = torch.arange(piece.col_start, piece.col_stop, size, device=weight.device)
        local = piece.scale.to(weight.device)[:, first_cols // piece.group_cols]  # [n, G]
        flat[first_row : first_row + local.shape[0]] = local
        covered += local.shape[0]
    if covered != flat.shape[0]:
        raise ValueError(
            f"{name}: the checkpoint quantized {covered} of its {flat.shape[0]} rows (a fused "
            "weight whose parts are not all quantized alike)"
        )
    return scale


def weight_kind(name: str) -> str:
    """'experts' for a routed expert weight, else 'other' (the byte reports' split)."""
    return "experts" if ".experts." in f".{name}." else "other"


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights this rank holds now, by kind: routed experts and the rest (quantized
    weights at their resident size, prepacked CPU copies included)."""
    sizes = {"experts": 0, "other": 0}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            sizes[weight_kind(name)] += module.resident_bytes()
            seen.update(id(t) for t in module.buffers())
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        sizes[weight_kind(name)] += param.numel() * param.element_size()
    return sizes


def planned_weight_bytes(model: nn.Module, method: str | None) -> dict[str, int]:
    """Bytes of weights a rank would hold on a GPU with `method` (None: as loaded), by kind,
    from the shapes alone: works on a model built on the meta device (the real model's
    shapes without its memory). Quantized weights count their canonical layout."""
    scheme = scheme_for(method) if method else None
    sizes = {"experts": 0, "other": 0}
    planned: dict[str, int] = {}
    if scheme is not None:
        for module_name, module in model.named_modules():
            offered = getattr(module, "quantizable_weights", None)
            for name, (col_start, full_cols) in (offered() if offered else {}).items():
                shape = getattr(module, name).shape
                group = local_group_size(scheme, shape[-1], col_start, full_cols)
                values = math.prod(shape) // scheme.values_per_byte * scheme.storage.itemsize
                scales = math.prod(shape[:-1]) * (shape[-1] // group) * 4
                planned[f"{module_name}.{name}".lstrip(".")] = values + scales
    for name, param in model.named_parameters():
        sizes[weight_kind(name)] += planned.get(name, param.numel() * param.element_size())
    return sizes
