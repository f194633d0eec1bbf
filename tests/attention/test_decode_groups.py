"""The CPU reference backend's decode rows in length groups (attention/backend.decode_groups)
against an independent per-sequence oracle: SDPA over each sequence's own keys, read block by
block from its table, no padding and no mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernie_cluster import cpu_bf16
from ernie_cluster.attention.backend import TorchPagedAttention, decode_groups
from ernie_cluster.attention.metadata import AttentionMetadata
from tests.attention.paged_tables import paged_tables


def per_sequence_oracle(q, cache, tables, context_lens, block_size):
    """q [B, Hq, D] one decode token per sequence -> [B, Hq, D]."""
    out = []
    for i, (table, ctx) in enumerate(zip(tables, context_lens, strict=True)):
        slots = torch.tensor(
            [block * block_size + offset for block in table for offset in range(block_size)]
        )[:ctx]
        keys, values = cache[0, slots], cache[1, slots]  # [ctx, Hkv, D]
        attn = F.scaled_dot_product_attention(
            q[i].float()[None, :, None],  # [1, Hq, 1, D]
            keys.float().transpose(0, 1)[None],
            values.float().transpose(0, 1)[None],
            enable_gqa=True,
        )
        out.append(attn[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_paths", [True, False])
def test_grouped_decode_rows_equal_the_per_sequence_oracle(dtype, cpu_paths, monkeypatch):
    monkeypatch.setattr(cpu_bf16, "_cpu_paths", cpu_paths)
    gen = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, dim = 16, 6, 2, 16
    context_lens = [3, 900, 5, 880, 41, 1, 7, 600]  # short and long rows interleaved
    case = paged_tables([1] * len(context_lens), context_lens, block_size, gen, 3, "cpu")
    meta = case.poisoned_meta  # rows past their blocks point at a poison block
    num_slots = case.num_blocks * block_size
    cache = torch.randn(2, num_slots, kv_heads, dim, generator=gen).to(dtype)
    cache[:, case.poison * block_size : (case.poison + 1) * block_size] = 1e4
    q = torch.randn(len(context_lens), heads, dim, generator=gen).to(dtype)
    k = torch.randn(len(context_lens), kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(len(context_lens), kv_heads, dim, generator=gen).to(dtype)
    groups = decode_groups(meta)
    if cpu_paths:  # short rows are not padded to the longest one
        assert len(groups) > 1
        rows = sorted(r for g in groups for r in g.rows.tolist())
        assert rows == list(range(len(context_lens)))
    else:
        assert len(groups) == 1 and groups[0].rows == slice(0, len(context_lens))

    got = TorchPagedAttention().forward(q, k, v, cache, meta, dim**-0.5)
    tables = [
        meta.block_table[i, : -(-c // block_size)].tolist() for i, c in enumerate(context_lens)
    ]
    want = per_sequence_oracle(q, cache, tables, context_lens, block_size)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_groups_cut_where_padding_outweighs_a_call():
    """Equal lengths stay one group (a free slice, no index ops); two length clusters far
    apart split into two."""
    block_size = 16
    same = AttentionMetadata.build([1] * 4, [100] * 4, [[0] * 7] * 4, block_size)
    (group,) = decode_groups(same)
    assert group.rows == slice(0, 4) and group.num_blocks == 7
    lens = [600, 20, 610, 30] * 4
    mixed = AttentionMetadata.build([1] * 16, lens, [[0] * 39] * 16, block_size)
    groups = decode_groups(mixed)
    assert sorted((g.num_blocks, sorted(g.rows.tolist())) for g in groups) == [
        (2, [i for i, n in enumerate(lens) if n < 100]),
        (39, [i for i, n in enumerate(lens) if n > 100]),
    ]
    assert decode_groups(mixed) is groups  # built once per step
