"""How this process runs Triton kernels: compiled on a GPU or in Triton's CPU interpreter, and
which `tl.dot` precision a dtype gets. Shared by the attention and MoE kernels; imports no
triton, so callers can ask before deciding to load it.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Read at each launch (Triton reads
    it when a kernel is decorated; tests set it before importing the kernel modules)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact products (tl.dot would round them to tf32); bf16/fp16 inputs
    ignore the setting and run on tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"
