"""The lm_head on a CPU: its weight prepacked once for oneDNN instead of repacked every step.

MKL's GEMM repacks the [V, H] weight on every call; at vocabulary sizes that is most of the
work for a decode batch (mini, 32000 x 640, one thread: 42 ms at 32 rows through F.linear,
25 ms prepacked). oneDNN's prepacked linear keeps the weight in its blocked layout (AMX tiles
on CPUs that have them). On CPUs without native bfloat16 (cpu_bf16) a bfloat16 head is
packed as float32 (bfloat16 x bfloat16 products are exact in float32, so the logits are those
of a bfloat16 GEMM, rounded to bfloat16 as one); the packed copy costs V x H x 4 bytes then
(1 GB for the 21B's 103424 x 2560), otherwise the head's own size.
"""

from __future__ import annotations

import torch

from ernie_cluster import cpu_bf16


class PackedHead:
    """Logits of a CPU lm_head through a prepacked copy of its weight, repacked when the
    weight changes (loading writes it in place, after the model is built)."""

    _BATCH_HINT = 32
    """Rows oneDNN picks its packed layout for (any row count works)."""

    def __init__(self) -> None:
        self._packed: torch.Tensor | None = None
        self._source: tuple[int, int] | None = None  # (data_ptr, version) it was packed from
        self._compute_dtype = torch.float32

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
        )

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [B, H] in the model dtype, weight [V, H] -> [B, V] in x's dtype."""
        source = (weight.data_ptr(), weight._version)
        if self._source != source:
            widen = weight.dtype == torch.bfloat16 and cpu_bf16.widens_bf16(weight)
            self._compute_dtype = torch.float32 if widen else weight.dtype
            with torch.inference_mode(False):  # a normal tensor, usable in and out of it
                self._packed = torch.ops.mkldnn._reorder_linear_weight(
                    weight.detach().to(self._compute_dtype), self._BATCH_HINT
                )
            self._source = source
        out = torch.ops.mkldnn._linear_pointwise(
            x.to(self._compute_dtype), self._packed, None, "none", [], ""
        )
        return out.to(x.dtype)
