"""KV cache sizing: the budget formula and its errors, the overrides, a profiling forward that
leaves no trace, and two gloo ranks with different free memory agreeing on the minimum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rank_helpers import init_gloo, spawn_ranks

from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.worker.kv_cache_sizing import (
    CPU_KV_CACHE_BYTES,
    MemoryProfile,
    determine_num_kv_blocks,
    kv_cache_bytes_per_block,
    profile_cuda_memory,
    profile_query_lens,
    run_profile_forward,
)

GIB = 1 << 30
CPU = torch.device("cpu")
# The tiny preset at W = 1 in float32: 2 kv heads x head_dim 16 x K and V x 4 bytes x 4 layers
# x 16 tokens.
TINY_BLOCK_BYTES = 2 * 16 * 2 * 4 * 4 * 16


def config(model: Path, **kwargs) -> EngineConfig:
    kwargs.setdefault("max_model_len", 4096)
    return EngineConfig(model=str(model), dtype="float32", show_progress=False, **kwargs)


def memory(free: int, total: int = 80 * GIB, peak: int = 0):
    """A memory source that records its calls."""

    def measure() -> MemoryProfile:
        measure.calls += 1
        return MemoryProfile(free_bytes=free, total_bytes=total, peak_activation_bytes=peak)

    measure.calls = 0
    return measure


def expert_counters(model) -> list[torch.Tensor]:
    return [layer.mlp.experts.tokens_per_expert for layer in model.layers if layer.is_moe]


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, dtype="float32", show_progress=False)


def test_budget_formula():
    profile = MemoryProfile(free_bytes=30 * GIB, total_bytes=80 * GIB, peak_activation_bytes=GIB)
    assert profile.used_bytes == 50 * GIB
    # 80 x 0.9 = 72 GiB cap, minus 50 in use, minus 1 of activations
    assert profile.kv_cache_budget(0.9) == 21 * GIB
    assert profile.kv_cache_budget(1.0) == 29 * GIB
    assert profile.kv_cache_budget(0.5) == -11 * GIB


def test_profiled_budget_becomes_blocks(tiny_model, tiny_checkpoint):
    assert kv_cache_bytes_per_block(tiny_model, 16) == TINY_BLOCK_BYTES
    # 10 MiB cap (100 MiB total x 0.1) - 1 MiB in use - 2 MiB of activations
    source = memory(free=99 << 20, total=100 << 20, peak=2 << 20)
    cfg = config(tiny_checkpoint, gpu_memory_utilization=0.1, max_num_seqs=1024)
    num_blocks = determine_num_kv_blocks(tiny_model, cfg, CPU, measure_memory=source)
    assert source.calls == 1
    budget = int((100 << 20) * 0.1) - (1 << 20) - (2 << 20)
    assert num_blocks == budget // TINY_BLOCK_BYTES
    # capped at what max_num_seqs sequences of max_model_len could use
    small = config(tiny_checkpoint, max_num_seqs=2, max_model_len=64)
    assert determine_num_kv_blocks(tiny_model, small, CPU, memory(free=79 * GIB)) == 2 * 4 + 1


def test_budget_below_one_block_names_the_numbers(tiny_model, tiny_checkpoint):
    source = memory(free=10 * GIB, total=80 * GIB, peak=3 * GIB)
    cfg = config(tiny_checkpoint, gpu_memory_utilization=0.9)
    with pytest.raises(ValueError) as info:
        determine_num_kv_blocks(tiny_model, cfg, CPU, measure_memory=source)
    message = str(info.value)
    limit = int(80 * GIB * 0.9)
    assert f"{80 * GIB} bytes total x gpu_memory_utilization 0.9 = {limit}" in message
    assert f"minus {70 * GIB} in use after loading, minus {3 * GIB} of peak" in message
    assert f"leaves {limit - 73 * GIB} bytes" in message
    assert f"({TINY_BLOCK_BYTES} bytes)" in message
    assert "max_num_batched_tokens 2048" in message
    # a budget of a few bytes short of one block
    tight = memory(free=80 * GIB, total=80 * GIB, peak=0)
    almost = config(tiny_checkpoint, kv_cache_memory_bytes=TINY_BLOCK_BYTES - 1)
    with pytest.raises(ValueError, match=f"{TINY_BLOCK_BYTES - 1} bytes is smaller than one"):
        determine_num_kv_blocks(tiny_model, almost, CPU, measure_memory=tight)
    assert tight.calls == 0


def test_explicit_sizes_win_and_cpu_keeps_its_default(tiny_model, tiny_checkpoint):
    source = memory(free=GIB)
    blocks = config(tiny_checkpoint, num_kv_blocks=7, kv_cache_memory_bytes=GIB)
    assert determine_num_kv_blocks(tiny_model, blocks, CPU, measure_memory=source) == 7
    nbytes = config(tiny_checkpoint, kv_cache_memory_bytes=10 * TINY_BLOCK_BYTES + 5)
    assert determine_num_kv_blocks(tiny_model, nbytes, CPU, measure_memory=source) == 10
    assert source.calls == 0
    default = config(tiny_checkpoint, max_num_seqs=4096)
    assert determine_num_kv_blocks(tiny_model, default, CPU) == CPU_KV_CACHE_BYTES // (
        TINY_BLOCK_BYTES
    )


def test_profile_query_lens(tiny_checkpoint):
    assert profile_query_lens(config(tiny_checkpoint), 4096) == [64] * 32
    uneven = config(tiny_checkpoint, max_num_batched_tokens=100, max_num_seqs=8)
    assert profile_query_lens(uneven, 4096) == [13] * 4 + [12] * 4
    few = config(tiny_checkpoint, max_num_batched_tokens=5, max_num_seqs=8)
    assert profile_query_lens(few, 4096) == [1] * 5
    short = config(tiny_checkpoint, max_num_batched_tokens=2048, max_num_seqs=2, max_model_len=64)
    assert profile_query_lens(short, 64) == [64, 64]


def test_profile_forward_leaves_no_trace(tiny_model, tiny_checkpoint):
    for i, counts in enumerate(expert_counters(tiny_model)):
        counts.fill_(i + 3)
    before = [counts.clone() for counts in expert_counters(tiny_model)]
    bound = [layer.self_attn.kv_cache for layer in tiny_model.layers]
    started = []
    cfg = config(tiny_checkpoint, max_num_batched_tokens=96, max_num_seqs=5)
    run_profile_forward(tiny_model, cfg, CPU, on_start=lambda: started.append(True))
    assert started == [True]
    assert all(map(torch.equal, expert_counters(tiny_model), before))
    assert [layer.self_attn.kv_cache for layer in tiny_model.layers] == bound


def test_cuda_profile_arithmetic(tiny_model, tiny_checkpoint, monkeypatch):
    """The CUDA measurement with the allocator's counters faked: the peak counts from where
    the forward starts (temporary cache already bound), and free memory is read last."""
    calls = []

    def reset_peak(device):
        bound = tiny_model.layers[0].self_attn.kv_cache is not None
        calls.append(("reset_peak", bound))

    fake = {
        "synchronize": lambda device=None: calls.append(("synchronize",)),
        "memory_allocated": lambda device=None: 1000,
        "reset_peak_memory_stats": reset_peak,
        "max_memory_allocated": lambda device=None: 1500,
        "empty_cache": lambda: calls.append(("empty_cache",)),
        "mem_get_info": lambda device=None: (calls.append(("mem_get_info",)), (300, 900))[1],
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cfg = config(tiny_checkpoint, max_num_batched_tokens=40, max_num_seqs=3)
    profile = profile_cuda_memory(tiny_model, cfg, CPU)
    assert profile == MemoryProfile(free_bytes=300, total_bytes=900, peak_activation_bytes=500)
    assert calls == [
        ("synchronize",),
        ("reset_peak", True),
        ("synchronize",),
        ("empty_cache",),
        ("mem_get_info",),
    ]
    assert tiny_model.layers[0].self_attn.kv_cache is None


# ------------------------------------------------------------------- two gloo ranks

FREE_BY_RANK = [30 * GIB, 20 * GIB]  # of 80 GiB; 1 GiB of activations on both


def _rank_main(rank: int, world: int, port: int, checkpoint: str, out_dir: str) -> None:
    from ernie_cluster.distributed.communicator import Communicator
    from ernie_cluster.model.sharding import ShardSpec

    init_gloo(rank, world, port)
    result: dict = {}
    try:
        model = load_model(
            checkpoint,
            dtype="float32",
            shard=ShardSpec(rank, world),
            show_progress=False,
            comm=Communicator(rank, world),
        )
        cfg = config(Path(checkpoint), max_num_seqs=100_000)
        source = memory(free=FREE_BY_RANK[rank], total=80 * GIB, peak=GIB)
        result["bytes_per_block"] = kv_cache_bytes_per_block(model, 16)
        result["agreed"] = determine_num_kv_blocks(model, cfg, CPU, measure_memory=source)
        # rank 1 has no room at all: both ranks fail, neither waits for the other
        starved = memory(free=(30 if rank == 0 else 1) * GIB, total=80 * GIB, peak=GIB)
        try:
            determine_num_kv_blocks(model, cfg, CPU, measure_memory=starved)
        except ValueError as exc:
            result["starved_error"] = str(exc)
        # the profiling forward at W = 2 (its collectives) restores the expert counters
        counts = [c.clone() for c in expert_counters(model)]
        run_profile_forward(model, config(Path(checkpoint), max_num_batched_tokens=37), CPU)
        result["counters_restored"] = all(map(torch.equal, counts, expert_counters(model)))
        dist.barrier()  # NOTE: no rank tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoint, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(_rank_main, 2, (str(tiny_checkpoint), str(out)), timeout_s=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ranks_agree_on_the_smaller_budget(two_ranks):
    assert [r["bytes_per_block"] for r in two_ranks] == [TINY_BLOCK_BYTES // 2] * 2
    budgets = [int(80 * GIB * 0.9) - (80 * GIB - free) - GIB for free in FREE_BY_RANK]
    local = [b // (TINY_BLOCK_BYTES // 2) for b in budgets]
    assert local[0] > local[1] > 0
    assert [r["agreed"] for r in two_ranks] == [local[1], local[1]]


@pytest.mark.slow
def test_a_starved_rank_fails_every_rank(two_ranks):
    assert "no memory left for the KV cache" in two_ranks[1]["starved_error"]
    assert f"minus {79 * GIB} in use after loading" in two_ranks[1]["starved_error"]
    assert "another rank's KV cache budget" in two_ranks[0]["starved_error"]


@pytest.mark.slow
def test_profile_forward_at_two_ranks_leaves_no_trace(two_ranks):
    assert all(r["counters_restored"] for r in two_ranks)
