"""The fp8 KV cache on the torch reference backend: a write stores the e4m3 value nearest to
x / scale (found in a table of every e4m3 value, saturating at 448), and attention over an fp8
cache equals attention computed here in float64 on the dequantized keys and values (decodes,
fresh prompts and chunks after a cached prefix in one step), with K and V scales that are not 1
and differ, so a scale applied twice, never, or to the wrong half fails."""

from __future__ import annotations

import math

import pytest
import torch

from ernie_cluster.attention import AttentionMetadata, TorchPagedAttention
from ernie_cluster.attention.backend import write_kv
from ernie_cluster.attention.kv_quant import (
    FP8_KV_DTYPE,
    kv_cache_torch_dtype,
    kv_scales,
    set_kv_scales,
)

# Every finite e4m3fn value and its code (codes 0x7F and 0xFF are NaN).
E4M3_CODES = torch.arange(256, dtype=torch.int32)
E4M3_TABLE = E4M3_CODES.to(torch.uint8).view(FP8_KV_DTYPE).double()
E4M3_FINITE, E4M3_FINITE_CODES = E4M3_TABLE[~E4M3_TABLE.isnan()], E4M3_CODES[~E4M3_TABLE.isnan()]
K_SCALE, V_SCALE = 0.05, 3.0


def nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """[...] -> the finite e4m3 value nearest to each element (past +-448: +-448); a tie goes
    to the even code (an even last mantissa bit), as round-to-nearest-even does."""
    distance = (x.double().unsqueeze(-1) - E4M3_FINITE).abs()  # [..., 254]
    nearest = distance == distance.min(-1, keepdim=True).values
    odd = (E4M3_FINITE_CODES % 2).bool()
    rank = torch.where(nearest & ~odd, 0, torch.where(nearest, 1, 2))  # even nearest first
    return E4M3_FINITE[rank.argmin(-1)]


def random_fp8(shape, gen: torch.Generator) -> torch.Tensor:
    """Random e4m3 codes over the whole range, NaN codes replaced by zero."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0
    return raw.view(FP8_KV_DTYPE)


def fp8_cache(num_slots, num_kv_heads, head_dim, gen) -> torch.Tensor:
    cache = random_fp8((2, num_slots, num_kv_heads, head_dim), gen)
    set_kv_scales(cache, K_SCALE, V_SCALE)
    return cache


def test_cache_dtype_setting_and_scales():
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == FP8_KV_DTYPE
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) == FP8_KV_DTYPE
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int8'"):
        kv_cache_torch_dtype("int8", torch.float32)
    cache = torch.zeros(2, 4, 1, 8, dtype=FP8_KV_DTYPE)
    assert kv_scales(cache) == (1.0, 1.0)  # no scales attached: vLLM's default
    set_kv_scales(cache, 0.5, 2.0)
    assert kv_scales(cache) == (0.5, 2.0)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="k_scale must be a positive finite float"):
            set_kv_scales(cache, bad, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_stores_the_nearest_e4m3_value(dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, heads, dim = 40, 2, 16
    # magnitudes from 1e-5 (e4m3 subnormals and zeros after / scale) to past 448 * scale
    magnitude = 10 ** (torch.rand(2, num_tokens, heads, dim, generator=gen) * 7 - 5)
    k, v = (torch.randn(2, num_tokens, heads, dim, generator=gen) * magnitude).to(dtype)
    cache = torch.zeros(2, 64, heads, dim, dtype=FP8_KV_DTYPE)
    set_kv_scales(cache, K_SCALE, V_SCALE)
    slots = torch.randperm(64, generator=gen)[:num_tokens]
    write_kv(cache, k, v, slots)
    stored = cache.double()  # the e4m3 values, before any scale
    torch.testing.assert_close(stored[0, slots], nearest_e4m3(k.double() / K_SCALE), rtol=0, atol=0)
    torch.testing.assert_close(stored[1, slots], nearest_e4m3(v.double() / V_SCALE), rtol=0, atol=0)
    assert (stored[0, slots].abs() == 448).any() and (stored[0, slots] == 0).any()
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not stored[:, untouched].any()


def expected_attention(q, cache, meta: AttentionMetadata, scale) -> torch.Tensor:
    """Per sequence, in float64: keys/values = e4m3 * scale from the cache slots of positions
    [0, context); query j of a span of n sits at position context - n + j and sees keys up to
    it."""
    num_heads, num_kv_heads = q.shape[1], cache.shape[2]
    keys_all = cache[0].double() * K_SCALE  # [slots, Hkv, D]
    values_all = cache[1].double() * V_SCALE
    out = torch.empty(q.shape, dtype=torch.float64)
    start = 0
    for seq, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.seq_lens, strict=True)):
        positions = torch.arange(ctx)
        blocks = meta.block_table[seq, positions // meta.block_size].long()
        slots = blocks * meta.block_size + positions % meta.block_size
        keys = keys_all[slots].repeat_interleave(num_heads // num_kv_heads, dim=1)  # [ctx, Hq, D]
        values = values_all[slots].repeat_interleave(num_heads // num_kv_heads, dim=1)
        queries = q[start : start + q_len].double()  # [n, Hq, D]
        scores = torch.einsum("nhd,khd->hnk", queries, keys) * scale
        query_pos = torch.arange(ctx - q_len, ctx)
        scores[:, positions[None, :] > query_pos[:, None]] = -math.inf
        out[start : start + q_len] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values)
        start += q_len
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_an_fp8_cache_is_attention_over_its_dequantized_values(dtype):
    """Two decodes, a fresh prompt and a chunk after a cached prefix ending mid-block, in one
    step over a shuffled block table; the step's own K/V go through the cache too."""
    gen = torch.Generator().manual_seed(1)
    query_lens, context_lens, block_size = [1, 1, 6, 3], [5, 9, 6, 11], 4
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    num_blocks = 12
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for ctx in context_lens:
        count = -(-ctx // block_size)
        tables.append(order[used : used + count])
        used += count
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    cache = fp8_cache(num_blocks * block_size, num_kv_heads, head_dim, gen)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 4).to(dtype)
    v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 50).to(dtype)
    scale = head_dim**-0.5
    got = TorchPagedAttention().forward(q, k, v, cache, meta, scale)
    assert got.dtype == dtype
    # the cache now holds this step's K/V too: the oracle reads everything from it
    want = expected_attention(q, cache, meta, scale)
    # bfloat16: the reference rounds dequantized K/V and q to bf16 and attends in bf16
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale_of_v = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=tol * scale_of_v, rtol=tol)
