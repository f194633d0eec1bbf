"""The fp8 KV cache (`--kv-cache-dtype fp8`): its element type, the per-layer scales a cache
carries, and the torch quantize / dequantize that every backend must reproduce.

A write stores e4m3(clamp(x / scale, +-448)); a read gives (e4m3.float() * scale) rounded to
the compute dtype. Scales are one float for K and one for V per attention layer, carried by
the layer's cache tensor: 1.0, or the checkpoint's (a compressed-tensors `kv_cache_scheme`,
which the loader puts on the attention layer with `set_layer_kv_scales`).
Never allocates caches (worker/model_runner does) and imports no triton.
"""

from __future__ import annotations

import math

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448.0: e4m3fn has no inf, its top code is NaN
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
"""The `kv_cache_dtype` settings that mean an e4m3 cache (vLLM's spellings)."""

_SCALES_ATTR = "kv_scales"


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for the `kv_cache_dtype` setting ("auto": the model's)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        return FP8_KV_DTYPE
    raise ValueError(
        f"unknown kv_cache_dtype {kv_cache_dtype!r}; choose one of {['auto', *FP8_KV_CACHE_DTYPES]}"
    )


def is_fp8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_KV_DTYPE


def set_layer_kv_scales(attn: object, k_scale: float, v_scale: float) -> None:
    """Give an attention layer a checkpoint's calibrated scales (read by `layer_kv_scales`
    when its cache is allocated)."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite float, got {value}")
    attn.k_scale, attn.v_scale = float(k_scale), float(v_scale)


def layer_kv_scales(attn: object) -> tuple[float, float]:
    """(k_scale, v_scale) of an attention layer: its `k_scale` / `v_scale` floats when it has
    them (a checkpoint's calibrated scales), else 1.0 as vLLM uses without them."""
    return float(getattr(attn, "k_scale", 1.0)), float(getattr(attn, "v_scale", 1.0))


def set_kv_scales(kv_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Attach a layer's scales to its cache. An unquantized cache ignores them."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite float, got {value}")
    # NOTE: the backend interface passes one cache per layer and no layer object, so the
    # layer's scales travel on its cache tensor (a Python attribute: views do not keep it,
    # the bound tensor itself is what every backend call receives).
    setattr(kv_cache, _SCALES_ATTR, (float(k_scale), float(v_scale)))


def kv_scales(kv_cache: torch.Tensor) -> tuple[float, float]:
    """(k_scale, v_scale) attached to a cache; (1.0, 1.0) when none were."""
    return getattr(kv_cache, _SCALES_ATTR, (1.0, 1.0))


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x [..] in any float dtype -> e4m3 [..] holding x / scale, rounded to nearest even.
    Clamped first: torch turns a value past 448 into NaN, not 448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 x [..] -> x * scale [..] in `dtype` (the product in float32, then rounded once)."""
    return (x.float() * scale).to(dtype)
