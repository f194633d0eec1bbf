"""How many KV cache blocks a rank gets: the memory budget, the profile behind it, and the
agreement of every rank on one block count.

Owns the budget formula (see `MemoryProfile.kv_cache_budget`), the bytes of a block in the
cache's element type (`kv_cache_dtype`: fp8 is one byte, so twice bfloat16's blocks), the
profiling forward at the step token budget on a small temporary cache, and the MIN over ranks.
Never allocates the real cache (the model runner does) and leaves no trace in the model: the
temporary cache is unbound and the expert-load counters are restored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ernie_cluster.attention.kv_quant import kv_cache_torch_dtype
from ernie_cluster.attention.metadata import AttentionMetadata
from ernie_cluster.config.engine_config import EngineConfig, max_model_len_for
from ernie_cluster.model.ernie4_5_moe import Ernie4_5_MoeForCausalLM
from ernie_cluster.worker.model_runner import allocate_kv_caches

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
"""KV budget of a CPU rank without an explicit size: host memory is shared with everything
else on the machine, so there is no device total to take a fraction of."""


@dataclass(frozen=True)
class MemoryProfile:
    """One rank's device memory, measured after loading and the profiling forward."""

    free_bytes: int
    """Free on the device (cudaMemGetInfo) once the profile's tensors are freed."""
    total_bytes: int
    """The device's memory."""
    peak_activation_bytes: int
    """Most memory the profiling forward allocated above what it started with: the largest
    step's activations (the temporary KV cache excluded)."""

    @property
    def used_bytes(self) -> int:
        """Memory that stays taken: weights, CUDA context, workspaces the first forward
        created (NCCL, cuBLAS), allocator leftovers, and other processes on the device."""
        return self.total_bytes - self.free_bytes

    def kv_cache_budget(self, gpu_memory_utilization: float) -> int:
        """Bytes left for the KV cache (negative when there are none):

            budget = total * gpu_memory_utilization - used - peak_activation

        where `used` = total - free is measured after the profiling forward, its tensors
        freed and the allocator's cache emptied. A step then holds used + KV cache + at most
        peak_activation, i.e. total * gpu_memory_utilization. Memory other processes hold on
        the device is part of `used`, so the cap is on the whole device (a shared GPU is never
        oversubscribed). Not in the budget: CUDA-graph pools captured after sizing, and the
        sampler's temporaries beyond the logits; the (1 - utilization) headroom covers them.
        """
        limit = int(self.total_bytes * gpu_memory_utilization)
        return limit - self.used_bytes - self.peak_activation_bytes


MemorySource = Callable[[], MemoryProfile]


def kv_cache_bytes_per_block(
    model: Ernie4_5_MoeForCausalLM, block_size: int, cache_dtype: torch.dtype | None = None
) -> int:
    """Bytes of one block on this rank: K and V of its kv heads in every layer, in
    `cache_dtype` (default: the model's; fp8 is one byte an element)."""
    attn = model.layers[0].self_attn
    itemsize = (cache_dtype or model.dtype).itemsize
    per_token = 2 * attn.num_kv_heads * attn.head_dim * itemsize
    return per_token * len(model.layers) * block_size


def profile_query_lens(config: EngineConfig, max_model_len: int) -> list[int]:
    """New tokens of each dummy sequence: max_num_batched_tokens spread evenly over up to
    max_num_seqs fresh prompts (as vLLM profiles), none longer than max_model_len."""
    num_tokens = min(config.max_num_batched_tokens, config.max_num_seqs * max_model_len)
    num_seqs = min(config.max_num_seqs, num_tokens)
    base, extra = divmod(num_tokens, num_seqs)
    return [base + 1] * extra + [base] * (num_seqs - extra)


@torch.inference_mode()
def run_profile_forward(
    model: Ernie4_5_MoeForCausalLM,
    config: EngineConfig,
    device: torch.device,
    on_start: Callable[[], None] = lambda: None,
) -> None:
    """The largest step the scheduler can send: `profile_query_lens` sequences forward plus
    logits for each, on a temporary cache just big enough for them. `on_start` runs once the
    cache and inputs exist, right before the forward (where peak tracking starts). Every rank
    must call it at W > 1 (the forward's collectives).

    The dummy tokens are all id 0: identical tokens pick the same k experts in every layer,
    so the ranks owning those experts receive every token's rows, a heavier skew than real
    traffic (ranks then agree on the smallest budget, so the heaviest-loaded one decides).
    """
    block_size = config.block_size
    max_model_len = max_model_len_for(config.max_model_len, model.config)
    query_lens = profile_query_lens(config, max_model_len)
    block_tables, num_blocks = [], 0
    for q_len in query_lens:
        n = -(-q_len // block_size)
        block_tables.append(list(range(num_blocks, num_blocks + n)))
        num_blocks += n
    bound = [layer.self_attn.kv_cache for layer in model.layers]
    counters = {
        name: buf.clone()
        for name, buf in model.named_buffers()
        if name.endswith("tokens_per_expert")
    }
    cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, model.dtype)
    model.bind_kv_caches(allocate_kv_caches(model, num_blocks, block_size, device, cache_dtype))
    try:
        meta = AttentionMetadata.build(query_lens, query_lens, block_tables, block_size, device)
        input_ids = torch.zeros(sum(query_lens), dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(q_len) for q_len in query_lens]).to(device)
        last_rows = torch.tensor(query_lens, device=device).cumsum(0) - 1  # [B]
        on_start()
        hidden = model(input_ids, positions, meta)
        model.compute_logits(hidden, last_rows)
    finally:
        # NOTE: unbinding drops the only references to the temporary cache.
        model.bind_kv_caches(bound)
        buffers = dict(model.named_buffers())
        for name, saved in counters.items():
            buffers[name].copy_(saved)


