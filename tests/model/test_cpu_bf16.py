"""bfloat16 on CPUs without native support (ernie_cluster/cpu_bf16): GEMMs widened to float32
a slab at a time, and the torch attention backend computing in float32, each checked against a
float64 oracle on the same bfloat16 operands. The widening is forced on, so the tests run the
same code on CPUs that do have AVX512-BF16/AMX."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ernie_cluster import cpu_bf16
from ernie_cluster.attention import TorchPagedAttention
from ernie_cluster.quantization.weight import linear

sys.path.insert(0, str(Path(__file__).parents[1] / "attention"))
from paged_tables import paged_tables


@pytest.fixture
def widened(monkeypatch):
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: False)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=1e-30)))
    return torch.exp2(exponent - 7)


@pytest.mark.parametrize("slab_rows", [None, 3], ids=["one-slab", "slabs-of-3-rows"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1,)], ids=["2d", "3d", "one-row"])
def test_widened_linear_is_a_bfloat16_gemm(widened, monkeypatch, slab_rows, lead):
    gen = torch.Generator().manual_seed(0)
    width, num_out = 96, 40
    if slab_rows is not None:  # 40 rows in slabs of 3: 13 full slabs and a remainder
        monkeypatch.setattr(cpu_bf16, "_SLAB_ELEMENTS", slab_rows * width)
    x = torch.randn(*lead, width, generator=gen).bfloat16()
    weight = torch.randn(num_out, width, generator=gen).bfloat16()
    got = linear(x, weight)  # the model's one matmul entry point
    assert got.dtype == torch.bfloat16 and got.shape == (*lead, num_out)
    exact = x.double() @ weight.double().T  # bf16 x bf16 products are exact; f64 sums
    # Rounded once to bfloat16 from a float32 sum: within one bfloat16 step of the exact value.
    assert ((got.double() - exact).abs() <= bf16_ulp(exact)).all()
    # oneDNN's bfloat16 GEMM (the path on native CPUs) rounds the same values the same way
    # but for the order of additions: most outputs are bit-identical.
    same = (got == F.linear(x, weight)).float().mean()
    assert same > 0.9, same


def test_float32_and_native_paths_are_untouched(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(4, 32, generator=gen), torch.randn(8, 32, generator=gen)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    monkeypatch.setattr(cpu_bf16, "native_bf16", lambda: True)
    assert not cpu_bf16.widens_bf16(x.bfloat16())
    assert torch.equal(
        linear(x.bfloat16(), weight.bfloat16()), F.linear(x.bfloat16(), weight.bfloat16())
    )


def reference_attention(q, kv_cache, meta, scale):
    """float64 attention of each row over its sequence's keys, causal, from the slot layout."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // kv_cache.shape[2]
    row = 0
    for seq, (query_len, context_len) in enumerate(
        zip(meta.query_lens, meta.seq_lens, strict=True)
    ):
        table = meta.block_table[seq].long()
        slots = (table[:, None] * meta.block_size + torch.arange(meta.block_size)).flatten()
        keys = kv_cache[0, slots[:context_len]].double().repeat_interleave(group, dim=1)
        values = kv_cache[1, slots[:context_len]].double().repeat_interleave(group, dim=1)
        for i in range(query_len):
            visible = context_len - query_len + i + 1
            scores = torch.einsum("hd,khd->hk", q[row].double(), keys[:visible]) * scale
            out[row] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:visible])
            row += 1
    return out


def test_widened_attention_matches_a_float64_oracle(widened):
    """Two decodes, a fresh prompt and a chunk after a cached prefix, all in bfloat16."""
    gen = torch.Generator().manual_seed(2)
    query_lens, context_lens = [1, 1, 7, 5], [19, 4, 7, 21]
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 2, 16
    tables = paged_tables(query_lens, context_lens, block_size, gen, 2, "cpu")
    num_slots = tables.num_blocks * block_size
    kv_cache = torch.randn(2, num_slots, num_kv_heads, head_dim, generator=gen).bfloat16()
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).bfloat16()
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).bfloat16()
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).bfloat16()
    scale = head_dim**-0.5
    got = TorchPagedAttention().forward(q, k, v, kv_cache, tables.meta, scale)
    assert got.dtype == torch.bfloat16
    want = reference_attention(q, kv_cache, tables.meta, scale)  # the cache now holds k, v
    # float32 arithmetic, one rounding to bfloat16 at the end
    assert ((got.double() - want).abs() <= bf16_ulp(want) + 1e-6).all()


def test_scratch_made_under_inference_mode_serves_outside_it(widened, monkeypatch):
    """The engine steps under inference_mode; prompt scoring and tests may not."""
    monkeypatch.setattr(cpu_bf16, "_scratch", type(cpu_bf16._scratch)())  # a fresh thread-local
    x, weight = torch.ones(2, 8).bfloat16(), torch.ones(4, 8).bfloat16()
    with torch.inference_mode():
        inside = linear(x, weight)
    assert torch.equal(linear(x, weight), inside)
    assert (inside == 8).all()
