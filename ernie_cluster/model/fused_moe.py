"""Routed experts: (token, slot) pairs sorted by expert, gate_up and down GEMMs with SiLU·mul
between them, and a float32 combine in slot order.

Owns the pair sort, the alignment of sorted pairs to per-expert tiles (the torch reference of
`triton_router.sort_to_tiles`, which the Triton path runs), the torch paths (torch._grouped_mm
and the per-expert loop) and the choice between them by device. On CUDA the step runs only
sync-free paths, the same ops for any routing, so it can be captured as a CUDA graph or
compiled whole; on a CPU, where a host read is free, the loop reads the counts and visits only
the experts with rows. `python -m ernie_cluster.model.fused_moe` times the methods here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ernie_cluster import cpu_bf16
from ernie_cluster.quantization.weight import QuantizedWeight, linear

METHODS = ("auto", "grouped_mm", "triton", "loop")
"""auto: triton on CUDA (grouped_mm where triton is missing), loop on CPU.
grouped_mm: torch._grouped_mm, sync-free (on CUDA for bfloat16 on sm90+; on CPU wrapped so
float32 compiles too): the same ops whatever the routing, so a step can be captured or compiled
whole. loop: one gate_up and one down GEMM per expert that has rows, the counts read on the
host. On a CPU a host read costs nothing and the loop skips the empty experts grouped_mm
visits; its GEMMs go through cpu_bf16.linear (bfloat16 widened on CPUs without native support)."""


def sort_pairs(
    topk_ids: torch.Tensor, expert_start: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [M, k] global expert ids -> (local [P] expert of each pair, `num_local` for a
    pair not owned here; order [P] pair ids sorted by local expert, stable, not-owned last;
    counts [num_local + 1] pairs per local expert, not-owned last). P = M * k."""
    local = topk_ids.reshape(-1) - expert_start  # [P]
    owned = (local >= 0) & (local < num_local)
    local = torch.where(owned, local, num_local)
    order = torch.argsort(local, stable=True)  # [P]
    # NOTE: bincount sizes its output from the data (a host sync on CUDA); scatter_add does not.
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=local.device)
    counts.scatter_add_(0, local, torch.ones_like(local))
    return local, order, counts


def max_tiles(num_pairs: int, num_local: int, block_m: int) -> int:
    """Upper bound on sum over experts of ceil(count / block_m) when the counts add up to at
    most `num_pairs`: at most min(P, E) experts are non-empty, each wasting < block_m rows."""
    return (num_pairs + min(num_pairs, num_local) * (block_m - 1)) // block_m


