"""The mask-free CPU path for prefill chunks after a cached prefix equals SDPA with the
explicit offset-causal mask (the path it replaces), for grouped and plain heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernie_cluster.attention.backend import _CPU_FLASH, prefix_then_causal

pytestmark = pytest.mark.skipif(_CPU_FLASH is None, reason="this torch has no CPU flash op")


def masked_reference(q, k, v, scale):
    n, ctx = q.shape[0], k.shape[0]
    mask = torch.arange(ctx)[None, :] <= torch.arange(n)[:, None] + (ctx - n)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize(
    ("n", "prefix", "heads", "kv_heads", "dim"),
    [(5, 37, 4, 2, 16), (64, 1000, 20, 4, 32), (1, 16, 8, 8, 32), (300, 3, 6, 2, 24)],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_masked_sdpa(n, prefix, heads, kv_heads, dim, dtype, tol):
    gen = torch.Generator().manual_seed(n + prefix)
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    k = torch.randn(prefix + n, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(prefix + n, kv_heads, dim, generator=gen).to(dtype)
    got = prefix_then_causal(q, k, v, dim**-0.5)
    want = masked_reference(q, k, v, dim**-0.5)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_backend_paths_agree_on_a_batch_with_prefixes(monkeypatch):
    """A step mixing a fresh prompt, a chunk after a cached prefix and a decode: the mask-free
    path and the masked path (what a backend without it runs) give the same output, and the
    lazily built mask is the offset-causal one."""
    from ernie_cluster.attention import backend
    from ernie_cluster.attention.metadata import AttentionMetadata

    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    query_lens, context_lens = [1, 5, 3], [7, 5, 11]
    tables = [[5, 6], [0, 1], [2, 3, 4]]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size)
    fresh, chunk = meta.prefills
    assert not fresh.has_prefix and chunk.has_prefix
    assert meta.num_decodes == 1
    want_mask = torch.arange(11)[None, :] <= torch.arange(8, 11)[:, None]
    assert torch.equal(chunk.mask, want_mask)

    gen = torch.Generator().manual_seed(0)
    n = sum(query_lens)
    q = torch.randn(n, heads, dim, generator=gen)
    k = torch.randn(n, kv_heads, dim, generator=gen)
    v = torch.randn(n, kv_heads, dim, generator=gen)
    cache = torch.randn(2, 7 * block_size, kv_heads, dim, generator=gen)
    attention = backend.TorchPagedAttention()
    fast = attention.forward(q, k, v, cache.clone(), meta, dim**-0.5)
    monkeypatch.setattr(backend, "_CPU_FLASH", None)
    masked = attention.forward(q, k, v, cache.clone(), meta, dim**-0.5)
    torch.testing.assert_close(fast, masked, atol=1e-5, rtol=1e-5)
