"""Which residual layout a step runs at W > 1, and the collectives and bytes each one costs.

Two exact layouts of the residual stream between layers:
- "replicated": every rank holds every token row. Attention's o_proj partial sums and the MLP
  block's partial outputs (this rank's experts, its share of the shared-expert / dense rows)
  are each summed by one all-reduce: 2 collectives per layer, no dispatch, no host sync.
- "sharded": rank r holds rows [r*n, (r+1)*n). Attention all-gathers and reduce-scatters;
  each MoE layer exchanges (token, slot) pairs with three all-to-alls (distributed/
  expert_dispatch): 5 collectives per MoE layer, fewer bytes when top_k < W.
The choice is a host function of the step's token count, the same on every rank. Pure
arithmetic: no tensors, no communication (benchmarks/gpu_roofline.py uses the same model).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("auto", "replicated", "sharded")

LATENCY_BOUND_TOKENS = 1024
"""Steps of at most this many tokens always replicate. Below it the three extra collectives
of a sharded MoE layer (~10 us each on NVLink) cost more than the bytes the exchange saves
(at top_k 6, W 8, H 2560, bf16: ~2.2 KB per token at ~100 GB/s, ~22 ns a token; 30 us / 22 ns
is ~1.3K tokens)."""


def ring_all_reduce_bytes(payload: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `payload` bytes (reduce-scatter then
    all-gather, each (W - 1) / W of the payload)."""
    return 2 * payload * (world - 1) // world


@dataclass(frozen=True)
class LayerTraffic:
    """One decoder layer on one rank: collective calls and bytes sent to other ranks."""

    collectives: int
    bytes_sent: int


def layer_traffic(
    replicated: bool,
    num_tokens: int,
    world: int,
    hidden_size: int,
    top_k: int,
    is_moe: bool,
    dtype_bytes: int = 2,
) -> LayerTraffic:
    """Collectives and bytes of one layer of a step of `num_tokens` tokens (payload only: the
    sharded exchange's fixed-capacity padding is extra)."""
    if world == 1:
        return LayerTraffic(0, 0)
    row = hidden_size * dtype_bytes
    if replicated:
        return LayerTraffic(2, 2 * ring_all_reduce_bytes(num_tokens * row, world))
    local = -(-num_tokens // world)
    gather_scatter = 2 * (world - 1) * local * row  # attention's all-gather + reduce-scatter
    if not is_moe:
        return LayerTraffic(2, gather_scatter)
    # Each local token sends its k pairs; (W - 1) / W of them leave the rank, and come back.
    pairs_away = local * top_k * (world - 1) // world
    exchange = pairs_away * (2 * row + 4)  # rows out and back, int32 expert ids out
    return LayerTraffic(5, gather_scatter + exchange)


def choose_replicated(
    num_tokens: int,
    world: int,
    hidden_size: int,
    top_k: int,
    has_moe: bool,
    layout: str = "auto",
) -> bool:
    """Whether a step of `num_tokens` tokens runs the replicated layout (`layout` "auto"
    compares the bytes of the two past the latency-bound sizes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"collective layout {layout!r} is not one of {LAYOUTS}")
    if layout != "auto":
        return layout == "replicated"
    if num_tokens <= LATENCY_BOUND_TOKENS or not has_moe:
        return True
    replicated = layer_traffic(True, num_tokens, world, hidden_size, top_k, True)
    sharded = layer_traffic(False, num_tokens, world, hidden_size, top_k, True)
    return replicated.bytes_sent <= sharded.bytes_sent
