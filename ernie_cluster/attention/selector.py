"""Picks the paged-attention backend for a device: Triton kernels on CUDA, the torch reference
elsewhere. Imports Triton only when a Triton backend is asked for, so importing the attention
package (the CPU path, the HTTP ingress) never pays for it.
"""

from __future__ import annotations

import logging

import torch

from ernie_cluster.attention.backend import AttentionBackend, TorchPagedAttention
from ernie_cluster.config.engine_config import ATTENTION_BACKENDS as BACKEND_NAMES

logger = logging.getLogger(__name__)


def triton_import_error() -> str | None:
    """Why `import triton` fails here, or None when it works."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend called `name` ("auto" | "triton" | "torch") for tensors on `device`.

    "auto" is Triton on CUDA and the torch reference elsewhere (or on CUDA without Triton,
    with a warning). "triton" on a non-CUDA device needs Triton's CPU interpreter
    (TRITON_INTERPRET=1, for tests): compiled kernels cannot read host memory.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown attention backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}"
        )
    device = torch.device(device)
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchPagedAttention()
    error = triton_import_error()
    if error is not None:
        if name == "auto":
            logger.warning(
                "triton is not importable (%s); using torch attention on %s", error, device
            )
            return TorchPagedAttention()
        raise ValueError(f"attention backend 'triton' needs triton, which fails to import: {error}")
    from ernie_cluster.attention.triton_backend import TritonPagedAttention
    from ernie_cluster.triton_env import interpreting

    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"attention backend 'triton' runs on CUDA devices, not {device} "
            "(set TRITON_INTERPRET=1 to run its kernels in Triton's CPU interpreter)"
        )

    return TritonPagedAttention()