def profile_cuda_memory(
    model: Ernie4_5_MoeForCausalLM, config: EngineConfig, device: torch.device
) -> MemoryProfile:
    """Run the profiling forward on a CUDA rank and measure its peak, then what stays used."""
    start = 0

    def reset_peak() -> None:
        nonlocal start
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    run_profile_forward(model, config, device, on_start=reset_peak)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - start
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(free_bytes=free, total_bytes=total, peak_activation_bytes=peak)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The minimum of `value` over the default process group (this rank's alone without
    one). Every rank of the group must call it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # NOTE: on the rank's device: NCCL reduces only CUDA tensors.
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def determine_num_kv_blocks(
    model: Ernie4_5_MoeForCausalLM,
    config: EngineConfig,
    device: torch.device,
    measure_memory: MemorySource | None = None,
    draft: Ernie4_5_MoeForCausalLM | None = None,
) -> int:
    """KV blocks for this rank, equal on every rank (every rank must call this).

    In order: `num_kv_blocks` as given; else a budget of `kv_cache_memory_bytes`; else, on
    CUDA, the profiled budget (`MemoryProfile.kv_cache_budget`); else 1 GiB on CPU (no
    profiling: there is no device total to cap, and a profile at the full token budget would
    slow every CPU start). `measure_memory` replaces the CUDA profile (tests simulate ranks
    with different free memory with it, on any device). Ranks whose free memory differs get
    different budgets; all take the smallest block count, so their caches match. Raises
    ValueError on every rank when some rank's budget holds less than one block. A `draft`
    model (draft_model, rank 0) keeps a cache of the same blocks: its bytes count in each
    block here (its forwards run after the target's and are smaller: not profiled).
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, model.dtype)
    bytes_per_block = kv_cache_bytes_per_block(model, config.block_size, cache_dtype)
    if draft is not None:
        draft_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, draft.dtype)
        bytes_per_block += kv_cache_bytes_per_block(draft, config.block_size, draft_dtype)
    profile = None
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif measure_memory is not None or device.type == "cuda":
        profile = measure_memory() if measure_memory else profile_cuda_memory(model, config, device)
        budget = profile.kv_cache_budget(config.gpu_memory_utilization)
    else:
        budget = CPU_KV_CACHE_BYTES
    local = min(max(budget, 0) // bytes_per_block, config.num_blocks_cap())
    num_blocks = min_over_ranks(local, device)
    if local < 1:
        raise ValueError(_too_small(budget, bytes_per_block, config, profile))
    if num_blocks < 1:
        raise ValueError("another rank's KV cache budget holds less than one block (see its error)")
    if profile is not None:
        logger.info(
            "KV budget %.2f GiB: %.2f GiB x %.2f - %.2f GiB in use - %.2f GiB peak activations "
            "-> %d blocks of %d bytes (%s) here, %d agreed",
            budget / 2**30,
            profile.total_bytes / 2**30,
            config.gpu_memory_utilization,
            profile.used_bytes / 2**30,
            profile.peak_activation_bytes / 2**30,
            local,
            bytes_per_block,
            str(cache_dtype).removeprefix("torch."),
            num_blocks,
        )
    return num_blocks


def _too_small(
    budget: int, bytes_per_block: int, config: EngineConfig, profile: MemoryProfile | None
) -> str:
    if profile is None:
        return f"KV cache budget {budget} bytes is smaller than one block ({bytes_per_block} bytes)"
    limit = int(profile.total_bytes * config.gpu_memory_utilization)
    return (
        f"no memory left for the KV cache: {profile.total_bytes} bytes total x "
        f"gpu_memory_utilization {config.gpu_memory_utilization} = {limit}, minus "
        f"{profile.used_bytes} in use after loading, minus {profile.peak_activation_bytes} of "
        f"peak activations (max_num_batched_tokens {config.max_num_batched_tokens}, "
        f"max_num_seqs {config.max_num_seqs}) leaves {budget} bytes, less than one block "
        f"({bytes_per_block} bytes); raise gpu_memory_utilization, lower "
        "max_num_batched_tokens, or use more tensor-parallel ranks"
    )
