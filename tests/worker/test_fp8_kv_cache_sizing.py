"""fp8 KV cache sizing and allocation: under one kv_cache_memory_bytes an fp8 cache gets twice
the blocks of bfloat16 and four times those of float32; the runner allocates float8_e4m3fn
caches carrying their layer's scales; the profiling forward runs on an fp8 cache and restores
the bound one; the host pool moves fp8 blocks back bit-exact."""

from __future__ import annotations

import pytest
import torch

from ernie_cluster.attention.kv_quant import FP8_KV_DTYPE, kv_scales, set_kv_scales
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.loader.model_loader import load_model
from ernie_cluster.model.attention import Ernie4_5_MoeAttention
from ernie_cluster.worker.kv_cache_sizing import (
    determine_num_kv_blocks,
    kv_cache_bytes_per_block,
    run_profile_forward,
)
from ernie_cluster.worker.kv_offload import HostKVPool
from ernie_cluster.worker.model_runner import ModelRunner, allocate_kv_caches

CPU = torch.device("cpu")
# The tiny preset at W = 1: 2 kv heads x head_dim 16 x K and V x 1 byte x 4 layers x 16 tokens.
TINY_FP8_BLOCK_BYTES = 2 * 16 * 2 * 1 * 4 * 16


def config(model, dtype: str = "float32", **kwargs) -> EngineConfig:
    kwargs.setdefault("max_model_len", 4096)
    return EngineConfig(model=str(model), dtype=dtype, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoint):
    return {
        dtype: load_model(tiny_checkpoint, dtype=dtype, show_progress=False)
        for dtype in ("float32", "bfloat16")
    }


def test_fp8_blocks_are_twice_bfloat16s_and_four_times_float32s(tiny_models, tiny_checkpoint):
    model = tiny_models["bfloat16"]
    assert kv_cache_bytes_per_block(model, 16, FP8_KV_DTYPE) == TINY_FP8_BLOCK_BYTES
    assert kv_cache_bytes_per_block(model, 16) == 2 * TINY_FP8_BLOCK_BYTES
    budget = 600 * TINY_FP8_BLOCK_BYTES + 17  # a remainder below one block of any dtype
    blocks = {}
    for dtype, model in tiny_models.items():
        for kv_cache_dtype in ("auto", "fp8", "fp8_e4m3"):
            cfg = config(
                tiny_checkpoint, dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory_bytes=budget
            )
            blocks[dtype, kv_cache_dtype] = determine_num_kv_blocks(model, cfg, CPU)
    assert blocks["bfloat16", "auto"] == 300
    assert blocks["float32", "auto"] == 150
    fp8 = {blocks[dtype, name] for dtype in tiny_models for name in ("fp8", "fp8_e4m3")}
    assert fp8 == {600}


def test_runner_allocates_fp8_caches_carrying_the_layer_scales(
    tiny_models, tiny_checkpoint, monkeypatch
):
    model = tiny_models["float32"]
    # The checkpoint's calibrated scales, once the model loads them, are these attributes.
    monkeypatch.setattr(Ernie4_5_MoeAttention, "k_scale", 0.25, raising=False)
    runner = ModelRunner(model, 10, config(tiny_checkpoint, kv_cache_dtype="fp8"))
    assert len(runner.kv_caches) == len(model.layers)
    for cache, layer in zip(runner.kv_caches, model.layers, strict=True):
        assert cache.dtype == FP8_KV_DTYPE
        assert cache.shape == (2, 11 * 16, 2, 16)  # one spare block past the pool
        assert kv_scales(cache) == (0.25, 1.0)
        assert layer.self_attn.kv_cache is cache
        assert not cache.view(torch.uint8).any()
    auto = ModelRunner(model, 10, config(tiny_checkpoint))
    assert {cache.dtype for cache in auto.kv_caches} == {torch.float32}


def test_profile_forward_runs_on_an_fp8_cache(tiny_models, tiny_checkpoint):
    model = tiny_models["bfloat16"]
    bound = allocate_kv_caches(model, 4, 16, CPU)
    model.bind_kv_caches(bound)
    seen = []
    cfg = config(
        tiny_checkpoint, "bfloat16", kv_cache_dtype="fp8", max_num_batched_tokens=40, max_num_seqs=3
    )

    def record() -> None:
        caches = [layer.self_attn.kv_cache for layer in model.layers]
        seen.extend((c.dtype, c.shape[1]) for c in caches)

    run_profile_forward(model, cfg, CPU, on_start=record)
    # 40 tokens over 3 sequences (14, 13, 13) hold one 16-token block each
    assert seen == [(FP8_KV_DTYPE, 3 * 16)] * len(model.layers)
    assert all(layer.self_attn.kv_cache is c for layer, c in zip(model.layers, bound, strict=True))


def test_host_pool_moves_fp8_blocks_back_bit_exact():
    block_size, num_blocks, heads, dim = 4, 6, 2, 8
    gen = torch.Generator().manual_seed(0)
    caches = []
    for _ in range(2):  # layers
        shape = (2, num_blocks * block_size, heads, dim)
        raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
        cache = raw.view(FP8_KV_DTYPE)
        set_kv_scales(cache, 0.5, 2.0)
        caches.append(cache)
    pool = HostKVPool(caches, block_size, num_host_blocks=3)
    assert pool.block_bytes == 2 * (block_size * heads * dim * 2)  # layers x K, V x 1 byte
    original = [c.view(torch.uint8).clone() for c in caches]

    def block(data: torch.Tensor, b: int) -> torch.Tensor:
        return data[:, b * block_size : (b + 1) * block_size]

    pool.execute(saves=[(1, 0), (4, 2)], loads=[])
    for cache in caches:
        block(cache.view(torch.uint8), 1).zero_()
        block(cache.view(torch.uint8), 4).zero_()
    pool.execute(saves=[], loads=[(0, 5), (2, 0)])  # host slot -> device block
    for cache, before in zip(caches, original, strict=True):
        after = cache.view(torch.uint8)
        assert cache.dtype == FP8_KV_DTYPE
        assert torch.equal(block(after, 5), block(before, 1))
        assert torch.equal(block(after, 0), block(before, 4))
        for untouched in (2, 3):
            assert torch.equal(block(after, untouched), block(before, untouched))
