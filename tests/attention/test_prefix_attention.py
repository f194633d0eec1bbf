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
