"""The Triton paged-attention backend: the GPU counterpart of `TorchPagedAttention`.

Owns the per-call plan only: write this step's K/V into the cache (attention/triton_cache,
quantized when the cache is fp8), then launch the decode kernel for rows [0, num_decodes) and
the prefill kernel for the spans after them (a mixed step launches both into one output).
Reads host ints from the metadata, never device values, so a step through it never waits on
the GPU. Kernels live in attention/triton_decode and attention/triton_prefill.
"""

from __future__ import annotations

import functools

import torch

from ernie_cluster.attention.kv_quant import is_fp8
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.attention.triton_cache import write_kv_triton
from ernie_cluster.attention.triton_decode import decode_attention
from ernie_cluster.attention.triton_prefill import prefill_attention


class TritonPagedAttention:
    """Paged attention with Triton kernels that read the cache in place.

    `decode_num_splits` pins the decode kernel's KV split count; None picks it per call from
    `meta.max_decode_seq_len`, a host bound (a captured CUDA graph replays its grid as is,
    and any split count is exact for any lengths, so the bound only sets speed).
    """

    # Decode launches depend on host bounds only, so a decode step can be captured.
    cuda_graph_safe = True

    def __init__(self, decode_num_splits: int | None = None) -> None:
        if decode_num_splits is not None and decode_num_splits < 1:
            raise ValueError(f"decode_num_splits must be >= 1, got {decode_num_splits}")
        self.decode_num_splits = decode_num_splits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D], kv_cache [2, slots, Hkv, D] -> [N, Hq, D]. The cache
        is q's dtype, or fp8 e4m3 with its scales (attention/kv_quant)."""
        if q.dtype != kv_cache.dtype and not is_fp8(kv_cache):
            raise ValueError(f"q is {q.dtype} but the KV cache is {kv_cache.dtype}")
        if is_fp8(kv_cache) and kv_cache.device.type == "cuda":
            check_fp8_support(kv_cache.device)
        if kv_cache.stride(-1) != 1:
            raise ValueError("the KV cache must be contiguous along head_dim")
        num_heads, num_kv_heads = q.shape[1], kv_cache.shape[2]
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
        write_kv_triton(kv_cache, k, v, meta.slot_mapping)
        if q.stride(-1) != 1:
            q = q.contiguous()  # the kernels index head_dim with unit stride
        # NOTE: the kernels round their float32 results to out's dtype themselves (the
        # interpreter's own store would truncate), so out is q's dtype on every path.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [N, Hq, D]
        if q.shape[0] == 0:
            return out
        decode_attention(q, kv_cache, meta, scale, out, num_splits=self.decode_num_splits)
        prefill_attention(q, kv_cache, meta, scale, out)
        return out


@functools.cache
def check_fp8_support(device: torch.device) -> None:
    """Triton has e4m3 (fp8e4nv) loads, stores and casts only from compute capability 8.9 on
    (Ada, Hopper); older GPUs get a clear error instead of a compile failure mid-step."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(
            f"kv_cache_dtype fp8 with the Triton attention backend needs compute capability "
            f">= 8.9, but {device} is {major}.{minor}; use attention_backend='torch' or "
            "kv_cache_dtype='auto'"
        )