def align_to_tiles(
    local: torch.Tensor, order: torch.Tensor, counts: torch.Tensor, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted pairs laid out in tiles of `block_m` rows, each tile holding one expert's pairs.

    Returns tile_pairs [T * block_m] int32 (pair id, or P on padding rows) and tile_experts [T]
    int32 (local expert of each tile, -1 for tiles past the last used one). T is the static bound
    `max_tiles`, so the shapes never depend on the routing; unused tiles cost one early exit.
    """
    num_pairs, num_local = order.numel(), counts.numel() - 1
    num_tiles = max_tiles(num_pairs, num_local, block_m)
    device = order.device
    tiles = (counts[:num_local] + block_m - 1) // block_m  # [E] tiles per expert
    tile_end = tiles.cumsum(0)  # [E]
    first_row = (tile_end - tiles) * block_m  # [E] first padded row of each expert
    group_start = counts.cumsum(0) - counts  # [E + 1] first sorted position of each expert
    sorted_local = local[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - group_start[sorted_local]  # [P]
    row = first_row[sorted_local.clamp(max=num_local - 1)] + rank
    # Not-owned pairs go to one spare slot past the end, dropped below.
    row = torch.where(sorted_local < num_local, row, num_tiles * block_m)
    tile_pairs = torch.full(
        (num_tiles * block_m + 1,), num_pairs, dtype=torch.int32, device=device
    ).scatter_(0, row, order.to(torch.int32))[:-1]
    tile = torch.arange(num_tiles, device=device)
    tile_experts = torch.searchsorted(tile_end, tile, right=True)  # [T] in [0, E]
    tile_experts = torch.where(tile_experts < num_local, tile_experts, -1).to(torch.int32)
    return tile_pairs, tile_experts


def sum_slots(weighted: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weighted [M, k, H] -> [M, H] in `dtype`, added in float32 in slot order j = 0..k-1.

    NOTE: the expert-parallel exchange adds the same products in the same order, so a token's
    output is bit-identical whichever rank ran its experts.
    """
    first = weighted[:, 0]
    # A fresh float32 tensor to add into (.float() of float32 input would be a view).
    total = first.clone() if first.dtype == torch.float32 else first.float()
    for slot in range(1, weighted.shape[1]):
        # NOTE: a bfloat16 operand is widened inside the add (exactly, as .float() would),
        # which saves a converted copy per slot.
        total.add_(weighted[:, slot])
    return total.to(dtype)


def cuda_grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """torch._grouped_mm's CUDA fast path: bfloat16, row strides multiples of 16 bytes."""
    inter, hidden = gate_up.shape[1] // 2, gate_up.shape[2]
    return (
        hasattr(torch, "_grouped_mm")
        and x.dtype == torch.bfloat16
        and hidden % 8 == 0
        and inter % 8 == 0
    )


def resolve_method(method: str, x: torch.Tensor, gate_up: torch.Tensor | QuantizedWeight) -> str:
    """On CUDA the sync-free paths (Triton, else grouped_mm for plain weights, else the loop);
    on a CPU the per-expert loop, for plain and quantized (torch's weight-only kernels) experts
    alike: a host read of the counts is free there, and only the experts with rows are
    visited."""
    if method not in METHODS:
        raise ValueError(f"unknown MoE method {method!r}; expected one of {METHODS}")
    quantized = isinstance(gate_up, QuantizedWeight)
    if quantized and method == "grouped_mm":
        raise ValueError("quantized experts run the 'triton' or 'loop' MoE method, not grouped_mm")
    if method != "auto":
        return method
    if not x.is_cuda:
        return "loop"
    from ernie_cluster.model import triton_moe

    if triton_moe.is_available():
        return "triton"
    if quantized:
        return "loop"
    return "grouped_mm" if cuda_grouped_mm_supported(x, gate_up) else "loop"


def fused_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    expert_start: int,
    method: str = "auto",
    all_owned: bool = False,
    expert_counts: torch.Tensor | None = None,
    add_to: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, H], topk_ids [M, k] global ids, topk_weights [M, k] or None (weight 1), gate_up
    [E, 2I, H] (gate rows first), down [E, H, I] for experts [expert_start, expert_start + E)
    -> (out [M, H] in x's dtype, pairs routed to each local expert [E] int64). Given
    `expert_counts` [E] int64, those counts are added into it instead (the second result is
    None); given `add_to` [M, H], it is added to out (the shared experts' rows): on the Triton
    path both fold into kernels the step runs anyway.

    out[m] = sum over slots j owned here of w[m, j] * expert(x[m]): the expert output and its
    product with the weight each rounded to x's dtype, the products summed in float32 in slot
    order. NOTE: that is transformers' rounding (its bf16 combine multiplies in bf16), so with
    top-2 a bf16 layer matches it bit for bit; the exchange at W > 1 must round the same way.
    `all_owned`: the caller knows every id is a valid expert held here (one rank, router ids),
    which saves masking the pairs that are not.
    """
    num_tokens, top_k = topk_ids.shape
    num_local = gate_up.shape[0]
    method = resolve_method(method, x, gate_up)
    if method == "triton":
        return _triton_experts(
            x, topk_ids, topk_weights, gate_up, down, expert_start, all_owned, expert_counts, add_to
        )
    local, order, counts = sort_pairs(topk_ids, expert_start, num_local)
    rows = x.index_select(0, order // top_k)  # [P, H] grouped by expert, not-owned last
    if method == "grouped_mm":
        sorted_out = _grouped_mm_swiglu(rows, gate_up, down, counts[:num_local])
    else:
        sorted_out = _loop_swiglu(rows, gate_up, down, counts[:num_local])
    if topk_weights is not None:  # weighted in sorted order: the same products, one pass less
        sorted_weights = topk_weights.reshape(-1).to(x.dtype).index_select(0, order)  # [P]
        sorted_out = sorted_out.mul_(sorted_weights.unsqueeze(-1))
    # NOTE: back to pair order by a gather through the inverse permutation: on CPU
    # index_select copies rows about twice as fast as the equivalent index_copy_ scatter.
    position = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    expert_out = sorted_out.index_select(0, position)  # [P, H] in pair order
    weighted = expert_out.view(num_tokens, top_k, x.shape[1])  # [M, k, H] in x's dtype
    if not all_owned:
        # NOTE: rows of not-owned pairs were never computed and may hold NaN, so they are
        # selected away rather than multiplied by a zero weight.
        owned = (local < num_local).view(num_tokens, top_k, 1)
        weighted = torch.where(owned, weighted, 0.0)
    out = sum_slots(weighted, x.dtype)
    if add_to is not None:
        out = out + add_to
    if expert_counts is None:
        return out, counts[:num_local]
    expert_counts += counts[:num_local]
    return out, None


def _triton_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    expert_start: int,
    all_owned: bool,
    expert_counts: torch.Tensor | None,
    add_to: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused_experts on the Triton path: four launches whatever the routing (sort into tiles,
    gate_up, down with the routing weights, combine with the slot sum and add_to)."""
    from ernie_cluster.model import triton_moe, triton_router

    num_tokens, top_k = topk_ids.shape
    num_local = gate_up.shape[0]
    num_pairs = num_tokens * top_k
    config = triton_moe.pick_config(num_pairs, num_local)
    counts = expert_counts
    if counts is None:
        counts = torch.zeros(num_local, dtype=torch.int64, device=x.device)
    num_tiles = max_tiles(num_pairs, num_local, config.block_m)
    if num_pairs == 0:
        return x.new_empty(x.shape), (None if expert_counts is not None else counts)
    tile_pairs, tile_experts = triton_router.sort_to_tiles(
        topk_ids, expert_start, num_local, config.block_m, num_tiles, counts
    )
    weighted = triton_moe.run_experts(
        x, tile_pairs, tile_experts, topk_weights, gate_up, down, top_k, config
    )  # [P, H]; rows of pairs not owned here unset
    out = triton_router.combine(
        weighted, topk_ids, expert_start, num_local, x.dtype, all_owned, add_to
    )
    return out, (None if expert_counts is not None else counts)


@torch.library.custom_op("ernie_cluster::grouped_mm", mutates_args=(), device_types="cpu")
def _cpu_grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm on CPU as an op torch.compile can trace in any dtype: its fake kernel
    accepts only bfloat16, though the CPU kernel runs float32 too."""
    width, itemsize = weights.shape[-1], rows.element_size()
    if (rows.shape[1] * itemsize) % 16 == 0 and (width * itemsize) % 16 == 0:
        return torch._grouped_mm(rows, weights, offs=offs)
    # Shapes its 16-byte stride rule rejects (no real config): one mm per non-empty group.
    out = rows.new_empty(rows.shape[0], width)
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(rows[start:end], weights[group], out=out[start:end])
        start = end
    return out


@_cpu_grouped_mm.register_fake
def _(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weights.shape[-1])


def _grouped_mm(rows: torch.Tensor, weights: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """rows [P, K] sorted by group, weights [G, K, N], offs [G] int32 group ends -> [P, N];
    rows past the last end are left unset."""
    if rows.is_cuda:
        return torch._grouped_mm(rows, weights, offs=offs)
    return torch.ops.ernie_cluster.grouped_mm(rows, weights, offs)  # skips custom_op's wrapper


def _grouped_mm_swiglu(
    rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """rows [P, H] sorted by expert, counts [E] -> [P, H]; rows past the owned ones are left
    unset (grouped_mm skips rows beyond the last offset)."""
    offsets = counts.cumsum(0, dtype=torch.int32)  # [E] end row of each expert
    gate_up_out = _grouped_mm(rows, gate_up.transpose(1, 2), offsets)  # [P, 2I]
    gate, up = gate_up_out.chunk(2, dim=-1)
    return _grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offsets)  # [P, H]


def _loop_swiglu(
    rows: torch.Tensor,
    gate_up: torch.Tensor | QuantizedWeight,
    down: torch.Tensor | QuantizedWeight,
    counts: torch.Tensor,
) -> torch.Tensor:
    """The per-expert loop: reads the counts on the host and runs one matmul pair per active
    expert (the CPU default; on CUDA only for shapes grouped_mm rejects)."""
    count_list = counts.tolist()
    if _mm_in_place(rows, gate_up, down):
        if _pads_cheaply(rows, count_list):
            return _padded_swiglu(rows, gate_up, down, counts, count_list)
        return _loop_swiglu_in_place(rows, gate_up, down, count_list)
    out = torch.empty_like(rows)
    for expert, start, stop in _expert_spans(count_list):
        gate, up = linear(rows[start:stop], _expert(gate_up, expert)).chunk(2, dim=-1)
        out[start:stop] = linear(F.silu(gate) * up, _expert(down, expert))
    return out


def _mm_in_place(rows: torch.Tensor, *weights: torch.Tensor | QuantizedWeight) -> bool:
    """Whether the loop's GEMMs may write straight into slices of its outputs: plain weights
    in the rows' dtype that cpu_bf16 does not widen."""
    return not cpu_bf16.widens_bf16(rows) and all(
        isinstance(w, torch.Tensor) and w.dtype == rows.dtype for w in weights
    )


def _loop_swiglu_in_place(
    rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]
) -> torch.Tensor:
    """_loop_swiglu in two passes over the experts with one SwiGLU between them: each expert
    costs two GEMMs written in place instead of eight ops. NOTE: at decode sizes a CPU expert
    GEMM takes tens of microseconds, so the ops' dispatch was a tenth of the layer."""
    num_rows = sum(counts)
    inter = down.shape[2]
    gate_up_out = rows.new_empty(num_rows, 2 * inter)  # [P, 2I], owned rows only
    out = torch.empty_like(rows)  # [P, H]; rows past the owned ones left unset
    spans = _expert_spans(counts)
    for expert, start, stop in spans:
        torch.mm(rows[start:stop], gate_up[expert].t(), out=gate_up_out[start:stop])
    gate, up = gate_up_out.chunk(2, dim=-1)
    hidden = F.silu(gate).mul_(up)  # [P, I]
    for expert, start, stop in spans:
        torch.mm(hidden[start:stop], down[expert].t(), out=out[start:stop])
    return out


_MAX_PADDED_ROWS = 64
"""Largest per-expert row count _padded_swiglu pads to (past it the loop's GEMMs are big
enough that a call's fixed cost no longer matters)."""


def _pads_cheaply(rows: torch.Tensor, counts: list[int]) -> bool:
    """Whether to run the experts as two batched GEMMs over rows padded per expert.

    NOTE: on a CPU with native bfloat16 (AMX, AVX512-BF16) a bfloat16 oneDNN GEMM costs
    30-60 us whatever its rows, so at decode sizes the loop is call-bound: one batched GEMM
    over every expert padded to the largest count is 2.6x faster (mini, 32 tokens, one thread:
    14.1 -> 5.3 ms per layer) and gives the same values. float32's MKL GEMMs cost less per
    call than the padding (measured slower), and a skewed routing would pad too much."""
    if rows.dtype != torch.bfloat16 or rows.device.type != "cpu" or not cpu_bf16.native_bf16():
        return False
    largest, total = max(counts, default=0), sum(counts)
    return 0 < largest <= _MAX_PADDED_ROWS and len(counts) * largest <= 4 * total


def _padded_swiglu(
    rows: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: torch.Tensor,
    count_list: list[int],
) -> torch.Tensor:
    """_loop_swiglu as batched GEMMs: each expert's rows padded with zeros to the largest
    count C (a zero row stays zero through SwiGLU) -> [P, H], rows past the owned ones unset."""
    num_local, largest, owned = len(count_list), max(count_list), sum(count_list)
    hidden = rows.shape[1]
    # [P_owned] padded row of each sorted pair: its expert's first padded row plus its rank
    first_sorted = counts.cumsum(0) - counts  # [E]
    shift = torch.arange(num_local) * largest - first_sorted
    padded_row = torch.repeat_interleave(shift, counts, output_size=owned) + torch.arange(owned)
    padded = rows.new_zeros(num_local * largest, hidden)
    padded.index_copy_(0, padded_row, rows[:owned])
    gate_up_out = torch.bmm(padded.view(num_local, largest, hidden), gate_up.transpose(1, 2))
    gate, up = gate_up_out.chunk(2, dim=-1)  # [E, C, I] each
    expert_out = torch.bmm(F.silu(gate).mul_(up), down.transpose(1, 2))  # [E, C, H]
    out = torch.empty_like(rows)
    torch.index_select(expert_out.view(-1, hidden), 0, padded_row, out=out[:owned])
    return out


def _expert_spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert that has rows, rows sorted by expert."""
    spans, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            spans.append((expert, start, start + count))
            start += count
    return spans


def _expert(weights: torch.Tensor | QuantizedWeight, index: int):
    """One expert's [N, K] weight of a stacked [E, N, K] (plain or quantized)."""
    return weights.expert(index) if isinstance(weights, QuantizedWeight) else weights[index]


def _benchmark(rounds: int = 5, repeats: int = 10) -> None:
    """Times each method on the `mini` (CPU, one thread) or real (CUDA) expert shapes: median
    ms per layer over interleaved rounds; CPU time on CPU, so other processes skew it less."""
    import statistics
    import time

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    hidden, inter, num_experts, top_k = (2560, 1536, 64, 6) if cuda else (640, 192, 64, 6)
    if not cuda:
        torch.set_num_threads(1)
    clock = time.perf_counter if cuda else time.thread_time
    methods = ["triton", "grouped_mm", "loop"] if cuda else ["grouped_mm", "loop"]
    print(f"{device} H={hidden} I={inter} E={num_experts} top-{top_k}: ms per layer")
    for dtype in (torch.bfloat16,) if cuda else (torch.float32, torch.bfloat16):
        gen = torch.Generator(device).manual_seed(0)
        shape = (num_experts, 2 * inter, hidden)
        gate_up = torch.randn(shape, device=device, generator=gen).mul(hidden**-0.5).to(dtype)
        shape = (num_experts, hidden, inter)
        down = torch.randn(shape, device=device, generator=gen).mul(inter**-0.5).to(dtype)
        for tokens in (1, 16, 64, 256, 1024, 4096) if cuda else (1, 16, 64, 256):
            x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
            scores = torch.rand(tokens, num_experts, device=device, generator=gen)
            weights, ids = torch.topk(scores, top_k, dim=-1)
            weights = weights.to(dtype)
            times: dict[str, list[float]] = {method: [] for method in methods}
            outputs = {}
            with torch.inference_mode():
                for method in methods:  # warm-up (Triton compiles here)
                    outputs[method] = fused_experts(x, ids, weights, gate_up, down, 0, method)[0]
                for _ in range(rounds):
                    for method in methods:
                        if cuda:
                            torch.cuda.synchronize()
                        start = clock()
                        for _ in range(repeats):
                            fused_experts(x, ids, weights, gate_up, down, 0, method)
                        if cuda:
                            torch.cuda.synchronize()
                        times[method].append((clock() - start) / repeats * 1e3)
            ref = outputs["loop"].float()
            cells = [
                f"{m} {statistics.median(t):8.3f} (diff {(outputs[m].float() - ref).abs().max():.1e})"
                for m, t in times.items()
            ]
            print(f"{str(dtype)[6:]:9} tokens={tokens:5}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    _benchmark()
