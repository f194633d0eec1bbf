"""Building blocks of the ERNIE-4.5 decoder: RMSNorm, interleaved RoPE, SwiGLU MLP.

All tensors are flat token batches: [num_tokens, hidden]. Numerics follow the reference
implementation exactly (float32 normalisation and rotary math, cast back before the weight).
Each block's `method` picks the torch ops (the CPU path) or one fused Triton kernel
(model/triton_layers, the GPU path); see `use_triton`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie_cluster.model.triton_moe import is_available as triton_available
from ernie_cluster.model.weights import WeightTarget, rows, whole
from ernie_cluster.quantization.weight import linear

KERNEL_METHODS = ("auto", "torch", "triton")
"""auto: the Triton kernels for CUDA tensors (when triton imports), torch ops elsewhere.
torch: always the torch ops. triton: always the kernels (on CPU tensors only under
TRITON_INTERPRET=1: tests and kernel counts of the GPU path)."""


def use_triton(method: str, x: torch.Tensor) -> bool:
    """Whether a block set to `method` runs its Triton kernel on `x`."""
    if method == "auto":
        return x.is_cuda and triton_available()
    if method not in KERNEL_METHODS:
        raise ValueError(f"unknown kernel method {method!r}; expected one of {KERNEL_METHODS}")
    return method == "triton"


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.method = "auto"  # KERNEL_METHODS

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): one kernel on the Triton path."""
        if use_triton(self.method, x):
            from ernie_cluster.model.triton_layers import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        total = residual + x
        return self(total), total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.method, x):
            from ernie_cluster.model.triton_layers import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # NOTE: normalise in float32, cast back, THEN scale: the order matters in bfloat16.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class InterleavedRotaryEmbedding(nn.Module):
    """GPT-J style RoPE: rotates adjacent pairs (2i, 2i+1); computed in float32.

    cos and sin of every position below `max_positions` are computed once, at construction
    (`extend` grows the table for a longer max_model_len). The model gathers its step's rows
    once with `cos_sin` and every layer rotates with them.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]
        self.register_buffer("cos_sin_cache", self._table(max_positions), persistent=False)
        self.method = "auto"  # KERNEL_METHODS

    def _table(self, num_positions: int) -> torch.Tensor:
        """[P, 2, D/2] float32 cos (index 0) and sin (index 1) of positions [0, P)."""
        # NOTE: the same float32 ops, element by element, as computing them from each step's
        # positions, so the values are bit-identical to that.
        positions = torch.arange(num_positions, device=self.inv_freq.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [P, D/2]
        return torch.stack((freqs.cos(), freqs.sin()), dim=1)

    @property
    def max_positions(self) -> int:
        return self.cos_sin_cache.shape[0]

    def extend(self, num_positions: int) -> None:
        """Cover positions [0, num_positions) (a max_model_len beyond the config's)."""
        if num_positions > self.max_positions:
            self.cos_sin_cache = self._table(num_positions)

    def cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N] (each < max_positions) -> [N, 2, D/2] float32 cos and sin."""
        return self.cos_sin_cache[positions]

    def forward(
        self, cos_sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # cos_sin [N, 2, D/2] from `cos_sin`; q [N, Hq, D]; k [N, Hkv, D]
        if use_triton(self.method, q):
            from ernie_cluster.model.triton_layers import rope_inplace

            # NOTE: rotates q and k where they lie (views of the qkv projection): one launch.
            return rope_inplace(cos_sin, q, k)
        cos = cos_sin[:, None, 0]  # [N, 1, D/2]
        sin = cos_sin[:, None, 1]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        even, odd = x32[..., 0::2], x32[..., 1::2]  # [N, H, D/2] each
        out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
        return out.flatten(-2).to(x.dtype)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, H] matrix.

    `shard_start`/`intermediate_size` select a column-parallel slice of the intermediate
    dimension; the caller sums partial outputs across ranks when the slice is not whole.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        full_intermediate_size: int | None = None,
        shard_start: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.full_intermediate_size = full_intermediate_size or intermediate_size
        self.shard_start = shard_start
        self.gate_up_proj = nn.Parameter(
            torch.empty(2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(hidden_size, intermediate_size, dtype=dtype), requires_grad=False
        )
        self.method = "auto"  # KERNEL_METHODS: SiLU·mul as one kernel or two torch ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.method, x):
            from ernie_cluster.model.triton_layers import silu_and_mul

            return linear(silu_and_mul(linear(x, self.gate_up_proj)), self.down_proj)
        gate, up = linear(x, self.gate_up_proj).chunk(2, dim=-1)  # [N, I] each
        return linear(F.silu(gate) * up, self.down_proj)

    def quantizable_weights(self) -> dict[str, tuple[int, int]]:
        """Weight -> (first checkpoint column held here, checkpoint columns)."""
        return {
            "gate_up_proj": (0, self.hidden_size),
            "down_proj": (self.shard_start, self.full_intermediate_size),
        }

    def weight_targets(self, prefix: str) -> dict[str, WeightTarget]:
        inter, full, start = self.intermediate_size, self.full_intermediate_size, self.shard_start
        in_shape = (full, self.hidden_size)
        targets = {
            f"{prefix}.gate_proj.weight": rows(self.gate_up_proj.data[:inter], in_shape, start),
            f"{prefix}.up_proj.weight": rows(self.gate_up_proj.data[inter:], in_shape, start),
        }
        if inter == full:
            targets[f"{prefix}.down_proj.weight"] = whole(self.down_proj.data)
        else:
            targets[f"{prefix}.down_proj.weight"] = WeightTarget(
                (self.hidden_size, full), self.down_proj.data, 1, start, start + inter
            )
        return targets
