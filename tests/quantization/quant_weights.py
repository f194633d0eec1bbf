"""Random weights for the quantized-kernel tests: seeded normals and a `QuantizedWeight` of a
random [*, N, K] weight in the canonical layout, on the test device."""

from __future__ import annotations

import torch

from ernie_cluster.quantization.schemes import quantize, scheme_for
from ernie_cluster.quantization.weight import QuantizedWeight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * scale


def make_weight(method, group, shape, dtype, seed=0) -> QuantizedWeight:
    """A QuantizedWeight of a random [*, N, K] weight (scaled by 1/sqrt(K)) on DEVICE."""
    scheme = scheme_for(method, group)
    dense = randn(*shape, seed=seed, scale=shape[-1] ** -0.5).to(dtype)
    qweight, scale = quantize(dense, scheme)
    return QuantizedWeight(
        qweight.to(DEVICE), scale.to(DEVICE), scheme, shape, dtype, prepack_for_cpu=False
    )
